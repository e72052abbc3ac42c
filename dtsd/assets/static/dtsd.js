// dtsd web UI: what needs a script. The pages work without it.
"use strict";

const UNITS = [["d", 86400], ["h", 3600], ["min", 60], ["s", 1]];

function ago(date) {
  const seconds = (Date.now() - date.getTime()) / 1000;
  if (Math.abs(seconds) < 1) return "now";
  const whole = Math.abs(seconds);
  let text = "0 s";
  for (const [unit, size] of UNITS) {
    if (whole >= size) { text = Math.floor(whole / size) + " " + unit; break; }
  }
  return seconds > 0 ? text + " ago" : "in " + text;
}

function exact(date) {
  // The browser's own zone, with its offset: 2026-12-03 18:40:12 +01:00
  const pad = (n) => String(n).padStart(2, "0");
  const offset = -date.getTimezoneOffset();
  const sign = offset >= 0 ? "+" : "-";
  return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) + " " +
    pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds()) + " " +
    sign + pad(Math.floor(Math.abs(offset) / 60)) + ":" + pad(Math.abs(offset) % 60);
}

function refreshTimes() {
  for (const element of document.querySelectorAll("time[datetime]")) {
    const date = new Date(element.getAttribute("datetime"));
    if (isNaN(date)) continue;
    element.textContent = ago(date);
    element.title = exact(date) + " (" + element.getAttribute("datetime") + ")";
  }
}

function span(seconds) {
  // 45 s, 3 min 20 s, 2 h 5 min: as the server writes durations.
  const parts = [];
  let whole = Math.floor(seconds);
  for (const [unit, size] of UNITS) {
    if (whole >= size || (unit === "s" && !parts.length)) {
      parts.push(Math.floor(whole / size) + " " + unit);
      whole %= size;
    }
  }
  return parts.slice(0, 2).join(" ");
}

function refreshDurations() {
  for (const element of document.querySelectorAll("[data-running-since]")) {
    const since = new Date(element.getAttribute("data-running-since"));
    if (!isNaN(since)) element.textContent = span((Date.now() - since.getTime()) / 1000);
  }
}

function selectAll() {
  for (const box of document.querySelectorAll("input[data-select-all]")) {
    const name = box.getAttribute("data-select-all");
    box.addEventListener("change", () => {
      for (const item of box.form.querySelectorAll('input[type=checkbox][name="' + name + '"]')) {
        item.checked = box.checked;
      }
    });
  }
}

function confirmations() {
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-confirm]");
    if (button && !window.confirm(button.getAttribute("data-confirm"))) event.preventDefault();
  });
}

function watch(output) {
  // Live output: the server relays WatchJob (the current attempt's output from its start,
  // then what it writes), already escaped to visible text. A reconnection starts over.
  const source = new EventSource(output.getAttribute("data-watch"));
  const badge = document.querySelector("h1 [data-status]");
  const result = document.querySelector("[data-result]");
  let attempt = -1;
  source.onopen = () => { output.textContent = ""; attempt = -1; };
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.attempt !== attempt) {
      if (event.kind === "OUTPUT" || attempt > 0) output.textContent = "";
      attempt = event.attempt;
    }
    if (event.kind === "OUTPUT") {
      const follow = output.scrollTop + output.clientHeight >= output.scrollHeight - 4;
      output.append(event.text);
      if (follow) output.scrollTop = output.scrollHeight;
    } else if (event.kind === "STATE") {
      if (badge) {
        badge.textContent = event.status;
        badge.className = "status s-" + event.status.toLowerCase();
      }
      if (result && event.ended) result.textContent = event.ended;
    }
  };
  source.addEventListener("end", () => {
    source.close();
    for (const element of document.querySelectorAll("[data-running-since]")) {
      element.removeAttribute("data-running-since");
    }
    const note = document.querySelector("[data-live-note]");
    if (note) note.textContent = "(ended)";
  });
  source.addEventListener("failure", (message) => {
    source.close();
    output.append("\n[watching stopped: " + JSON.parse(message.data) + "]\n");
  });
}

function autoRefresh(main) {
  // Pages an operator keeps open (the overview, the first page of jobs) fetch themselves
  // again every data-refresh seconds and swap in the new content, unless the tab is hidden
  // or the person is busy with it (a field focused, a box ticked, a button pressed).
  const seconds = Number(main.getAttribute("data-refresh"));
  if (!(seconds > 0)) return;
  setInterval(async () => {
    if (document.hidden) return;
    const active = document.activeElement;
    if (active && active !== document.body && main.contains(active)) return;
    if (main.querySelector("input[type=checkbox]:checked")) return;
    try {
      const reply = await fetch(location.href, { credentials: "same-origin", redirect: "error" });
      if (!reply.ok) return;
      const page = new DOMParser().parseFromString(await reply.text(), "text/html");
      const fresh = page.querySelector("main");
      if (!fresh) return;
      fresh.querySelector(".flash")?.remove();
      main.replaceChildren(...fresh.childNodes);
      refreshTimes();
      selectAll();
    } catch (error) {
      // The server is away for a moment: keep what is shown, try again next time.
    }
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  refreshTimes();
  setInterval(refreshTimes, 10000);
  setInterval(refreshDurations, 1000);
  selectAll();
  confirmations();
  const output = document.querySelector("[data-watch]");
  if (output) watch(output);
  const main = document.querySelector("main[data-refresh]");
  if (main) autoRefresh(main);
});

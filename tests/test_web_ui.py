"""The web UI (dtsd/webui.py) in a real headless Chromium against a real node.

Debian's `chromium` and `chromium-driver`, driven by Selenium: log in with a token, submit
a job and see its output arrive live, cancel a running job, filter the list, add, pause and
resume a schedule, requeue a dead letter; a read token gets no forms. Without a browser:
forged and cross-origin POSTs, the cookie's flags, the headers, escaping, session ends.

Every page is saved as a screenshot at a desktop and a narrow width under
`build/test-artifacts/web/` (or `$DTSD_TEST_ARTIFACTS/web/`).
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import run_dtsctl, wait_for
from tests.test_auth import add_token, dtsd_cli
from tests.test_pipeline import FAST, merged

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("DTSD_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "web"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SIZES = {"desktop": (1280, 900), "narrow": (390, 844)}


def node_config(tmp_path: Path, **server) -> dict:
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    return merged(FAST, {"web": {"processes": 1},
                         "server": {"processes": 1, "tokens_file": str(tokens),
                                    "anonymous_role": "", **server},
                         "worker": {"processes": 1, "queues": "default,batch"}})


def web_token(node, name: str, role: str) -> str:
    """A new token, once the web child knows it too (it rereads the file within a second)."""
    secret = add_token(node, name, role)

    def accepted() -> bool:
        visitor = Visitor(node.web_url)
        return visitor.request("POST", "/login", {"csrf": visitor.csrf(),
                                                  "token": secret})[0] == 303
    wait_for(accepted, timeout=5)
    return secret


@pytest.fixture
def node(dtsd_factory, tmp_path):
    return dtsd_factory(node_config(tmp_path))


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver          # make deps installs it: never a skip
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,900", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


# --- browser steps ---------------------------------------------------------------------------

def css(driver, selector: str):
    from selenium.webdriver.common.by import By
    return driver.find_elements(By.CSS_SELECTOR, selector)


def one(driver, selector: str):
    found = css(driver, selector)
    assert found, f"no {selector!r} on {driver.current_url}"
    return found[0]


def login(driver, node, secret: str) -> None:
    driver.delete_all_cookies()
    driver.get(node.web_url + "/")
    assert "/login" in driver.current_url
    one(driver, "#f-token").send_keys(secret)
    press(driver, "form[action='/login'] button")
    wait_for(lambda: "/login" not in driver.current_url, timeout=10,
             message=lambda: f"the login to go through: {problems(driver)}")


def click(driver, selector: str) -> None:
    """Find and click, again if Chromium says the node it found left the document between
    the two steps (seen now and then when a page has just loaded)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    for attempt in range(5):
        try:
            one(driver, selector).click()
            return
        except StaleElementReferenceException:
            pass
        except WebDriverException as exc:
            if "does not belong to the document" not in str(exc):
                raise
        time.sleep(0.2)
    one(driver, selector).click()


def press(driver, selector: str, confirm: bool = False) -> None:
    """Click a button that submits a form (accepting its confirmation), and wait until
    the next page has replaced this one."""
    from selenium.webdriver.support.wait import WebDriverWait

    def loaded(_driver) -> bool:
        return driver.execute_script("return document.readyState") == "complete"

    def replaced(_driver) -> bool:
        # A new document has a new window object, without the mark. (Selenium's
        # staleness_of does not do: this Chromium answers a replaced node with "does not
        # belong to the document", not with a stale-element error.)
        return driver.execute_script("return window.dtsdTestMark === undefined")
    WebDriverWait(driver, 15).until(loaded)
    driver.execute_script("window.dtsdTestMark = true")
    click(driver, selector)
    if confirm:
        driver.switch_to.alert.accept()
    WebDriverWait(driver, 15).until(replaced)
    WebDriverWait(driver, 15).until(loaded)


def problems(driver) -> list[str]:
    return [e.text for e in css(driver, ".problem, .error, .flash")]


def flash(driver) -> str:
    return wait_for(lambda: " ".join(e.text for e in css(driver, ".flash")), timeout=10)


def shoot(driver, name: str) -> None:
    """Screenshots of the current page at each size in SIZES (full height)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for size, (width, height) in SIZES.items():
        driver.set_window_size(width, height)
        full = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(width, min(max(height, full + 140), 4000))
        driver.save_screenshot(str(ARTIFACTS / f"{name}-{size}.png"))
    driver.set_window_size(*SIZES["desktop"])


def no_console_errors(driver) -> None:
    """No script error and no CSP violation in the page (answers of 4xx are not errors
    here: a refused form is a 400 on purpose)."""
    errors = [entry["message"] for entry in driver.get_log("browser")
              if entry["level"] == "SEVERE" and entry.get("source") != "network"]
    assert not errors, errors


def submit_form(driver, node, **fields) -> None:
    driver.get(node.web_url + "/submit")
    for name, value in fields.items():
        element = one(driver, f"[name='{name}']")
        if name.startswith("limits."):
            driver.execute_script("document.querySelector('details').open = true")
        element.clear()
        element.send_keys(value)
    press(driver, "form[action='/submit'] button.primary")


def job_id_from(driver) -> str:
    wait_for(lambda: re.search(r"/jobs/([^/?#]+)$", driver.current_url), timeout=10,
             message=lambda: f"a job page, not {driver.current_url}: {problems(driver)}")
    return driver.current_url.rsplit("/", 1)[1]


def status_badge(driver) -> str:
    return one(driver, "h1 [data-status]").text


# --- the tour --------------------------------------------------------------------------------

def test_an_admin_does_in_the_browser_what_dtsctl_does(node, browser, tmp_path):
    admin = web_token(node, "alice", "admin")
    login(browser, node, admin)
    assert "token:alice" in one(browser, ".who").text
    shoot(browser, "overview-empty")

    # Submit with the form; the output appears live while the job runs.
    submit_form(browser, node, command="echo first line; sleep 2; echo second line; sleep 30",
                name="live-demo", timeout_seconds="60")
    job_id = job_id_from(browser)
    assert flash(browser).startswith(f"Job {job_id} submitted")
    output = one(browser, "#output[data-watch]")
    wait_for(lambda: "first line" in output.text, timeout=10,
             message=lambda: f"live output, have {output.text!r}")
    assert "second line" not in output.text
    assert status_badge(browser) == "RUNNING"
    wait_for(lambda: "second line" in output.text, timeout=10)
    shoot(browser, "job-running")

    # Cancel it from its page (a confirmation first); the output it wrote is kept.
    press(browser, f"form[action='/jobs/{job_id}/cancel'] button", confirm=True)
    assert "cancelled" in flash(browser)
    wait_for(lambda: (browser.refresh(), status_badge(browser))[1] == "CANCELLED", timeout=15)
    shoot(browser, "job-cancelled")

    # A failing job, dead-lettered at once, and a quick success.
    submit_form(browser, node, command="printf 'boom\\n'; exit 7", name="breaks",
                max_retries="0", queue="batch")
    failed_id = job_id_from(browser)
    submit_form(browser, node, command="echo ok", name="quick")
    ok_id = job_id_from(browser)
    wait_for(lambda: (browser.refresh(), status_badge(browser))[1] == "SUCCEEDED", timeout=20)
    assert "exit code 0" in one(browser, "[data-result]").text
    shoot(browser, "job-succeeded")
    browser.get(f"{node.web_url}/jobs/{failed_id}")
    wait_for(lambda: (browser.refresh(), status_badge(browser))[1] == "FAILED", timeout=20)
    assert "exit code 7" in one(browser, "[data-result]").text
    assert "boom" in one(browser, "#output").text
    shoot(browser, "job-failed")

    # The list, filtered by status and by queue.
    browser.get(node.web_url + "/jobs")
    ids = [a.text for a in css(browser, "table.jobs a.id")]
    assert {job_id, failed_id, ok_id} <= set(ids)
    shoot(browser, "jobs")
    click(browser, "input[name='status'][value='FAILED']")
    press(browser, "form.filters button")
    wait_for(lambda: "status=FAILED" in browser.current_url, timeout=10)
    assert [a.text for a in css(browser, "table.jobs a.id")] == [failed_id]
    browser.get(node.web_url + "/jobs?queue=batch")
    assert [a.text for a in css(browser, "table.jobs a.id")] == [failed_id]
    browser.get(node.web_url + "/jobs?name=quick")
    assert [a.text for a in css(browser, "table.jobs a.id")] == [ok_id]

    # Select many and retry: the failed one runs again.
    browser.get(node.web_url + "/jobs?status=FAILED&status=CANCELLED")
    for box in css(browser, "table.jobs input[name='id']"):
        box.click()
    press(browser, "button[value='retry']", confirm=True)
    assert "2 of 2 queued again" in flash(browser)

    # Dead letters: the failed job (no retries) is there once it fails again; requeue it
    # through the confirmation page.
    def dead_listed():
        browser.get(node.web_url + "/dead-letters")
        return failed_id in [a.text for a in css(browser, "a.id")]
    wait_for(dead_listed, timeout=20)
    shoot(browser, "dead-letters")
    click(browser, f"input[name='id'][value='{failed_id}']")
    press(browser, "button[formaction='/dead-letters/requeue']:not([name])")
    assert "Requeue dead letters?" in one(browser, "h1").text
    shoot(browser, "dead-letters-confirm")
    press(browser, "form[action='/dead-letters/requeue'] button")
    assert "1 requeued" in flash(browser)

    # Schedules: add one with the form (a DST zone), pause it, resume it, run it now.
    browser.get(node.web_url + "/schedules")
    for name, value in (("schedule_name", "nightly-report"), ("expression", "30 2 * * *"),
                        ("timezone", "Europe/Paris"), ("command", "echo report")):
        element = one(browser, f"[name='{name}']")
        element.clear()
        element.send_keys(value)
    press(browser, "form[action='/schedules'] button.primary")
    assert "Schedule nightly-report created" in flash(browser)
    assert "Europe/Paris" in one(browser, ".facts").text
    assert len(css(browser, "table tbody tr")) >= 8        # the next fire times
    press(browser, "form[action$='/pause'] button")
    assert "paused" in flash(browser)
    assert "paused" in one(browser, "h1").text
    press(browser, "form[action$='/resume'] button")
    assert "resumed" in flash(browser)
    assert "active" in one(browser, "h1").text
    press(browser, "form[action$='/trigger'] button", confirm=True)
    assert "fired now" in flash(browser)
    wait_for(lambda: (browser.refresh(), [a.text for a in css(browser, "a.id")])[1], timeout=10)
    shoot(browser, "schedule")
    browser.get(node.web_url + "/schedules")
    assert "nightly-report" in one(browser, "table").text
    shoot(browser, "schedules")

    browser.get(node.web_url + "/submit")
    shoot(browser, "submit")
    browser.get(node.web_url + "/")
    counts = one(browser, ".counts").text
    assert "SUCCEEDED" in counts and "FAILED" in counts
    assert css(browser, "svg.chart rect.b-succeeded")          # the hour's chart has a bar
    assert "demo" not in counts
    shoot(browser, "overview")
    no_console_errors(browser)

    # Log out: the session is gone, pages ask for a login again.
    press(browser, "form[action='/logout'] button")
    browser.get(node.web_url + "/jobs")
    assert "/login" in browser.current_url
    shoot(browser, "login")


def test_the_submit_form_shows_the_api_s_errors_beside_the_field(node, browser):
    login(browser, node, web_token(node, "bob", "submit"))
    submit_form(browser, node, command="true", priority="12")
    field = one(browser, ".field.bad")
    assert one(browser, "#e-priority").text, problems(browser)
    assert field.text.startswith("Priority") and "0 to 9" in one(browser, "#e-priority").text
    assert one(browser, "[name='command']").get_attribute("value") == "true"  # kept
    shoot(browser, "submit-error")
    submit_form(browser, node, command="true", **{"limits.memory_bytes": "lots"})
    assert "512M" in one(browser, "#e-limits\\.memory_bytes").text
    submit_form(browser, node, command="true", env="NOEQUALS")
    assert "NAME=value" in one(browser, "#e-env").text
    submit_form(browser, node, command="true", queue="bad queue!")
    assert one(browser, "#e-queue").text, problems(browser)
    no_console_errors(browser)


def test_a_read_token_sees_no_forms_that_change_anything(node, browser):
    admin = web_token(node, "admin", "admin")
    reader = web_token(node, "viewer", "read")
    ok(node.dtsctl("cron", "add", "hourly-check", "0 * * * *", "--", "true", token=admin))
    job = ok(node.dtsctl("submit", "--", "false", token=admin)).strip().splitlines()[-1]
    login(browser, node, reader)
    assert "read" in one(browser, ".who").text
    assert "Submit" not in [a.text for a in css(browser, "header nav a")]
    browser.get(node.web_url + "/submit")
    assert not css(browser, "form[action='/submit']")
    assert "may not submit" in one(browser, ".problem").text
    browser.get(node.web_url + "/jobs")
    assert not css(browser, "input[name='id']") and not css(browser, "button[value='cancel']")
    browser.get(f"{node.web_url}/jobs/{job}")
    assert not css(browser, "form[action$='/cancel']") and not css(browser, "form[action$='/retry']")
    browser.get(node.web_url + "/schedules")
    assert not css(browser, "form[action='/schedules']") and not css(browser, "form[action$='/pause']")
    browser.get(node.web_url + "/dead-letters")
    assert not css(browser, "button[formaction]")
    shoot(browser, "read-role-jobs")


# --- without a browser: what an attacker would send ------------------------------------------

class Visitor:
    """A cookie-keeping HTTP client that does not follow redirects."""

    def __init__(self, base: str):
        self.base = base
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies),
                                                  NoRedirect())

    def request(self, method: str, path: str, form: dict | None = None,
                headers: dict | None = None) -> tuple[int, str, dict]:
        data = urllib.parse.urlencode(form or {}, doseq=True).encode() if form is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                                  **(headers or {})} if data else headers or {})
        try:
            with self.opener.open(request, timeout=15) as reply:
                return reply.status, reply.read().decode(), dict(reply.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(), dict(exc.headers)

    def csrf(self, path: str = "/login") -> str:
        _, body, _ = self.request("GET", path)
        return re.search(r'name="csrf" value="([0-9a-f]+)"', body).group(1)

    def login(self, secret: str) -> None:
        status, body, headers = self.request("POST", "/login", {"csrf": self.csrf(), "token": secret})
        assert status == 303, (status, body)

    def session(self) -> str:
        return next(c.value for c in self.cookies if c.name == "dtsd_session")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def ok(result) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def test_state_changes_want_the_csrf_token_and_this_origin(node):
    admin = web_token(node, "admin", "admin")
    visitor = Visitor(node.web_url)
    before = visitor.csrf()
    anonymous_id = visitor.session()
    visitor.login(admin)
    assert visitor.session() != anonymous_id          # a login replaces the id (no fixation)
    token = visitor.csrf("/submit")
    assert token != before

    job = {"command": "touch should-not-exist", "csrf": token}
    forged = dict(job, csrf="")
    status, body, _ = visitor.request("POST", "/submit", forged)
    assert status == 403 and "CSRF" in body
    status, body, _ = visitor.request("POST", "/submit", dict(job, csrf=before))  # stale
    assert status == 403
    status, body, _ = visitor.request("POST", "/submit", job,
                                      {"Origin": "http://evil.example"})
    assert status == 403 and "another origin" in body
    status, _, headers = visitor.request("POST", "/submit", job, {"Origin": node.web_url})
    assert status == 303 and headers["Location"].startswith("/jobs/")
    listed = ok(node.dtsctl("list", "-o", "json", token=admin))
    assert listed.count("should-not-exist") == 1          # only the genuine POST made a job

    # A cookie-less forged form (what a cross-site page would send) gets nowhere either.
    stranger = Visitor(node.web_url)
    status, _, _ = stranger.request("POST", "/jobs/bulk", {"action": "cancel", "id": "x"})
    assert status == 403


def test_cookie_flags_headers_and_no_inline_script(node):
    admin = web_token(node, "admin", "admin")
    visitor = Visitor(node.web_url)
    status, _, headers = visitor.request("GET", "/")
    assert status == 303 and headers["Location"].startswith("/login")
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie                          # plain HTTP on loopback
    visitor.login(admin)
    ok(node.dtsctl("cron", "add", "x", "@hourly", "--", "true", token=admin))
    for path in ("/", "/jobs", "/submit", "/schedules", "/schedules/x", "/dead-letters",
                 "/login"):
        status, body, headers = visitor.request("GET", path)
        assert status == 200, (path, status)
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp and headers["X-Frame-Options"] == "DENY"
        assert headers["Cache-Control"] == "no-store"
        scripts = re.findall(r"<script\b[^>]*>", body)
        assert scripts == ['<script src="/static/dtsd.js" defer>'], (path, scripts)
        assert not re.search(r"\son[a-z]+=", body), path      # no inline event handlers
        assert "style=" not in body, path
        assert not re.search(r'(src|href)="(https?:)?//', body), path   # nothing off-site


def test_output_and_names_are_shown_not_obeyed(node, browser):
    admin = web_token(node, "admin", "admin")
    evil = "<script>alert(1)</script>"
    job = ok(node.dtsctl("submit", "--name", "x<b>y</b>", "--",
                         f"printf '{evil}\\033[2J\\342\\200\\256gnp.exe\\n'",
                         token=admin)).strip()
    visitor = Visitor(node.web_url)
    visitor.login(admin)
    status, body, _ = wait_for(lambda: (lambda answer: "s-succeeded" in answer[1] and answer)(
        visitor.request("GET", f"/jobs/{job}")), timeout=20)
    assert status == 200
    assert evil not in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "\\x1b[2J" in body and "\\u202e" in body and "\u202e" not in body
    assert "x&lt;b&gt;y&lt;/b&gt;" in body
    status, raw, headers = visitor.request("GET", f"/jobs/{job}/output")
    assert headers["Content-Type"] == "application/octet-stream"
    assert "attachment" in headers["Content-Disposition"] and raw.startswith(evil)
    login(browser, node, admin)
    browser.get(f"{node.web_url}/jobs/{job}")
    assert evil in one(browser, "#output").text            # text, not an element
    assert not css(browser, "#output script")
    no_console_errors(browser)


def test_a_removed_token_ends_its_sessions(node):
    admin = web_token(node, "keeper", "admin")
    leaving = web_token(node, "leaving", "submit")
    visitor = Visitor(node.web_url)
    visitor.login(leaving)
    assert visitor.request("GET", "/jobs")[0] == 200
    ok(dtsd_cli("token", "rm", "leaving", config=str(node.ini_path)))
    wait_for(lambda: visitor.request("GET", "/jobs")[0] == 303, timeout=5)
    status, _, headers = visitor.request("GET", "/jobs")
    assert headers["Location"].startswith("/login")
    assert admin


def test_without_a_tokens_file_the_login_page_says_how_to_get_in(dtsd_factory):
    node = dtsd_factory(merged(FAST, {"web": {"processes": 1},
                                      "server": {"processes": 1, "anonymous_role": ""},
                                      "worker": {"processes": 0}}))
    visitor = Visitor(node.web_url)
    status, _, headers = visitor.request("GET", "/jobs")
    assert status == 303 and headers["Location"].startswith("/login")
    status, body, _ = visitor.request("GET", "/login")
    assert "tokens_file = /etc/dtsd/tokens" in body and "dtsd token add" in body
    assert 'name="token"' not in body                   # no form to fill in vain


def test_a_local_user_logs_in_with_a_link_from_dtsctl_web_login(node, browser):
    """`dtsctl web-login` as root (admin by `[server] local_roles`): a one-time link that
    asks to confirm, then a session as user:root whose calls are the user's own."""
    result = run_dtsctl("-c", str(node.ini_path), "web-login")
    link = ok(result).strip()
    assert link.startswith(node.web_url + "/login/local/"), link
    assert "user:root" in result.stderr and "admin" in result.stderr

    browser.delete_all_cookies()
    browser.get(link)
    assert "user:root" in one(browser, "main").text
    shoot(browser, "login-local")
    press(browser, "form[action^='/login/local/'] button")
    assert "user:root" in one(browser, ".who").text
    submit_form(browser, node, command="id -u", name="from-the-web")
    job = job_id_from(browser)
    listed = json.loads(ok(node.dtsctl("list", "-o", "json", "--name", "from-the-web",
                                       token=web_token(node, "admin", "admin"))))
    assert [(j["id"], j["submitted_by"]) for j in listed["jobs"]] == [(job, "user:root")]

    # The link works once; a used, made-up or expired code gets nowhere.
    visitor = Visitor(node.web_url)
    path = link[len(node.web_url):]
    status, body, _ = visitor.request("GET", path)
    assert status == 404 and "used, expired or unknown" in body
    status, _, _ = visitor.request("POST", path, {"csrf": visitor.csrf()})
    assert status == 404
    # Only a token the master signed makes a link; a bearer token or a forgery does not.
    for secret in ("dtsdl_eyJ1c2VyIjoicm9vdCJ9.AAAA", "not-a-local-token"):
        request = urllib.request.Request(node.web_url + "/login/local", method="POST",
                                         data=json.dumps({"token": secret}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    # A form post (what a cross-site page could send) is refused before any check.
    status, _, _ = visitor.request("POST", "/login/local", {"token": "x"})
    assert status == 415


def test_a_local_link_needs_the_confirming_form(node):
    """Opening a link does not log in by itself: the POST wants this session's CSRF token,
    so a page that embeds someone's link cannot log a browser in as that someone."""
    link = ok(run_dtsctl("-c", str(node.ini_path), "web-login")).strip()
    path = link[len(node.web_url):]
    visitor = Visitor(node.web_url)
    status, body, _ = visitor.request("GET", path)
    assert status == 200 and "Log in as root" in body
    assert visitor.request("POST", path, {})[0] == 403
    status, _, headers = visitor.request("POST", path, {"csrf": visitor.csrf(path)})
    assert status == 303
    status, body, _ = visitor.request("GET", "/jobs")
    assert status == 200 and "user:root" in body


def test_under_tls_the_cookie_is_secure(dtsd_factory, tmp_path):
    """With [server] tls_cert and tls_key the web UI speaks HTTPS only, and its cookie
    says Secure, so a browser never sends the session over plain HTTP."""
    import functools
    import ssl

    from tests.helpers import DtsdMaster, free_port
    from tests.test_tls import credentials, issue, openssl
    pki = tmp_path / "pki"
    pki.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-days", "2",
            "-subj", "/CN=dtsd test CA", "-out", "ca.pem", cwd=pki)
    issue(pki, "server", "/CN=localhost",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    web_port = free_port()
    config = node_config(tmp_path, tls_cert=str(pki / "server.pem"),
                         tls_key=str(pki / "server.key"))
    config["web"]["listen"] = f"127.0.0.1:{web_port}"
    node = dtsd_factory(config, start=False)
    node.wait_serving = functools.partial(DtsdMaster.wait_serving, node,
                                          credentials=credentials(pki, client_cert=False))
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    url = f"https://127.0.0.1:{web_port}"
    node.web_answers = lambda: urllib.request.urlopen(url + "/healthz", timeout=1,
                                                      context=context).status == 200
    node.start()
    with urllib.request.urlopen(url + "/login", timeout=10, context=context) as reply:
        cookie = reply.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{web_port}/login", timeout=5)


def test_the_job_list_pages_newest_first(node):
    admin = web_token(node, "admin", "admin")
    body = json.dumps({"jobs": [{"command": "true", "name": f"page-{n:02d}",
                                 "run_at": "2099-01-01T00:00:00Z"} for n in range(55)]})
    request = urllib.request.Request(node.web_url + "/api/v1/jobs", data=body.encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {admin}"})
    with urllib.request.urlopen(request, timeout=15) as reply:
        assert reply.status == 200
    visitor = Visitor(node.web_url)
    visitor.login(admin)
    _, first, _ = visitor.request("GET", "/jobs?status=PENDING")
    names = re.findall(r"<td>(page-\d\d)</td>", first)
    assert len(names) == 50
    older = re.search(r'<a href="(/jobs\?[^"]+)">Older jobs', first).group(1)
    assert "status=PENDING" in older                   # the filter goes along
    _, second, _ = visitor.request("GET", older.replace("&amp;", "&"))
    rest = re.findall(r"<td>(page-\d\d)</td>", second)
    assert len(rest) == 5 and not set(rest) & set(names)
    assert set(names) | set(rest) == {f"page-{n:02d}" for n in range(55)}
    assert "Older jobs" not in second and "First page" in second


def test_live_output_outlasts_a_quiet_spell_longer_than_the_keepalive(node):
    """A job silent for longer than the keepalive (15 s) still streams its next line: the
    keepalive must not end the watch (it once did, cancelling the call with its read)."""
    admin = web_token(node, "admin", "admin")
    job = ok(node.dtsctl("submit", "--", "echo before; sleep 17; echo after",
                         token=admin)).strip()
    visitor = Visitor(node.web_url)
    visitor.login(admin)
    seen = []
    with visitor.opener.open(f"{node.web_url}/jobs/{job}/events", timeout=40) as stream:
        for raw in stream:
            line = raw.decode().strip()
            seen.append(line)
            if line.startswith("event: end"):
                break
    text = "".join(json.loads(line[6:]).get("text", "") for line in seen
                   if line.startswith("data: "))
    assert text == "before\nafter\n", seen
    assert ": keepalive" in seen


def test_the_overview_refreshes_itself(node, browser):
    """An operator leaves the overview open: it fetches itself again every 10 s and shows
    what changed, without a reload (the page object stays the same)."""
    admin = web_token(node, "admin", "admin")
    login(browser, node, admin)
    browser.get(node.web_url + "/")
    browser.execute_script("window.marker = 'same page'")

    def succeeded() -> int:
        for item in css(browser, ".counts li"):
            if "SUCCEEDED" in item.text:
                return int(item.text.split()[-1].replace(",", ""))
        raise AssertionError("no SUCCEEDED count")
    before = succeeded()
    ok(node.dtsctl("submit", "--wait", "--", "true", token=admin))
    wait_for(lambda: succeeded() == before + 1, timeout=25, interval=0.5,
             message="the overview to show the new job")
    assert browser.execute_script("return window.marker") == "same page"
    no_console_errors(browser)


def test_labels_select_jobs_and_an_admin_pauses_a_queue_from_the_overview(node, browser):
    admin = web_token(node, "admin", "admin")
    login(browser, node, admin)
    submit_form(browser, node, command="true", name="labelled", labels="team=data, env=prod")
    labelled = job_id_from(browser)
    assert "team=data" in one(browser, ".facts").text
    submit_form(browser, node, command="true", name="plain")
    submit_form(browser, node, command="true", labels="bad key=x")
    assert one(browser, "#e-labels").text, problems(browser)       # the API's word
    browser.get(node.web_url + "/jobs?selector=team%3Ddata")
    assert [a.text for a in css(browser, "table.jobs a.id")] == [labelled]
    browser.get(node.web_url + "/jobs?selector=env!%3Dprod")
    assert labelled not in [a.text for a in css(browser, "table.jobs a.id")]

    browser.get(node.web_url + "/")
    press(browser, "form[action='/queues/default/pause'] button", confirm=True)
    assert "paused" in flash(browser)
    assert "paused" in ok(node.dtsctl("status", token=admin))
    job = ok(node.dtsctl("submit", "--", "true", token=admin)).strip()
    shoot(browser, "overview-paused-queue")
    assert "PENDING" in ok(node.dtsctl("status", job, token=admin))
    press(browser, "form[action='/queues/default/resume'] button")
    assert "resumed" in flash(browser)
    wait_for(lambda: "SUCCEEDED" in ok(node.dtsctl("status", job, token=admin)), timeout=20)
    no_console_errors(browser)


@pytest.mark.parametrize("target", ["//evil.example/x", "/\\evil.example/x",
                                    "/\t/evil.example/x", "https://evil.example/x"])
def test_a_login_never_redirects_off_this_site(node, target):
    """`next` after a login, and `back` after a form, are paths on this site or nothing:
    browsers read `//host`, `/\\host` and `/<tab>/host` as another site."""
    admin = web_token(node, "admin", "admin")
    visitor = Visitor(node.web_url)
    status, _, headers = visitor.request("POST", "/login", {
        "csrf": visitor.csrf(), "token": admin, "next": target})
    assert status == 303 and headers["Location"] == "/", headers.get("Location")
    status, _, headers = visitor.request("POST", "/jobs/bulk", {
        "csrf": visitor.csrf("/jobs"), "action": "cancel", "back": target})
    assert status == 303 and headers["Location"] == "/jobs", headers.get("Location")


def test_sessions_and_links_are_out_of_reach_of_jobs(node):
    """A session file holds a bearer token and a link is a login: both live in a directory
    only the daemon's user may enter, and the key that signs CSRF tokens is 0600."""
    import stat as statmod
    admin = web_token(node, "admin", "admin")
    Visitor(node.web_url).login(admin)
    ok(run_dtsctl("-c", str(node.ini_path), "web-login"))
    directory = node.workdir / "run" / "web"
    assert statmod.S_IMODE(directory.stat().st_mode) == 0o700
    names = sorted(path.name[:2] for path in directory.iterdir())
    assert "s-" in names and "l-" in names and "ke" in names
    for path in directory.iterdir():
        assert statmod.S_IMODE(path.stat().st_mode) == 0o600, path
        assert admin not in path.name                     # named by a hash, not the secret
    # A job (its slot user) cannot list or read them.
    job = ok(node.dtsctl("submit", "--wait", "--", f"ls {directory} 2>&1; cat {directory}/key "
                         "2>&1; true", token=admin))
    assert "Permission denied" in job and "s-" not in job

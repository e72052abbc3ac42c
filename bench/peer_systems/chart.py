"""Draw bench/peers.py's results: jobs/s (median, min-max bars) and host CPU per job.

    python chart.py RESULTS.json OUT.png

Runs in the peers' venv (matplotlib is not one of dtsd's Debian packages).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    results = json.load(open(sys.argv[1], encoding="utf-8"))
    rows = results["summary"]
    labels = [row["system"] for row in rows]
    rates = [row["jobs_per_s"]["median"] for row in rows]
    below = [row["jobs_per_s"]["median"] - row["jobs_per_s"]["min"] for row in rows]
    above = [row["jobs_per_s"]["max"] - row["jobs_per_s"]["median"] for row in rows]
    cpu = [row["cpu_ms_per_job"]["median"] for row in rows]
    colours = ["tab:orange" if row["durable"] else "tab:gray" for row in rows]

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2.2),
                                         sharey=True)
    positions = range(len(rows))
    left.barh(positions, rates, xerr=[below, above], color=colours, capsize=4)
    left.set_yticks(list(positions), labels)
    left.invert_yaxis()
    left.set_xlabel(f"jobs/s (median of {results['settings']['runs']}, bars: min–max)")
    right.barh(positions, cpu, color=colours)
    right.set_xlabel("host CPU per job, ms (median)")
    ends = [rate + extra for rate, extra in zip(rates, above)]  # right of the error bar
    for axis, values, at, fmt in ((left, rates, ends, "{:.0f}"), (right, cpu, cpu, "{:.2f}")):
        for position, value, x in zip(positions, values, at):
            axis.annotate(fmt.format(value), (x, position), xytext=(6, 0),
                          textcoords="offset points", va="center", fontsize=8)
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle(f"{results['settings']['jobs']:,} `sh -c true` jobs, 4 executors "
                    f"(orange: keeps a durable record) — {results['date']}\n"
                    f"{results['machine']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(sys.argv[2], dpi=110)


if __name__ == "__main__":
    main()

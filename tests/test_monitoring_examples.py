"""The monitoring examples (examples/monitoring/): Prometheus alert rules and their unit
tests, the scrape configuration and the Grafana dashboard.

promtool (Debian's `prometheus` package, installed by `make deps`) checks the rules, runs
their unit tests and checks the configuration; it must be there: these tests fail, not
skip, without it. The rules and the dashboard may name only metrics that dtsd exports
(METRICS), used as their type allows.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from dtsd.metrics import FAMILIES

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "monitoring"
RULES = EXAMPLES / "dtsd-alerts.yml"
RULE_TESTS = EXAMPLES / "dtsd-alerts.test.yml"
CONFIG = EXAMPLES / "prometheus.yml"
DASHBOARD = EXAMPLES / "dtsd-dashboard.json"

# Every metric dtsd exports, name -> type.
METRICS: dict[str, str] = FAMILIES

HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# A series name, then its optional {matchers}, then an optional [range].
SELECTOR = re.compile(r"\b(dtsd_[A-Za-z0-9_]*)\s*(\{[^}]*\})?\s*(\[)?")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: it comes with Debian's `prometheus` package "
                    "(`make deps` installs it)")
    return path


def run_promtool(*args: str, cwd: Path) -> str:
    proc = subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def selectors(expr: str) -> Iterator[tuple[str, str, bool]]:
    """(series name, metric name, has a range) for every dtsd_ series the PromQL names:
    crudely, any identifier starting with dtsd_, histogram suffixes stripped."""
    for match in SELECTOR.finditer(expr):
        series, has_range = match[1], match[3] is not None
        metric = series
        for suffix in HISTOGRAM_SERIES:
            base = series.removesuffix(suffix)
            if base != series and METRICS.get(base) == "histogram":
                metric = base
        yield series, metric, has_range


def misuses(expr: str) -> list[str]:
    """What is wrong with the dtsd_ series an expression names: unknown metrics, a
    histogram named without its _bucket/_sum/_count series, a counter or histogram series
    read without a range (they only make sense in rate()/increase())."""
    problems = []
    for series, metric, has_range in selectors(expr):
        kind = METRICS.get(metric)
        if kind is None:
            problems.append(f"{series}: not a dtsd metric")
        elif kind == "histogram" and series == metric:
            problems.append(f"{series}: a histogram; name its _bucket, _sum or _count series")
        elif kind in ("counter", "histogram") and not has_range:
            problems.append(f"{series}: a {kind} read without a range (rate/increase)")
    return problems


def rule_exprs() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule.get("alert") or rule["record"]: rule["expr"]
            for group in doc["groups"] for rule in group["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> Iterator[dict]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold theirs


def dashboard_exprs(dash: dict) -> dict[str, str]:
    """Every PromQL expression of the dashboard, named by where it is: panel targets and
    template variable queries."""
    exprs = {}
    for panel in panels(dash):
        for target in panel.get("targets", []):
            exprs[f"panel {panel['title']!r} target {target['refId']}"] = target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs[f"variable {var['name']}"] = query["query"] if isinstance(query, dict) else query
    return exprs


# --- the alert rules ---------------------------------------------------------------------

def test_rules_pass_promtool_check_rules() -> None:
    out = run_promtool("check", "rules", RULES.name, cwd=EXAMPLES)
    assert "SUCCESS" in out


def test_rules_unit_tests_pass(tmp_path: Path) -> None:
    # In a copy: promtool reads rule_files relative to the test file.
    for path in (RULES, RULE_TESTS):
        shutil.copy(path, tmp_path)
    out = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test_that_makes_it_fire_and_one_quiet_case() -> None:
    alerts = set(rule_exprs())
    fired: set[str] = set()
    quiet = 0
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            if check.get("exp_alerts"):
                fired.add(check["alertname"])
            else:
                quiet += 1
    assert alerts - fired == set(), "alerts that no unit test makes fire"
    assert quiet > 0


def test_rules_have_group_severity_for_and_annotations() -> None:
    doc = yaml.safe_load(RULES.read_text())
    assert [group["name"] for group in doc["groups"]] == ["dtsd"]
    for rule in doc["groups"][0]["rules"]:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert "for" in rule, f"{name}: say its `for:`, even 0m"
        assert set(rule["annotations"]) >= {"summary", "description"}, name


def test_rules_name_only_dtsd_metrics() -> None:
    problems = {name: misuses(expr) for name, expr in rule_exprs().items()}
    assert {name: p for name, p in problems.items() if p} == {}


def test_rules_cover_the_alerts_asked_for() -> None:
    exprs = rule_exprs()
    wanted = {"DtsdJobFailuresRising", "DtsdDeadLettersGrowing", "DtsdNoLeader",
              "DtsdMultipleLeaders", "DtsdQueueWaitHigh", "DtsdChildFlapping",
              "DtsdChildFatal", "DtsdStoreDown", "DtsdTargetDown"}
    assert wanted <= set(exprs)
    assert 'up{job="dtsd"}' in exprs["DtsdTargetDown"]


# --- the Prometheus configuration ---------------------------------------------------------

def test_config_passes_promtool_check_config(tmp_path: Path) -> None:
    for path in (CONFIG, RULES):
        shutil.copy(path, tmp_path)
    out = run_promtool("check", "config", CONFIG.name, cwd=tmp_path)
    assert "1 rule files found" in out


def test_config_with_its_optional_lines_uncommented_passes_too(tmp_path: Path) -> None:
    """The `#key:` lines (HTTPS and a token for a node not on loopback, an Alertmanager) are
    valid once uncommented; promtool wants the files they name to exist."""
    shutil.copy(RULES, tmp_path)
    text = CONFIG.read_text()
    uncommented = re.sub(r"(?m)^(\s*)#(?=\S)", r"\1", text)
    assert "credentials_file:" in uncommented and "scheme: https" in uncommented
    for name in re.findall(r"/etc/prometheus/([\w.-]+)", uncommented):
        (tmp_path / name).write_text("secret\n")
    uncommented = uncommented.replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(uncommented)
    run_promtool("check", "config", "prometheus.yml", cwd=tmp_path)


def test_config_scrapes_job_dtsd_on_the_default_web_address() -> None:
    doc = yaml.safe_load(CONFIG.read_text())
    assert doc["rule_files"] == [RULES.name]
    (job,) = doc["scrape_configs"]
    assert job["job_name"] == "dtsd"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


# --- the Grafana dashboard ----------------------------------------------------------------

def test_dashboard_is_valid_json_with_datasource_and_instance_variables() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    variables = {var["name"]: var for var in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    for panel in panels(dash):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for thing in (panel, *panel["targets"]):
            assert thing["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, \
                panel["title"]


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    dash = dashboard()
    ids = [panel["id"] for panel in panels(dash)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dash):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_names_only_dtsd_metrics() -> None:
    problems = {where: misuses(expr) for where, expr in dashboard_exprs(dashboard()).items()}
    assert {where: p for where, p in problems.items() if p} == {}


def test_dashboard_shows_every_metric() -> None:
    shown = {metric for expr in dashboard_exprs(dashboard()).values()
             for _, metric, _ in selectors(expr)}
    assert set(METRICS) - shown == set(), "metrics that no panel shows"


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses every panel's PromQL (as recording rules, Grafana's variables
    replaced by values)."""
    substitutions = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                     "$job": ".*", "$instance": ".*"}
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs(dashboard()).items()):
        if where.startswith("variable "):
            continue  # label_values() is Grafana's, not PromQL
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    (tmp_path / "dashboard-rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run_promtool("check", "rules", "dashboard-rules.yml", cwd=tmp_path)


def test_the_metric_check_catches_a_wrong_name() -> None:
    assert misuses('rate(dtsd_jobs_failed_total[5m])') == [
        "dtsd_jobs_failed_total: not a dtsd metric"]
    assert misuses('dtsd_job_run_seconds_bucket{le="1"}') == [
        "dtsd_job_run_seconds_bucket: a histogram read without a range (rate/increase)"]
    assert misuses('histogram_quantile(0.5, rate(dtsd_job_run_seconds_bucket[5m]))') == []
    assert misuses('dtsd_jobs{status="RUNNING"} + dtsd_leader') == []


def test_the_debian_package_ships_the_examples() -> None:
    """dh_installexamples installs examples/monitoring/ as
    /usr/share/doc/dtsd/examples/monitoring/ (compat 13 leaves examples uncompressed)."""
    examples = (EXAMPLES.parent.parent / "packaging" / "debian" / "dtsd.examples").read_text()
    assert "examples/monitoring" in examples.split()

"""Check the Grafana dashboard and the Prometheus alert rules (`make deploy-lint`, CI).

- deploy/grafana/prefetch-dashboard.json parses, every panel has a Prometheus query (or is a
  row), and every query names only `prefetch_*` metrics this service exports.
- deploy/prometheus/prefetch-alerts.yaml has the shape Prometheus loads (groups of rules,
  each an alert with an expr, a `for` duration, a severity and a summary), checked here in
  Python so that the check runs anywhere; then `promtool check rules` and `promtool test
  rules prefetch-alerts.test.yaml` (each alert fires on the series that should fire it)
  when promtool is installed (Debian's `prometheus` package). `--promtool required` (CI)
  fails without it.

That the named metrics really appear in a running service's /metrics is
tests/test_deploy_observability.py's job (it starts an API and a worker and scrapes them);
this file's `metric_names` is what both use to read the names.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
DASHBOARD = DEPLOY / "grafana" / "prefetch-dashboard.json"
RULES = HERE / "prefetch-alerts.yaml"
RULE_TESTS = HERE / "prefetch-alerts.test.yaml"

_METRIC = re.compile(r"\bprefetch_[a-zA-Z0-9_]+")
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")
_ALERT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SEVERITIES = ("info", "warning", "critical")
_RULE_FIELDS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}


def metric_names(expr: str) -> set[str]:
    """The `prefetch_*` metric names a PromQL expression reads (label values excepted)."""
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_METRIC.findall(without_strings))


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = []
    for panel in panels:
        found.append(panel)
        found += _panels(panel.get("panels", []))
    return found


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every query of the dashboard; raises ValueError when a panel has none."""
    dashboard = json.loads(path.read_text())
    exprs = []
    for panel in _panels(dashboard.get("panels", [])):
        if panel.get("type") == "row":
            continue
        targets = panel.get("targets") or []
        if not targets or not all(t.get("expr") for t in targets):
            raise ValueError(f"panel {panel.get('title')!r} has no query")
        if (panel.get("datasource") or {}).get("type") != "prometheus":
            raise ValueError(f"panel {panel.get('title')!r} has no Prometheus datasource")
        exprs += [t["expr"] for t in targets]
    return exprs


def rule_exprs(path: Path = RULES) -> list[str]:
    """Every alert's expression."""
    document = yaml.safe_load(path.read_text())
    return [rule["expr"] for group in document["groups"] for rule in group["rules"]]


def rule_problems(document: Any) -> list[str]:
    """What Prometheus would refuse in a rule file (or what our rules must have)."""
    if not isinstance(document, dict) or not isinstance(document.get("groups"), list):
        return ["the file has no `groups:` list"]
    problems = []
    names: set[str] = set()
    for group in document["groups"]:
        name = group.get("name") if isinstance(group, dict) else None
        if not name or not isinstance(group.get("rules"), list) or not group["rules"]:
            problems.append(f"group {name!r} needs a name and a list of rules")
            continue
        for rule in group["rules"]:
            alert = rule.get("alert") if isinstance(rule, dict) else None
            where = f"group {name!r}, rule {alert!r}"
            if not isinstance(alert, str) or not _ALERT_NAME.match(alert):
                problems.append(f"{where}: `alert` must be a metric-like name")
                continue
            if alert in names:
                problems.append(f"{where}: the alert name is used twice")
            names.add(alert)
            unknown = set(rule) - _RULE_FIELDS
            if unknown:
                problems.append(f"{where}: unknown fields {sorted(unknown)}")
            if not isinstance(rule.get("expr"), str) or not rule["expr"].strip():
                problems.append(f"{where}: `expr` must be a PromQL string")
            if not _DURATION.match(str(rule.get("for", ""))):
                problems.append(f"{where}: `for` must be a duration such as 10m")
            if (rule.get("labels") or {}).get("severity") not in _SEVERITIES:
                problems.append(f"{where}: labels.severity must be one of {_SEVERITIES}")
            if not (rule.get("annotations") or {}).get("summary"):
                problems.append(f"{where}: annotations.summary is required")
    return problems


def check(promtool: str) -> list[str]:
    """Every problem found; `promtool`: auto (use it if installed), required, or off."""
    problems = []
    try:
        exprs = dashboard_exprs()
    except (ValueError, KeyError) as exc:
        problems.append(f"{DASHBOARD.name}: {exc}")
        exprs = []
    if exprs and not set().union(*(metric_names(e) for e in exprs)):
        problems.append(f"{DASHBOARD.name}: no query names a prefetch_* metric")
    problems += [f"{RULES.name}: {p}" for p in rule_problems(yaml.safe_load(RULES.read_text()))]
    found = shutil.which("promtool")
    if promtool == "off" or (found is None and promtool == "auto"):
        print("promtool: not run (install Debian's `prometheus` package to run it)")
        return problems
    if found is None:
        return [*problems, "promtool is required (apt-get install prometheus) but not found"]
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        run = subprocess.run([found, *args], capture_output=True, text=True, cwd=HERE)
        print(run.stdout.strip())
        if run.returncode != 0:
            problems.append(f"promtool {' '.join(args[:2])}: {(run.stdout + run.stderr).strip()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--promtool", choices=("auto", "required", "off"), default="auto")
    problems = check(parser.parse_args(argv).promtool)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"ok: {DASHBOARD.relative_to(DEPLOY)} and {RULES.relative_to(DEPLOY)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

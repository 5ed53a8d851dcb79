"""The dashboard and the alert rules read metrics that a running service really exports.

A `prefetch api` and a `prefetch worker` (with its scheduler and health port) run as
processes sharing one multiprocess directory, as in a pod; after a read-through, cache hits,
a completed job and a failed one, both /metrics are scraped. Every `prefetch_*` name that a
dashboard query or an alert expression reads must be a sample there.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
import pytest_asyncio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.engine_support import Engine, EngineProcess, spawn, user, wait_for

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent


def _load_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "prometheus_check", ROOT / "deploy" / "prometheus" / "check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sample_names(text: str) -> set[str]:
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@pytest_asyncio.fixture
async def engine(tmp_path: Path, redis_url: str) -> AsyncIterator[Engine]:
    async with Engine.open(tmp_path, redis_url) as harness:
        yield harness


async def test_every_metric_the_dashboard_and_the_alerts_read_is_exported(
    engine: Engine,
) -> None:
    api_port, health_port = free_port(), free_port()
    common = {
        "PREFETCH_SERVICE_HOST": "127.0.0.1",
        "PREFETCH_HEALTH_PORT": str(health_port),
        "ENABLE_ACTIVITY_BASED": "true",  # the pod's scheduler child writes its files too
        "PREFETCH_WORKER_COUNT": "1",
    }
    await engine.start_worker(**common)
    env = engine.env(**common, PREFETCH_SERVICE_PORT=str(api_port))
    api: EngineProcess = spawn("api", env, engine.tmp_path / "api.log")
    engine.processes.append(api)
    base = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": "Bearer sandbox-service"}

    async def answers() -> bool:
        try:
            async with engine.http.get(f"{base}/health/ready") as rsp:
                return rsp.status == 200
        except OSError:
            return False

    await wait_for(answers, 20, "the API to answer")
    reader, scheduled, failing = user(), user(), user("0000dead-")
    for path in (reader, reader, reader):  # a read-through, then hits
        async with engine.http.get(f"{base}/api/cache/{path}", headers=auth) as rsp:
            assert rsp.status == 200
    for target in (scheduled, failing):
        async with engine.http.post(
            f"{base}/api/prefetch/schedule/{target}", headers=auth, json={"priority": "high"}
        ) as rsp:
            assert rsp.status == 202

    async def jobs_done() -> bool:
        async with engine.http.get(f"{base}/api/prefetch/queue/stats", headers=auth) as rsp:
            data = (await rsp.json())["data"]
            return bool(data["completed"] >= 1 and data["failed"] >= 1)

    await wait_for(jobs_done, 30, "one completed and one failed job")

    async def scraped() -> set[str]:
        names = set()
        for url in (f"{base}/metrics", f"http://127.0.0.1:{health_port}/metrics"):
            async with engine.http.get(url) as rsp:
                assert rsp.status == 200
                names |= sample_names(await rsp.text())
        return names

    names = await scraped()
    wanted = {
        name
        for expr in check.dashboard_exprs() + check.rule_exprs()
        for name in check.metric_names(expr)
    }
    assert len(wanted) >= 15
    assert sorted(wanted - names) == []
    # The queue's depth is the API's; the pod's files are summed by both endpoints.
    assert "prefetch_queue_depth" in names and "prefetch_jobs_in_flight" in names


def test_the_dashboard_parses_and_every_panel_queries_prometheus() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "prefetch-dashboard.json").read_text())
    assert dashboard["uid"] == "exprsn-prefetch"
    exprs = check.dashboard_exprs()
    assert len(exprs) >= 20
    titles = {panel["title"] for panel in dashboard["panels"]}
    for expected in (
        "Timeline read latency",
        "Hit rate by tier",
        "Prefetch operations by origin and outcome",
        "Queue depth",
        "Upstream errors by kind",
        "Usefulness: precision by origin",
    ):
        assert expected in titles


def test_the_rule_check_finds_what_prometheus_would_refuse() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prefetch-alerts.yaml").read_text())
    assert check.rule_problems(rules) == []
    broken = json.loads(json.dumps(rules))
    first = broken["groups"][0]["rules"][0]
    first["for"] = "ten minutes"
    first["labels"] = {}
    first["exprr"] = first.pop("expr")
    broken["groups"][0]["rules"].append(dict(broken["groups"][0]["rules"][1]))
    problems = " | ".join(check.rule_problems(broken))
    for expected in ("`for` must be", "labels.severity", "unknown fields", "`expr` must", "twice"):
        assert expected in problems
    assert check.rule_problems({"group": []}) == ["the file has no `groups:` list"]


def test_metric_names_skip_label_values() -> None:
    expr = 'sum(rate(prefetch_http_requests_total{route="/x",job="prefetch_api"}[5m]))'
    assert check.metric_names(expr) == {"prefetch_http_requests_total"}

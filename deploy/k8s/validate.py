"""Validate every manifest of deploy/k8s, offline (`make deploy-lint`, CI).

1. Schemas. Built-in kinds against the Kubernetes OpenAPI schemas that the kubernetes-validate
   wheel ships, in strict mode (an unknown field is an error), for the oldest and the newest
   Kubernetes versions below. KEDA's ScaledObject against KEDA's CRD schema, through the
   validators that the npm package @kubernetes-models/keda compiles from it (pinned in
   deploy/k8s/keda/package-lock.json; node runs them). A kind with no schema fails the run:
   nothing is skipped.
2. The deployment's own rules, which no schema knows: the settings in the ConfigMap and
   Secret load (engine.settings.load_settings); every container has requests, a memory limit,
   a readiness and a liveness probe on a port it declares; the API listens on
   PREFETCH_SERVICE_PORT and the worker's probes use PREFETCH_HEALTH_PORT;
   terminationGracePeriodSeconds is longer than PREFETCH_SHUTDOWN_TIMEOUT; the Prometheus
   multiprocess directory is an emptyDir; the pods' scrape annotations name the port that
   serves /metrics; the KEDA triggers watch every Dramatiq queue list in
   the queue DB of the ConfigMap's Redis; HPA, PDB, Service and ScaledObject each select or
   target a Deployment that exists; kustomization.yaml lists every manifest.

Exit 0 with one line per resource when all is well, 1 with the problems otherwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from engine.broker import dramatiq_layout as layout  # noqa: E402 - after the path is set
from engine.broker.jobs import QUEUES  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402

KUBERNETES_VERSIONS = ("1.28.0", "1.37.0")
KEDA_DIR = HERE / "keda"

Doc = dict[str, Any]


def load(directory: Path) -> list[tuple[str, Doc]]:
    """(file name, document) of every manifest, kustomization.yaml excepted."""
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def schema_problems(docs: list[tuple[str, Doc]], verbose: bool = True) -> list[str]:
    problems: list[str] = []
    keda: list[dict[str, Any]] = []
    for name, doc in docs:
        if doc.get("apiVersion", "").startswith("keda.sh/"):
            keda.append({"file": name, "doc": doc})
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                problems.append(f"{name}: {doc.get('kind')} (k8s {version}): {path}: {exc.message}")
            except (
                kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError,
            ):
                problems.append(f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
                break
        else:
            if verbose:
                print(
                    f"{name}: {doc['kind']} {doc['metadata']['name']}: valid (k8s "
                    f"{', '.join(KUBERNETES_VERSIONS)}, strict)"
                )
    if keda:
        problems += keda_problems(keda, verbose)
    return problems


def keda_problems(items: list[dict[str, Any]], verbose: bool = True) -> list[str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return ["node and npm are needed to check KEDA resources against KEDA's schema"]
    if not (KEDA_DIR / "node_modules" / "@kubernetes-models" / "keda").is_dir():
        install = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=KEDA_DIR,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if install.returncode != 0:
            return [f"npm ci in {KEDA_DIR} failed: {install.stderr.strip()[-500:]}"]
    result = subprocess.run(
        [node, "validate.mjs"],
        cwd=KEDA_DIR,
        input=json.dumps(items),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0:
        if verbose:
            print("\n".join(lines))
        return []
    return [line for line in lines if not line.endswith("(KEDA schema)")] or [
        f"node validate.mjs failed: {result.stderr.strip()[-500:]}"
    ]


# --- the deployment's own rules --------------------------------------------------------------


def by_kind(docs: list[tuple[str, Doc]], kind: str) -> list[Doc]:
    return [doc for _, doc in docs if doc.get("kind") == kind]


def rule_problems(docs: list[tuple[str, Doc]], kustomization: Doc, files: list[str]) -> list[str]:
    problems: list[str] = []
    config: dict[str, str] = {}
    for doc in by_kind(docs, "ConfigMap"):
        config.update(doc.get("data", {}))
    secrets: dict[str, str] = {}
    for doc in by_kind(docs, "Secret"):
        secrets.update(doc.get("stringData", {}))
    try:
        settings = load_settings({**config, **secrets})
    except ConfigError as exc:
        return [f"configmap/secret: the settings do not load: {exc}"]

    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if grace * 1000 <= settings.prefetch_shutdown_timeout_ms:
            problems.append(
                f"{name}: terminationGracePeriodSeconds {grace} s is not longer than "
                f"PREFETCH_SHUTDOWN_TIMEOUT {settings.prefetch_shutdown_timeout_ms} ms"
            )
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            resources = container.get("resources", {})
            if not resources.get("requests", {}).get("memory") or not resources.get(
                "requests", {}
            ).get("cpu"):
                problems.append(f"{where}: no CPU and memory requests")
            if not resources.get("limits", {}).get("memory"):
                problems.append(f"{where}: no memory limit")
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            if mounts.get(settings.metrics_dir) not in empty_dirs:
                problems.append(f"{where}: PREFETCH_METRICS_DIR is not on an emptyDir")
            role = container.get("args", ["api"])[0]
            expected = {"api": settings.service_port, "worker": settings.health_port}.get(role)
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    problems.append(f"{where}: no {kind}")
                    continue
                port = probe.get("httpGet", {}).get("port")
                number = ports.get(port) if isinstance(port, str) else port
                if number is None:
                    problems.append(f"{where}: {kind} uses port {port!r}, not declared")
                elif expected is not None and number != expected:
                    problems.append(
                        f"{where}: {kind} on {number}, the {role} listens on {expected}"
                    )
            # Prometheus scrapes the pod where its annotations say: the port serving /metrics.
            annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
            scraped = annotations.get("prometheus.io/port")
            if annotations.get("prometheus.io/scrape") != "true":
                problems.append(f"{where}: no prometheus.io/scrape annotation")
            elif expected is not None and scraped != str(expected):
                problems.append(
                    f"{where}: prometheus.io/port {scraped!r}, /metrics is on {expected}"
                )

    def selects(selector: dict[str, str]) -> list[str]:
        return [
            n
            for n, d in deployments.items()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]

    for doc in by_kind(docs, "Service"):
        if not selects(doc["spec"]["selector"]):
            problems.append(f"service {doc['metadata']['name']}: selects no Deployment's pods")
    for doc in by_kind(docs, "PodDisruptionBudget"):
        if not selects(doc["spec"]["selector"]["matchLabels"]):
            problems.append(f"pdb {doc['metadata']['name']}: selects no Deployment's pods")
    for doc in by_kind(docs, "HorizontalPodAutoscaler"):
        if doc["spec"]["scaleTargetRef"]["name"] not in deployments:
            problems.append(f"hpa {doc['metadata']['name']}: targets no Deployment")

    queue_lists = {layout.queue_key(queue) for queue in QUEUES.values()}
    queue_redis = _queue_location(config, settings)
    for doc in by_kind(docs, "ScaledObject"):
        name = doc["metadata"]["name"]
        if doc["spec"]["scaleTargetRef"]["name"] not in deployments:
            problems.append(f"scaledobject {name}: targets no Deployment")
        watched = set()
        for trigger in doc["spec"]["triggers"]:
            meta = trigger.get("metadata", {})
            watched.add(meta.get("listName"))
            for field, (value, source) in queue_redis.items():
                if meta.get(field) != value:
                    problems.append(
                        f"scaledobject {name}: trigger {field} {meta.get(field)!r}, "
                        f"{source} says {value!r}"
                    )
        if watched != queue_lists:
            problems.append(
                f"scaledobject {name}: watches {sorted(watched)}, the queues are "
                f"{sorted(queue_lists)}"
            )

    listed = set(kustomization.get("resources", []))
    if listed != set(files):
        problems.append(f"kustomization.yaml lists {sorted(listed)}, the files are {sorted(files)}")
    return problems


def _queue_location(config: dict[str, str], settings: Settings) -> dict[str, tuple[str, str]]:
    """Where the queue lists live (what KEDA must watch): BROKER_URL's host, port and DB when
    it is set, else the cache's REDIS_HOST, REDIS_PORT and REDIS_DB_QUEUE; with the source."""
    if settings.broker_url:
        parts = urlsplit(settings.broker_url)
        db = parts.path.strip("/") or str(settings.db_queue)
        source = "the Secret's BROKER_URL"
        return {
            "host": (parts.hostname or "", source),
            "port": (str(parts.port or 6379), source),
            "databaseIndex": (db, source),
        }
    return {
        "host": (config.get("REDIS_HOST", ""), "the ConfigMap"),
        "port": (config.get("REDIS_PORT", ""), "the ConfigMap"),
        "databaseIndex": (str(settings.db_queue), "the ConfigMap"),
    }


# --- self-test: each kind of mistake must be caught ---------------------------------------


def _find(docs: list[tuple[str, Doc]], kind: str, name: str) -> Doc:
    return next(d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _container(docs: list[tuple[str, Doc]], name: str) -> Doc:
    container: Doc = _find(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
    return container


MISTAKES: dict[str, tuple[Any, str]] = {
    # what is broken: (how, a fragment of the problem it must cause)
    "a misspelt field": (
        lambda d: _container(d, "prefetch-api").update(readinesProbe={}),
        "readinesProbe",
    ),
    "a wrong type": (
        lambda d: _find(d, "Deployment", "prefetch-worker")["spec"].update(replicas="two"),
        "replicas",
    ),
    "a KEDA field of the wrong type": (
        lambda d: _find(d, "ScaledObject", "prefetch-worker")["spec"].update(minReplicaCount="two"),
        "minReplicaCount must be integer",
    ),
    "a KEDA trigger without metadata": (
        lambda d: _find(d, "ScaledObject", "prefetch-worker")["spec"]["triggers"][0].pop(
            "metadata"
        ),
        "required property metadata",
    ),
    "a grace period shorter than the drain": (
        lambda d: _find(d, "Deployment", "prefetch-worker")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=20
        ),
        "terminationGracePeriodSeconds 20",
    ),
    "no readiness probe": (
        lambda d: _container(d, "prefetch-worker").pop("readinessProbe"),
        "no readinessProbe",
    ),
    "a probe on the wrong port": (
        lambda d: _container(d, "prefetch-worker")["livenessProbe"]["httpGet"].update(port=3005),
        "livenessProbe on 3005",
    ),
    "no memory limit": (
        lambda d: _container(d, "prefetch-api")["resources"]["limits"].pop("memory"),
        "no memory limit",
    ),
    "metrics not on an emptyDir": (
        lambda d: _container(d, "prefetch-api")["volumeMounts"].pop(0),
        "not on an emptyDir",
    ),
    "a queue list KEDA does not watch": (
        lambda d: _find(d, "ScaledObject", "prefetch-worker")["spec"]["triggers"].pop(),
        "the queues are",
    ),
    "KEDA on another Redis DB": (
        lambda d: _find(d, "ScaledObject", "prefetch-worker")["spec"]["triggers"][0][
            "metadata"
        ].update(databaseIndex="0"),
        "databaseIndex",
    ),
    "a malformed setting": (
        lambda d: _find(d, "ConfigMap", "prefetch-config")["data"].update(
            PREFETCH_HEALTH_PORT="http"
        ),
        "PREFETCH_HEALTH_PORT",
    ),
    "the queue moved to BROKER_URL, KEDA still on the cache's Redis": (
        lambda d: _find(d, "Secret", "prefetch-secrets")["stringData"].update(
            BROKER_URL="redis://queue.example:6380/4"
        ),
        "the Secret's BROKER_URL says 'queue.example'",
    ),
    "a Redis Cluster without BROKER_URL": (
        lambda d: _find(d, "ConfigMap", "prefetch-config")["data"].update(
            REDIS_CLUSTER_MODE="true"
        ),
        "needs BROKER_URL",
    ),
    "metrics scraped on the wrong port": (
        lambda d: _find(d, "Deployment", "prefetch-worker")["spec"]["template"]["metadata"][
            "annotations"
        ].update({"prometheus.io/port": "3005"}),
        "/metrics is on 3006",
    ),
    "a PDB selecting nothing": (
        lambda d: _find(d, "PodDisruptionBudget", "prefetch-api")["spec"]["selector"][
            "matchLabels"
        ].update(tier="x"),
        "selects no Deployment",
    ),
}


def self_test(docs: list[tuple[str, Doc]], kustomization: Doc, files: list[str]) -> list[str]:
    """Each mistake of MISTAKES, made in a copy of the manifests, must be reported."""
    failures = []
    for what, (mistake, fragment) in MISTAKES.items():
        broken = json.loads(json.dumps(docs))
        mistake(broken)
        problems = schema_problems(broken, verbose=False)
        try:
            problems += rule_problems(broken, kustomization, files)
        except (KeyError, TypeError, AttributeError) as exc:
            problems.append(f"rules not checkable: {exc!r}")
        if any(fragment in problem for problem in problems):
            print(f"self-test: {what}: caught")
        else:
            failures.append(f"self-test: {what}: not caught (problems: {problems})")
    untouched = rule_problems(docs, kustomization, files[:-1])
    if not any("kustomization.yaml lists" in p for p in untouched):
        failures.append("self-test: a manifest missing from kustomization.yaml: not caught")
    return failures


def main() -> int:
    docs = load(HERE)
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    files = sorted(p.name for p in HERE.glob("*.yaml") if p.name != "kustomization.yaml")
    problems = schema_problems(docs)
    try:
        problems += rule_problems(docs, kustomization, files)
    except (KeyError, TypeError, AttributeError) as exc:  # malformed: the schemas said why
        problems.append(f"the deployment rules could not be checked: {exc!r}")
    if "--self-test" in sys.argv[1:]:
        problems += self_test(docs, kustomization, files)
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"k8s manifests: {len(docs)} resources in {len(files)} files, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Grafana dashboard: generated from monitoring/dashboard.py, portable, and asking only for metrics that exist."""

import json
import re
import types

from controller.config import ControllerConfig
from controller.metrics import ControllerMetrics
from controller.replicas import Outage
from controller.service import ControllerServicer
from monitoring import dashboard
from services.metrics import DeviceMemoryCollector, ServiceMetrics
from services.registry import SERVICES
from tests.support.metrics import PPO_STATS, fake_cuda
from tests.support.servers import service_config

ROWS = ["Training progress", "Phase timing", "Service health and latency", "Per-service throughput"]


def committed() -> dict:
    return json.loads(dashboard.OUTPUT.read_text())


def test_committed_json_is_what_the_generator_builds():
    assert dashboard.OUTPUT.read_text() == dashboard.render(), "run `python -m monitoring.dashboard` and commit the JSON"


def datasource_refs(node):
    """Every value of a `datasource` key in the JSON tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_dashboard_is_portable_and_current():
    d = committed()
    assert d["schemaVersion"] >= 41 and d["uid"] == "rlhf-mesh"
    variables = d["templating"]["list"]
    assert [(v["name"], v["type"], v["query"]) for v in variables] == [("datasource", "datasource", "prometheus")]
    refs = list(datasource_refs(d))
    assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), refs
    assert "__inputs" not in d  # nothing to map on import


def test_rows_and_panels_are_laid_out_with_descriptions():
    panels = committed()["panels"]
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["description"] and p["targets"] and p["fieldConfig"]["defaults"]["unit"], p["title"]
            assert all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]


def exported_names() -> set[str]:
    """Sample names the services and the controller export (after some activity)."""
    registries = []
    for role in ("policy", "reward"):
        servicer = SERVICES[role][0](service_config(role, "unused"))
        registries.append(ServiceMetrics(servicer).registry)
        servicer.executor.shutdown()
    controller = ControllerMetrics()
    pools = {"reward": types.SimpleNamespace(serving=lambda: ["a"], channels={"a": 0, "b": 0})}
    cfg = ControllerConfig.model_validate({"run_id": "r", "data": {"prompts": "unused"}, "ppo": {"total_steps": 1}})
    ControllerServicer(cfg, metrics=controller).clients = types.SimpleNamespace(pools=pools, outage=Outage())
    controller.observe_step(PPO_STATS)
    registries.append(controller.registry)
    gpu = DeviceMemoryCollector("policy", "cuda:0")
    gpu._cuda = fake_cuda()
    names = {s.name for family in gpu.collect() for s in family.samples}
    for registry in registries:
        names |= {s.name for family in registry.collect() for s in family.samples}
    return names


def test_every_queried_metric_is_exported():
    known = exported_names() | {"grpc_server_handled_total", "grpc_server_handling_seconds_bucket"}  # first RPC
    queried = set()
    for p in committed()["panels"]:
        for t in p.get("targets", []):
            queried |= set(re.findall(r"\b((?:rlhf|grpc|process)_[a-z0-9_]+)\b", t["expr"]))
    missing = queried - known - {"grpc_code", "grpc_method", "grpc_service"}  # label names
    assert not missing, missing

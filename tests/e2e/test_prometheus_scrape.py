"""A real Prometheus scrapes a short PPO run of all five processes; promtool checks their expositions.

Prometheus and promtool come from Debian's `prometheus` package: on PATH, or
installed here with apt-get; the test skips (saying why) only where that fails.
"""

import asyncio
import contextlib
import json
import math
import pathlib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

from controller.config import ControllerConfig
from controller.metrics import ControllerMetrics
from controller.service import run_controller
from monitoring.dashboard import OUTPUT as DASHBOARD
from services.launcher import LocalMesh, free_port
from tests.support import ROOT
from tests.support.data import write_pairs, write_prompts
from tests.support.mesh import ROLES, service_configs
from tests.support.prometheus import PROMETHEUS_DIR, promtool
from training import synthetic

STEPS = 3
# The test's services run on CPU, so device-memory series cannot exist; tests/unit/test_metric_definitions.py covers them.
GPU_ONLY = ("rlhf_device_memory_",)


def scrape_config(targets: dict[str, str]) -> dict:
    """The example prometheus.yml pointed at `targets` (role -> host:port), scraping every second."""
    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(PROMETHEUS_DIR / "alerts.yml")]
    for job in cfg["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"].removeprefix("rlhf-")]]}]
    return cfg


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.load(reply)


@contextlib.contextmanager
def prometheus_server(tools, targets: dict[str, str], work: pathlib.Path):
    """A Prometheus on a free loopback port with a temporary storage dir; yields its base URL."""
    work.mkdir(parents=True, exist_ok=True)
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets)))
    base = f"http://127.0.0.1:{free_port()}"
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen([tools["prometheus"], f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address={base.removeprefix('http://')}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
            with contextlib.suppress(OSError, urllib.error.URLError):
                if urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200:
                    break
            assert time.monotonic() < deadline, "Prometheus not ready after 30s"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def query(base: str, expr: str) -> list:
    body = get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def wait_for(base: str, expr: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not query(base, expr):
        assert time.monotonic() < deadline, f"no data for {expr} after {timeout:.0f}s"
        time.sleep(0.5)


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target in the committed dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


def controller_config(mesh: LocalMesh, work: pathlib.Path, metrics_port: int) -> ControllerConfig:
    prompts = write_prompts(work / "prompts.jsonl", synthetic.train_prompts(16, seed=1))
    pairs = write_pairs(work / "pairs.jsonl", synthetic.preference_pairs(16, seed=2))
    return ControllerConfig.model_validate({
        "run_id": "prometheus", "services": mesh.endpoints, "output_dir": str(work / "run"), "save_checkpoint": None,
        "data": {"prompts": str(prompts)}, "evaluation": {"pairs": str(pairs), "every": 1, "max_pairs": 16},
        "server": {"host": "127.0.0.1", "port": free_port(), "metrics_port": metrics_port},
        "ready_timeout_seconds": 300,
        "ppo": {"total_steps": STEPS, "batch_size": 8, "minibatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 8},
    })


def check_exposition(tools, url: str) -> str | None:
    """promtool's complaint about the /metrics text at `url`, or None."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        checked = promtool(tools, "check", "metrics", stdin=reply.read().decode())
    return None if checked.returncode == 0 else f"{url}: {checked.stdout}{checked.stderr}"


def has_data(result: list) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tools, tiny_dirs, tmp_path):
    controller_port = free_port()
    mesh = LocalMesh(tmp_path / "services", service_configs(tiny_dirs, grace_seconds=2), metrics_ports={role: 0 for role in ROLES})
    targets = dict(mesh.metrics_endpoints, controller=f"127.0.0.1:{controller_port}")
    metrics = ControllerMetrics()
    with mesh, prometheus_server(tools, targets, tmp_path / "prometheus") as base:
        asyncio.run(mesh.wait_ready(300))
        metrics.serve("127.0.0.1", controller_port)  # up before the run, so that rates span it
        try:
            wait_for(base, "rlhf_steps_total == 0")
            asyncio.run(run_controller(controller_config(mesh, tmp_path, controller_port), metrics=metrics))
            wait_for(base, f"rlhf_steps_total >= {STEPS}")
            time.sleep(2.5)  # two more scrapes of every target, after the last step
            complaints = [c for c in (check_exposition(tools, f"http://{t}/metrics") for t in targets.values()) if c]
            assert not complaints, complaints
            up = {s["metric"]["job"]: s["value"][1] for s in query(base, "up")}
            assert up == {f"rlhf-{role}": "1" for role in targets}, up
            empty = []
            for title, expr in dashboard_targets():
                if not any(prefix in expr for prefix in GPU_ONLY):
                    if not has_data(query(base, expr.replace("$__rate_interval", "2m"))):
                        empty.append(f"{title}: {expr}")
            assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
            rules = [r for g in get_json(f"{base}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            written = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
            names = sorted(rule["alert"] for group in written["groups"] for rule in group["rules"])
            assert sorted(r["name"] for r in rules) == names and all(r["health"] == "ok" for r in rules), rules
        finally:
            metrics.close()

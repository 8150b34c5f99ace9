"""The Helm chart rendered by Helm's own engine (scripts/render_k8s.py), and helpers to read its objects."""

import importlib.util
import pathlib
import shutil
import sys

import pytest
import yaml

from tests.support import ROOT

CHART = ROOT / "helm" / "rlhf"
KUBE_VERSION = "1.34"
MODEL_SERVICES = ("policy", "reference", "reward", "value")
PORTS = {"controller": (50050, 9400), "policy": (50051, 9401), "reference": (50052, 9402),
         "reward": (50053, 9403), "value": (50054, 9404)}
EMPTY_KUBECONFIG = "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"

_spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts" / "render_k8s.py")
render_k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_k8s)


def values_file(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / name).read_text())


VALUE_SETS = {
    "default": None,
    "gpu-opt": values_file("values-gpu-opt.yaml"),
    "cpu": values_file("values-cpu.yaml"),
}


def render(values: dict | None = None) -> list[dict]:
    """Every object of the chart for `values` (release rlhf, namespace rlhf)."""
    return render_k8s.objects(render_k8s.render(values))


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> list[dict]:
    """Every object of the chart for one values set of examples/ (and the defaults)."""
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")
    return render(VALUE_SETS[request.param])


@pytest.fixture(scope="module")
def gpu_chart() -> list[dict]:
    """Every object of the chart for examples/values-gpu-opt.yaml (monitoring and training Jobs on)."""
    pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")
    return render(VALUE_SETS["gpu-opt"])


def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(name, pod spec) of every workload's template and every bare Pod (helm test)."""
    specs = [(o["metadata"]["name"], o["spec"]["template"]["spec"]) for o in workloads(objs)]
    return specs + [(o["metadata"]["name"], o["spec"]) for o in objs if o["kind"] == "Pod"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def component_of(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def env_of(container: dict) -> dict[str, dict]:
    """A container's environment variables by name."""
    return {e["name"]: e for e in container.get("env", [])}


def tool(name: str) -> str:
    """The path of a command-line tool of the test extra (beside this Python, or on PATH); skips without it."""
    path = pathlib.Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (the test extra installs it)")
    return found


def volume_mounts(spec: dict) -> dict[str, tuple[dict, dict]]:
    """The main container's mounts by path: (mount, the pod volume it mounts)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in spec["containers"][0].get("volumeMounts", [])}


# --- NetworkPolicy, evaluated as the API defines it (enough for the chart's rules) -------------

def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector picks an object with `labels` (an empty selector picks everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {"In": present and value in expr.get("values", []),
              "NotIn": not present or value not in expr.get("values", []),
              "Exists": present, "DoesNotExist": not present}[expr["operator"]]
        if not ok:
            return False
    return True


def peer_admits(peer: dict, client_labels: dict, client_namespace: str, namespace: str,
                namespace_labels: dict) -> bool:
    """Whether one `from` entry (podSelector and/or namespaceSelector) covers the client pod."""
    if "namespaceSelector" in peer:
        labels = {**namespace_labels, "kubernetes.io/metadata.name": client_namespace}
        in_namespace = selects(peer["namespaceSelector"], labels)
    else:
        in_namespace = client_namespace == namespace  # a bare podSelector means the policy's namespace
    return in_namespace and selects(peer.get("podSelector", {}), client_labels)


def admits(policies: list[dict], pod: dict, port: str, client_labels: dict, client_namespace: str = "rlhf",
           namespace: str = "rlhf", namespace_labels: dict | None = None) -> bool:
    """Whether a client pod may open `port` (a container port name) on `pod` (a pod template) under `policies`.

    The client runs in `client_namespace`, labelled `namespace_labels` besides kubernetes.io/metadata.name.
    """
    chosen = [p["spec"] for p in policies if selects(p["spec"]["podSelector"], pod["metadata"]["labels"])]
    if not chosen:
        return True  # no policy selects the pod: ingress is open
    for spec in chosen:
        for rule in spec.get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            if "from" not in rule or any(peer_admits(peer, client_labels, client_namespace, namespace,
                                                     namespace_labels or {}) for peer in rule["from"]):
                return True
    return False

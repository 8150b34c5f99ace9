"""The Helm chart, the plain manifests and the image recipe, checked without a cluster.

The chart is rendered by Helm's own engine (helm-python-sdk embeds Helm's Go
SDK), linted by Helm, and every object is validated against the Kubernetes
JSON schemas (kubernetes-validate). The Prometheus Operator objects, which
those schemas do not cover, are checked field by field.
"""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

from controller.config import load_controller_config  # noqa: E402
from services.config import load_service_config  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "rlhf"
KUBE_VERSION = "1.34"
MODEL_SERVICES = ("policy", "reference", "reward", "value")
PORTS = {"controller": (50050, 9400), "policy": (50051, 9401), "reference": (50052, 9402),
         "reward": (50053, 9403), "value": (50054, 9404)}

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


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> list[dict]:
    """Every object of the chart for one values set (release rlhf, namespace rlhf)."""
    return render_k8s.objects(render_k8s.render(VALUE_SETS[request.param]))


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render_k8s.objects(render_k8s.render(VALUE_SETS["gpu-opt"]))


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


# --- Helm: lint, schema, notes -----------------------------------------------------

@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_finds_nothing_but_the_missing_icon(name):
    report = helm_python.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert problems == []


@pytest.mark.parametrize("values, where, why", [
    ({"policy": {"replicaCount": "two"}}, "/policy/replicaCount", "got string, want integer"),
    ({"reward": {"model": {"source": "s3://bucket/rm"}}}, "/reward/model/source", "does not match pattern"),
    ({"value": {"config": {"training": {"learning_rate": "fast"}}}}, "/value/config/training/learning_rate",
     "got string, want number"),
    ({"controller": {"config": {"ppo": {"kl_estimator": "k9"}}}}, "/controller/config/ppo/kl_estimator",
     "value must be one of 'k1', 'k2', 'k3'"),
    ({"policy": {"config": {"server": {"port": 1234}}}}, "/policy/config/server", "'port' not allowed"),
    ({"policy": {"replicas": 2}}, "/policy", "'replicas' not allowed"),
    ({"reference": {"resources": {"limits": {"nvidia.com/gpu": "one"}}}},
     "/reference/resources/limits/nvidia.com~1gpu", "does not match pattern"),
])
def test_a_wrong_value_fails_the_install_naming_the_key(values, where, why):
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError) as error:
            chart.render(values, name="rlhf")
    message = str(error.value)
    assert where in message and why in message, message


def test_config_section_schema_is_generated_from_the_pydantic_models():
    schema = json.loads((CHART / "values.schema.json").read_text())
    training = schema["$defs"]["cfg.TrainingConfig"]["properties"]
    assert training["zero_stage"] == {"default": 0, "description": "DeepSpeed ZeRO stage", "maximum": 3,
                                      "minimum": 0, "type": "integer"}
    assert "path" not in schema["$defs"]["cfg.ModelConfig"]["properties"]  # the chart sets it from model.source


def test_install_notes_say_how_to_reach_the_reward_service_and_grafana():
    with helm_python.Config(storage_driver="memory", kubeconfig_content=EMPTY_KUBECONFIG) as cfg:
        release = cfg.install(CHART, "rlhf", VALUE_SETS["gpu-opt"], namespace="rlhf", dry_run="client")
    notes = release["notes"]
    assert "rlhf-reward.rlhf.svc.cluster.local:50053" in notes
    assert "kubectl port-forward -n rlhf svc/rlhf-reward 50053:50053" in notes
    assert "kubectl port-forward -n monitoring svc/kube-prometheus-stack-grafana 3000:80" in notes
    assert "/d/rlhf-mesh" in notes and "helm test rlhf" in notes


EMPTY_KUBECONFIG = "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"


# --- every object -----------------------------------------------------------------------

def test_every_object_is_valid_kubernetes(rendered):
    for obj in rendered:
        if render_k8s.is_monitoring(obj):
            continue  # CRDs: test_prometheus_operator_objects
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("values", [
    {"controller": {"replicaCount": 0}, "value": {"enabled": False}, "networkPolicy": {"enabled": True}},
    {"checkpoints": {"enabled": False}, "huggingface": {"tokenSecret": "hf", "cacheClaim": "hf-cache", "offline": True}},
    {"checkpoints": {"existingClaim": "shared"}, "imagePullSecrets": [{"name": "regcred"}], "fullnameOverride": "mesh",
     "reward": {"nodeSelector": {"gpu": "a100"}, "affinity": {"podAntiAffinity": {}}, "image": {"tag": "dev"},
                "service": {"type": "LoadBalancer"}, "extraVolumes": [{"name": "x", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "x", "mountPath": "/x"}], "env": [{"name": "A", "value": "1"}]}},
], ids=["services-only", "no-checkpoints", "overrides"])
def test_optional_settings_render_valid_objects(values):
    objs = render_k8s.objects(render_k8s.render(values))
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    if values.get("controller"):
        assert not [name for _, name in kinds if "controller" in name]
        assert not [name for _, name in kinds if name.startswith("rlhf-value")]
    if values.get("fullnameOverride"):
        reward = by_kind(objs, "Deployment")["mesh-reward"]["spec"]["template"]["spec"]
        assert reward["containers"][0]["image"] == "ghcr.io/rlhf-mesh/rlhf-mesh:dev"
        assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "shared"}} in \
            by_kind(objs, "StatefulSet")["mesh-policy"]["spec"]["template"]["spec"]["volumes"]
        assert ("PersistentVolumeClaim", "mesh-checkpoints") not in kinds


def test_every_object_has_the_standard_labels(rendered):
    for obj in rendered:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "rlhf"
        assert labels["app.kubernetes.io/instance"] == "rlhf"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "rlhf-mesh"
        assert labels["helm.sh/chart"] == "rlhf-0.1.0"
    per_component = [o for o in rendered if o["kind"] in ("Deployment", "StatefulSet", "Job", "Service")]
    for obj in per_component:
        assert component_of(obj) in (*MODEL_SERVICES, "controller", "sft", "train-rm")


def test_configmaps_load_with_the_schema_the_cli_reads(rendered, tmp_path):
    configmaps = by_kind(rendered, "ConfigMap")
    for role in MODEL_SERVICES:
        path = tmp_path / f"{role}.yaml"
        path.write_text(configmaps[f"rlhf-{role}"]["data"][f"{role}.yaml"])
        cfg = load_service_config(path, role)
        assert (cfg.server.port, cfg.server.metrics_port) == PORTS[role]
    path = tmp_path / "controller.yaml"
    path.write_text(configmaps["rlhf-controller"]["data"]["controller.yaml"])
    cfg = load_controller_config(path)
    assert (cfg.server.port, cfg.server.metrics_port) == PORTS["controller"]
    assert cfg.services.reward == "kubernetes:///rlhf-reward-headless:grpc" and cfg.output_dir == "/checkpoints/runs"
    dns = render_k8s.objects(render_k8s.render({"controller": {"discovery": "dns"}}))
    path.write_text(by_kind(dns, "ConfigMap")["rlhf-controller"]["data"]["controller.yaml"])
    assert load_controller_config(path).services.policy == "dns:///rlhf-policy-headless:50051"


def test_pods_run_the_config_they_are_given(rendered):
    for obj in workloads(rendered):
        name = component_of(obj)
        if name not in (*MODEL_SERVICES, "controller"):
            continue
        spec = obj["spec"]["template"]["spec"]
        main = spec["containers"][0]
        config_volume = next(v for v in spec["volumes"] if v["name"] == "config")
        assert config_volume["configMap"]["name"] == f"rlhf-{name}"
        expected = ["serve", name] if name != "controller" else ["controller"]
        assert main["args"] == [*expected, "--config", f"/etc/rlhf/{name}.yaml"]
        assert {"name": "config", "mountPath": "/etc/rlhf", "readOnly": True} in main["volumeMounts"]
        assert {p["name"]: p["containerPort"] for p in main["ports"]}.items() >= \
            {"grpc": PORTS[name][0], "metrics": PORTS[name][1]}.items()


# --- probes, GPUs, security -------------------------------------------------------------

def test_probes_call_the_grpc_health_service_with_time_to_load_weights(rendered):
    for obj in workloads(rendered):
        name = component_of(obj)
        if name not in (*MODEL_SERVICES, "controller"):
            continue
        main = obj["spec"]["template"]["spec"]["containers"][0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main[probe]["grpc"] == {"port": PORTS[name][0]}, (obj["metadata"]["name"], probe)
        startup = main["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_model_services_get_gpus_unless_on_cpu(rendered):
    cpu_run = by_kind(rendered, "ConfigMap")["rlhf-policy"]["data"]["policy.yaml"].count("device: cpu")
    for obj in workloads(rendered):
        limits = obj["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        if component_of(obj) == "controller" or cpu_run:
            assert "nvidia.com/gpu" not in limits
        else:
            assert limits["nvidia.com/gpu"] == 1, obj["metadata"]["name"]


def test_pods_are_locked_down(rendered):
    for name, spec in pod_specs(rendered):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in containers(spec):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), name


def test_writable_paths_are_emptydirs_and_shm_is_memory(rendered):
    for obj in workloads(rendered):
        spec = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/tmp"]]["emptyDir"] == {}
        assert "emptyDir" in volumes[mounts["/cache"]] or "persistentVolumeClaim" in volumes[mounts["/cache"]]
        shm = volumes[mounts["/dev/shm"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
        env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
        assert env["HF_HOME"] == "/cache/huggingface" and env["TORCH_EXTENSIONS_DIR"].startswith("/tmp/")


def test_shm_size_comes_from_values():
    objs = render_k8s.objects(render_k8s.render({"reward": {"shmSize": "3Gi"}}))
    spec = by_kind(objs, "Deployment")["rlhf-reward"]["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "3Gi"}} in spec["volumes"]


# --- Services and discovery ----------------------------------------------------------------

def test_every_service_selects_exactly_its_component(rendered):
    templates = {o["metadata"]["name"]: o["spec"]["template"] for o in workloads(rendered)}
    for service in by_kind(rendered, "Service").values():
        selector = service["spec"]["selector"]
        matched = [name for name, t in templates.items() if selector.items() <= t["metadata"]["labels"].items()]
        assert matched == [service["metadata"]["name"].removesuffix("-headless")]
        ports = {p["name"] for c in templates[matched[0]]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_replicas_are_discoverable(rendered):
    services = by_kind(rendered, "Service")
    for name in MODEL_SERVICES:
        headless = services[f"rlhf-{name}-headless"]["spec"]
        assert headless["clusterIP"] == "None"
    for name in ("policy", "value"):
        sts = by_kind(rendered, "StatefulSet")[f"rlhf-{name}"]["spec"]
        assert sts["serviceName"] == f"rlhf-{name}-headless" and sts["podManagementPolicy"] == "Parallel"
        assert services[f"rlhf-{name}-headless"]["spec"]["publishNotReadyAddresses"] is True
    assert set(by_kind(rendered, "Deployment")) == {"rlhf-reference", "rlhf-reward"}


def test_policy_and_value_scale_out_as_one_data_parallel_group():
    objs = render_k8s.objects(render_k8s.render({"policy": {"replicaCount": 4}, "value": {"replicaCount": 2},
                                                 "reward": {"replicaCount": 3}}))
    assert by_kind(objs, "Deployment")["rlhf-reward"]["spec"]["replicas"] == 3
    for name, size in (("policy", 4), ("value", 2)):
        sts = by_kind(objs, "StatefulSet")[f"rlhf-{name}"]["spec"]
        assert sts["replicas"] == size
        env = {e["name"]: e for e in sts["template"]["spec"]["containers"][0]["env"]}
        assert env["WORLD_SIZE"]["value"] == str(size)
        assert env["MASTER_ADDR"]["value"] == f"rlhf-{name}-0.rlhf-{name}-headless"  # pod 0's stable DNS name
        assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    alone = by_kind(render_k8s.objects(render_k8s.render()), "StatefulSet")["rlhf-policy"]["spec"]
    assert "WORLD_SIZE" not in {e["name"] for e in alone["template"]["spec"]["containers"][0]["env"]}
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError) as error:
            chart.render({"controller": {"discovery": "consul"}}, name="rlhf")
    assert "/controller/discovery" in str(error.value), str(error.value)


def test_controller_may_only_read_pods_and_endpointslices(rendered):
    role = by_kind(rendered, "Role")["rlhf-controller"]
    assert sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]) == [
        (("",), ("pods",), ("get", "list", "watch")),
        (("discovery.k8s.io",), ("endpointslices",), ("get", "list", "watch")),
    ]
    binding = by_kind(rendered, "RoleBinding")["rlhf-controller"]
    job = by_kind(rendered, "Job")["rlhf-controller"]["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == "rlhf-controller"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": job["serviceAccountName"], "namespace": "rlhf"}]
    for name, spec in pod_specs(rendered):
        assert spec["automountServiceAccountToken"] is (name == "rlhf-controller"), name


def test_network_policy_admits_the_controller_clients_and_scrapers():
    values = {**VALUE_SETS["gpu-opt"], "networkPolicy": {"enabled": True, "clientNamespaces": ["apps"]}}
    objs = render_k8s.objects(render_k8s.render(values))
    controller_labels = by_kind(objs, "Job")["rlhf-controller"]["spec"]["template"]["metadata"]["labels"]
    test_labels = by_kind(objs, "Pod")["rlhf-reward-test-health"]["metadata"]["labels"]
    for name in MODEL_SERVICES:
        policy = by_kind(objs, "NetworkPolicy")[f"rlhf-{name}"]["spec"]
        grpc_rule = next(r for r in policy["ingress"] if r.get("ports") == [{"port": "grpc", "protocol": "TCP"}])
        selectors = [p["podSelector"]["matchLabels"] for p in grpc_rule["from"] if "podSelector" in p]
        assert any(s.items() <= controller_labels.items() for s in selectors)
        assert any(s.items() <= test_labels.items() for s in selectors)
        assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}} in grpc_rule["from"]
        metrics_rule = next(r for r in policy["ingress"] if r.get("ports", [{}])[0].get("port") == "metrics")
        assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        ranks = [r for r in policy["ingress"] if "ports" not in r]  # gloo/NCCL use ephemeral ports between ranks
        if name in ("policy", "value"):
            own = by_kind(objs, "StatefulSet")[f"rlhf-{name}"]["spec"]["template"]["metadata"]["labels"]
            assert len(ranks) == 1 and ranks[0]["from"][0]["podSelector"]["matchLabels"].items() <= own.items()
        else:
            assert ranks == []
    assert "NetworkPolicy" not in {o["kind"] for o in render_k8s.objects(render_k8s.render())}


# --- monitoring ---------------------------------------------------------------------------

def test_prometheus_operator_objects(gpu):
    services = by_kind(gpu, "Service")
    monitors = by_kind(gpu, "ServiceMonitor")
    assert set(monitors) == {f"rlhf-{n}" for n in (*MODEL_SERVICES, "controller")}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        targets = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()
                   and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
        assert [t["metadata"]["name"] for t in targets] == [name]
        endpoint, = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert {"action": "replace", "targetLabel": "job", "replacement": name} in endpoint["relabelings"]
    rule = by_kind(gpu, "PrometheusRule")["rlhf"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"]
    alerts = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts and all(r["expr"] and r["alert"] for g in rule["spec"]["groups"] for r in g["rules"])


def test_grafana_dashboard_configmap(gpu):
    dashboard = by_kind(gpu, "ConfigMap")["rlhf-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    source = json.loads((ROOT / "monitoring" / "grafana" / "rlhf-mesh.json").read_text())
    assert json.loads(dashboard["data"]["rlhf-mesh.json"]) == source


# --- training Jobs and model sources -----------------------------------------------------------

def test_sft_and_reward_model_jobs_feed_the_services(gpu):
    jobs = by_kind(gpu, "Job")
    sft = jobs["rlhf-sft"]["spec"]["template"]["spec"]["containers"][0]
    assert sft["args"][0] == "sft" and sft["command"][:2] == ["/bin/sh", "-c"]
    assert {"name": "RLHF_COMPLETE_FILE", "value": "/checkpoints/sft/.rlhf-complete"} in sft["env"]
    assert jobs["rlhf-train-rm"]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "train-rm"
    policy = by_kind(gpu, "StatefulSet")["rlhf-policy"]["spec"]["template"]["spec"]
    assert policy["initContainers"][0]["args"][1] == "/checkpoints/sft"
    assert "path: /checkpoints/sft\n" in by_kind(gpu, "ConfigMap")["rlhf-policy"]["data"]["policy.yaml"]
    assert "path: /checkpoints/rm\n" in by_kind(gpu, "ConfigMap")["rlhf-value"]["data"]["value.yaml"]
    waits = [c["args"][1] for c in jobs["rlhf-controller"]["spec"]["template"]["spec"]["initContainers"]]
    assert waits == ["/checkpoints/sft", "/checkpoints/rm"]


def test_pod_commands_parse_with_the_rlhf_cli(gpu):
    import typer

    from controller.cli import app

    cli = typer.main.get_command(app)
    for obj in workloads(gpu):
        main = obj["spec"]["template"]["spec"]["containers"][0]
        args = main["args"]
        assert main.get("command", ["rlhf"])[-1] == "rlhf"  # the image's entrypoint, or `sh -c ... rlhf`
        command = cli.get_command(cli.make_context("rlhf", list(args)), args[0])
        assert command is not None, args
        command.make_context(args[0], list(args[1:]))  # raises on an unknown option or a bad value


def test_training_job_writes_its_marker_and_does_not_run_twice(gpu, tmp_path):
    job = by_kind(gpu, "Job")["rlhf-sft"]["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "bin" / "rlhf"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@" >> "$CALLS"\n')
    fake.chmod(0o755)
    marker = tmp_path / "sft" / ".rlhf-complete"
    marker.parent.mkdir()
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "RLHF_COMPLETE_FILE": str(marker), "CALLS": str(tmp_path / "calls")}
    for _ in range(2):
        subprocess.run([*job["command"], *job["args"]], env=env, check=True, timeout=30)
    assert marker.exists()
    assert (tmp_path / "calls").read_text().splitlines() == [" ".join(job["args"])]


@pytest.mark.parametrize("source, path, volume", [
    ("hf://facebook/opt-125m", "facebook/opt-125m", None),
    ("pvc://models/opt/sft", "/models/opt/sft", {"claimName": "models", "readOnly": True}),
    ("pvc://rm-weights", "/models", {"claimName": "rm-weights", "readOnly": True}),
    ("checkpoints://rm/final", "/checkpoints/rm/final", None),
    ("https://example.org/rm.tar.gz", "/models/model", {}),
    ("/opt/models/rm", "/opt/models/rm", None),
])
def test_model_sources(source, path, volume):
    objs = render_k8s.objects(render_k8s.render({"reward": {"model": {"source": source}}}))
    assert f"path: {path}\n" in by_kind(objs, "ConfigMap")["rlhf-reward"]["data"]["reward.yaml"]
    spec = by_kind(objs, "Deployment")["rlhf-reward"]["spec"]["template"]["spec"]
    models = [v for v in spec["volumes"] if v["name"] == "models"]
    if volume is None:
        assert models == []
    else:
        assert models[0].get("persistentVolumeClaim", models[0].get("emptyDir")) == volume
    if source.startswith("https://"):
        assert spec["initContainers"][0]["name"] == "fetch-model" and spec["initContainers"][0]["args"][1] == source
    # Only pods that save or load checkpoints mount that (ReadWriteMany) volume.
    mounts_checkpoints = any(v["name"] == "checkpoints" for v in spec["volumes"])
    assert mounts_checkpoints == source.startswith("checkpoints://")


# --- the scripts the chart runs in pods ---------------------------------------------------------

def test_helm_test_health_check_passes_only_on_serving():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    script = (CHART / "files" / "scripts" / "health_check.py").read_text()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    def check(status):
        servicer.set("", status)
        return subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{port}", "5"],
                              capture_output=True, text=True, timeout=60)
    try:
        not_serving = check(health_pb2.HealthCheckResponse.NOT_SERVING)
        serving = check(health_pb2.HealthCheckResponse.SERVING)
    finally:
        server.stop(0)
    assert (not_serving.returncode, serving.returncode) == (1, 0)
    assert "NOT_SERVING" in not_serving.stdout and f"127.0.0.1:{port}: SERVING" in serving.stdout


def test_fetch_model_unpacks_an_archive_without_its_top_directory(tmp_path):
    model = tmp_path / "src" / "opt-rm"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * 16)
    archive = tmp_path / "rm.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(model, arcname="opt-rm")
    dest = tmp_path / "models" / "model"
    dest.parent.mkdir()
    script = CHART / "files" / "scripts" / "fetch_model.py"
    subprocess.run([sys.executable, "-c", script.read_text(), archive.as_uri(), str(dest)], check=True, timeout=60)
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.safetensors"]


# --- generated files: chart copies, schema, k8s/ -----------------------------------------------------

def test_generated_files_are_up_to_date():
    stale = render_k8s.stale(render_k8s.generated()) or render_k8s.stale(render_k8s.k8s_files())
    assert stale == [], f"run: python scripts/render_k8s.py  (stale: {stale})"


def tool(name: str) -> str:
    path = pathlib.Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (the test extra installs it)")
    return found


@pytest.mark.parametrize("overlay, values", [("base", None), ("overlays/cpu", "values-cpu.yaml")])
def test_kustomize_builds_what_the_chart_renders(overlay, values):
    built = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / overlay)],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    got = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(built) if o}
    expected = {}
    for obj in render_k8s.objects(render_k8s.render(values_file(values) if values else None)):
        if not (render_k8s.is_hook(obj) or render_k8s.is_monitoring(obj)):
            obj = render_k8s.for_kubectl(obj)
            obj["metadata"]["namespace"] = "rlhf"
            expected[(obj["kind"], obj["metadata"]["name"])] = obj
    assert got == expected


# --- the image ------------------------------------------------------------------------------------

def test_image_recipe_matches_the_chart():
    dockerfile = (ROOT / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["podSecurityContext"]["runAsUser"]
    assert f"USER {uid}:{values['podSecurityContext']['runAsGroup']}" in final_stage
    assert 'ENTRYPOINT ["rlhf"]' in final_stage and "nvidia/cuda:" in final_stage
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{chart["appVersion"]}"' in pyproject  # the image tag the chart defaults to
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

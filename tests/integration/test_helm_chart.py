"""The Helm chart, checked without a cluster: lint, values schema, and every rendered object.

The chart is rendered by Helm's own engine (helm-python-sdk embeds Helm's Go
SDK), linted by Helm, and every object is validated against the Kubernetes
JSON schemas (kubernetes-validate). The Prometheus Operator objects, which
those schemas do not cover, are checked field by field.
"""

import base64
import json

import pytest
import yaml

from controller.config import load_controller_config
from services.config import load_service_config
from tests.support.helm import (
    CHART,
    EMPTY_KUBECONFIG,
    KUBE_VERSION,
    MODEL_SERVICES,
    PORTS,
    ROOT,
    VALUE_SETS,
    admits,
    by_kind,
    component_of,
    containers,
    env_of,
    pod_specs,
    render,
    render_k8s,
    volume_mounts,
    workloads,
)

helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")


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
    ({"auth": {"token": "hunter2"}}, "/auth", "'token' not allowed"),
    ({"auth": {"keys": {"root": "root"}}}, "/auth/keys", "'root' not allowed"),
    ({"tls": {"certManager": {"issuer": "ca"}}}, "/tls/certManager", "'issuer' not allowed"),
    ({"tls": {"certManager": {"issuerRef": {"name": "ca", "namespace": "x"}}}}, "/tls/certManager/issuerRef",
     "'namespace' not allowed"),
    ({"tls": {"certManager": {"duration": "90 days"}}}, "/tls/certManager/duration", "does not match pattern"),
    ({"tls": {"mTLS": True}}, "/tls", "'mTLS' not allowed"),
    ({"networkPolicy": {"clientPodSelector": {"app": "web"}}}, "/networkPolicy/clientPodSelector",
     "'app' not allowed"),
    ({"networkPolicy": {"metricsPodSelector": {"matchExpressions": [{"key": "app", "operator": "Is"}]}}},
     "/networkPolicy/metricsPodSelector/matchExpressions/0/operator", "value must be one of"),
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
    # application teams get the score-only token, and the call that uses it
    assert "TOKEN=$(kubectl get secret -n rlhf rlhf-auth -o jsonpath='{.data.client}' | base64 -d)" in notes
    assert 'grpcurl -plaintext -H "authorization: Bearer $TOKEN"' in notes and "rlhf.v1.RewardService/Score" in notes


# --- every object -----------------------------------------------------------------------

CORE_KINDS = {"ConfigMap", "Deployment", "StatefulSet", "Job", "Pod", "Service", "ServiceAccount", "Role", "RoleBinding",
              "Secret", "NetworkPolicy"}
# CRDs: test_prometheus_operator_objects, test_cert_manager_certificate_names_every_service
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate"}


def validated(objs: list[dict]) -> dict[str, str]:
    """Validate every object but the Prometheus Operator and cert-manager CRDs against Kubernetes' strict schemas.

    Returns kind -> the Kubernetes version of the schema that checked it.
    """
    checked = {}
    for obj in objs:
        if render_k8s.is_monitoring(obj) or obj["apiVersion"].startswith("cert-manager.io/"):
            assert obj["kind"] in CRD_KINDS, obj["kind"]  # nothing else skips validation
            continue
        checked[obj["kind"]] = kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    return checked


def test_every_object_is_valid_kubernetes(rendered):
    checked = validated(rendered)
    assert CORE_KINDS <= set(checked), CORE_KINDS - set(checked)  # the workloads and their plumbing were checked
    assert set(checked.values()) == {KUBE_VERSION}  # by the schemas of the Kubernetes version the chart targets


def test_services_only_renders_neither_the_controller_nor_the_value_service():
    objs = render({"controller": {"replicaCount": 0}, "value": {"enabled": False}, "networkPolicy": {"enabled": True}})
    assert CORE_KINDS - {"Job", "Role", "RoleBinding"} <= set(validated(objs))
    names = {o["metadata"]["name"] for o in objs}
    assert not [name for name in names if "controller" in name or name.startswith("rlhf-value")], names
    assert {o["metadata"]["name"] for o in workloads(objs)} == {"rlhf-policy", "rlhf-reference", "rlhf-reward"}
    assert set(by_kind(objs, "NetworkPolicy")) == {"rlhf-policy", "rlhf-reference", "rlhf-reward"}


def test_without_a_checkpoint_volume_pods_get_an_emptydir_and_the_hub_settings():
    objs = render({"checkpoints": {"enabled": False},
                   "huggingface": {"tokenSecret": "hf", "cacheClaim": "hf-cache", "offline": True}})
    assert CORE_KINDS <= set(validated(objs))
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objs}
    scratch = set()
    for obj in workloads(objs):
        spec, name = obj["spec"]["template"]["spec"], obj["metadata"]["name"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["cache"]["persistentVolumeClaim"] == {"claimName": "hf-cache"}, name
        if "checkpoints" in volumes:
            assert volumes["checkpoints"] == {"name": "checkpoints", "emptyDir": {}}, name
            scratch.add(component_of(obj))
        env = env_of(spec["containers"][0])
        assert env["HF_HUB_OFFLINE"]["value"] == "1", name
        assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}, name
    assert scratch == {"policy", "value", "controller"}  # the pods that save checkpoints still have somewhere to


def test_name_image_claim_scheduling_and_extras_can_be_overridden():
    objs = render({
        "checkpoints": {"existingClaim": "shared"}, "imagePullSecrets": [{"name": "regcred"}], "fullnameOverride": "mesh",
        "reward": {"nodeSelector": {"gpu": "a100"}, "affinity": {"podAntiAffinity": {}}, "image": {"tag": "dev"},
                   "service": {"type": "LoadBalancer"}, "extraVolumes": [{"name": "x", "emptyDir": {}}],
                   "extraVolumeMounts": [{"name": "x", "mountPath": "/x"}], "env": [{"name": "A", "value": "1"}]}})
    assert CORE_KINDS <= set(validated(objs))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    reward = by_kind(objs, "Deployment")["mesh-reward"]["spec"]["template"]["spec"]
    main = reward["containers"][0]
    assert main["image"] == "ghcr.io/rlhf-mesh/rlhf-mesh:dev"
    assert reward["nodeSelector"] == {"gpu": "a100"} and reward["imagePullSecrets"] == [{"name": "regcred"}]
    assert {"name": "x", "emptyDir": {}} in reward["volumes"] and {"name": "x", "mountPath": "/x"} in main["volumeMounts"]
    assert env_of(main)["A"] == {"name": "A", "value": "1"}
    assert by_kind(objs, "Service")["mesh-reward"]["spec"]["type"] == "LoadBalancer"
    assert by_kind(objs, "Service")["mesh-policy"]["spec"]["type"] == "ClusterIP"  # only the reward service changed
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
        assert cfg.server.host == "0.0.0.0"  # the config's default, loopback, would be unreachable in a pod
    path = tmp_path / "controller.yaml"
    path.write_text(configmaps["rlhf-controller"]["data"]["controller.yaml"])
    cfg = load_controller_config(path)
    assert (cfg.server.port, cfg.server.metrics_port) == PORTS["controller"]
    assert cfg.server.host == "0.0.0.0"
    assert cfg.services.reward == "kubernetes:///rlhf-reward-headless:grpc" and cfg.output_dir == "/checkpoints/runs"
    dns = render({"controller": {"discovery": "dns"}})
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


def test_every_rlhf_container_is_limited_to_the_cpus_it_requests(rendered):
    """The limit is the pod's cgroup quota, which sizes each process's torch threads (services/cpus.py)."""
    for obj in workloads(rendered):
        resources = obj["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"]["cpu"] == resources["requests"]["cpu"], obj["metadata"]["name"]


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
    objs = render({"reward": {"shmSize": "3Gi"}})
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
    objs = render({"policy": {"replicaCount": 4}, "value": {"replicaCount": 2},
                                                 "reward": {"replicaCount": 3}})
    assert by_kind(objs, "Deployment")["rlhf-reward"]["spec"]["replicas"] == 3
    for name, size in (("policy", 4), ("value", 2)):
        sts = by_kind(objs, "StatefulSet")[f"rlhf-{name}"]["spec"]
        assert sts["replicas"] == size
        env = {e["name"]: e for e in sts["template"]["spec"]["containers"][0]["env"]}
        assert env["WORLD_SIZE"]["value"] == str(size)
        assert env["MASTER_ADDR"]["value"] == f"rlhf-{name}-0.rlhf-{name}-headless"  # pod 0's stable DNS name
        assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    alone = by_kind(render(), "StatefulSet")["rlhf-policy"]["spec"]
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
    objs = render(values)
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
    assert "NetworkPolicy" not in {o["kind"] for o in render({"networkPolicy": {"enabled": False}})}


# --- who may call the services: tokens, TLS, NetworkPolicy ----------------------------------------

RLHF_PROCESSES = (*MODEL_SERVICES, "controller")
CONTROLLER_SCOPES = ["score", "infer", "train"]


def loaded_configs(objs: list[dict], tmp_path) -> dict:
    """Each process's ConfigMap YAML, loaded with the pydantic models `rlhf serve` / `rlhf controller` use."""
    configs = {}
    for name in RLHF_PROCESSES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(by_kind(objs, "ConfigMap")[f"rlhf-{name}"]["data"][f"{name}.yaml"])
        configs[name] = load_controller_config(path) if name == "controller" else load_service_config(path, name)
    return configs


def process_pods(objs: list[dict]) -> dict[str, dict]:
    """The pod template of each rlhf process (model services and controller), by component."""
    return {component_of(o): o["spec"]["template"] for o in workloads(objs) if component_of(o) in RLHF_PROCESSES}


def tokens(cfg) -> list[tuple]:
    return [(t.name, t.scopes, t.file) for t in cfg.server.auth.tokens]


def test_tokens_are_on_by_default_and_each_pod_gets_only_its_own(tmp_path):
    objs = render()
    secret = by_kind(objs, "Secret")["rlhf-auth"]
    assert sorted(secret["data"]) == ["admin", "client", "controller"]
    values = [base64.b64decode(v).decode() for v in secret["data"].values()]
    assert all(len(v) == 48 and v.isalnum() for v in values) and len(set(values)) == 3

    configs = loaded_configs(objs, tmp_path)
    controller = ("controller", CONTROLLER_SCOPES, "/etc/rlhf/auth/controller")
    for name in ("policy", "reference", "value"):
        assert tokens(configs[name]) == [controller], name
    assert tokens(configs["reward"]) == [controller, ("clients", ["score"], "/etc/rlhf/auth/client")]
    assert tokens(configs["controller"]) == [("admin", ["admin"], "/etc/rlhf/auth/admin")]
    assert configs["controller"].services.token_file == "/etc/rlhf/auth/controller"

    for name, pod in process_pods(objs).items():
        mount, volume = volume_mounts(pod["spec"])["/etc/rlhf/auth"]
        assert mount["readOnly"] is True and volume["secret"]["secretName"] == "rlhf-auth", name
        assert volume["secret"]["defaultMode"] == 0o440  # readable by the pod's group (fsGroup 1000) only
        files = {f"/etc/rlhf/auth/{item['path']}" for item in volume["secret"]["items"]}
        cfg = configs[name]
        needed = {t.file for t in cfg.server.auth.tokens} | ({cfg.services.token_file} if name == "controller" else set())
        assert files == needed, name  # every token file the config names is there, and nothing more
    for name, spec in pod_specs(objs):  # training Jobs and helm test pods hold no token
        if name not in {f"rlhf-{n}" for n in RLHF_PROCESSES}:
            assert "/etc/rlhf/auth" not in volume_mounts(spec), name


@pytest.mark.parametrize("auth, secret", [
    ({"existingSecret": "team-tokens", "keys": {"client": "score-token"}}, "team-tokens"),
    ({"enabled": False}, None),
])
def test_tokens_come_from_an_existing_secret_or_are_off(auth, secret, tmp_path):
    objs = render({"auth": auth})
    assert "Secret" not in {o["kind"] for o in objs}  # the chart creates none
    configs = loaded_configs(objs, tmp_path)
    reward = volume_mounts(process_pods(objs)["reward"]["spec"]).get("/etc/rlhf/auth")
    if secret is None:
        assert reward is None
        assert all(configs[n].server.auth.tokens == [] for n in RLHF_PROCESSES)
        assert configs["controller"].services.token_file is None
    else:
        assert reward[1]["secret"]["secretName"] == secret
        assert reward[1]["secret"]["items"] == [{"key": "controller", "path": "controller"},
                                                {"key": "score-token", "path": "client"}]
        assert tokens(configs["reward"])[1] == ("clients", ["score"], "/etc/rlhf/auth/client")


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_mounts_the_secret_and_every_process_serves_and_dials_with_it(mutual, tmp_path):
    objs = render({"tls": {"enabled": True, "secretName": "rlhf-certs", "mutual": mutual}})
    assert CORE_KINDS <= set(validated(objs))
    configs = loaded_configs(objs, tmp_path)
    ca = "/etc/rlhf/tls/ca.crt" if mutual else None
    for name in RLHF_PROCESSES:
        tls = configs[name].server.tls
        assert (tls.cert_file, tls.key_file, tls.client_ca_file) == ("/etc/rlhf/tls/tls.crt", "/etc/rlhf/tls/tls.key", ca)
    client = configs["controller"].services.tls
    assert client.ca_file == "/etc/rlhf/tls/ca.crt"
    assert client.server_name == "rlhf.rlhf.svc"  # it dials pod addresses; every server presents this name
    assert (client.cert_file, client.key_file) == (("/etc/rlhf/tls/tls.crt", "/etc/rlhf/tls/tls.key") if mutual
                                                  else (None, None))
    pods = {component_of(o): o["spec"]["template"]["spec"] for o in workloads(objs)}
    pods |= {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "Pod"}
    for name, spec in pods.items():
        if name in ("sft", "train-rm"):
            continue
        mount, volume = volume_mounts(spec)["/etc/rlhf/tls"]
        assert mount["readOnly"] is True and volume["secret"]["secretName"] == "rlhf-certs", name
        assert {i["path"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmRenderError) as error:
        chart.render({"tls": {"enabled": True}}, name="rlhf")
    assert "tls.secretName" in str(error.value)


def test_with_tls_probes_run_the_health_script_over_tls():
    objs = render({"tls": {"enabled": True, "secretName": "rlhf-certs", "mutual": True}})
    script = (CHART / "files" / "scripts" / "health_check.py").read_text()
    for name, pod in process_pods(objs).items():
        main = pod["spec"]["containers"][0]
        assert by_kind(objs, "ConfigMap")[f"rlhf-{name}"]["data"]["health_check.py"] == script
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = main[probe]["exec"]["command"]
            assert command[:4] == ["python", "/etc/rlhf/health_check.py", f"127.0.0.1:{PORTS[name][0]}",
                                   str(main[probe]["timeoutSeconds"])], (name, probe)
            assert command[4:] == ["--ca", "/etc/rlhf/tls/ca.crt", "--server-name", "rlhf.rlhf.svc",
                                   "--cert", "/etc/rlhf/tls/tls.crt", "--key", "/etc/rlhf/tls/tls.key"]
    # tests/integration/test_k8s_artifacts.py runs these arguments against a mutual-TLS server.


def test_cert_manager_certificate_names_every_service():
    objs = render({"tls": {"enabled": True, "certManager": {
        "enabled": True, "issuerRef": {"name": "rlhf-ca", "kind": "ClusterIssuer"}}}})
    cert = by_kind(objs, "Certificate")["rlhf"]
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    assert spec["issuerRef"] == {"name": "rlhf-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert spec["duration"] == "2160h" and spec["renewBefore"] == "360h"
    assert {"server auth", "client auth"} <= set(spec["usages"])  # mutual TLS presents the same certificate
    assert spec["secretName"] == "rlhf-tls"
    for pod in process_pods(objs).values():  # the Secret cert-manager writes is the one every pod mounts
        assert volume_mounts(pod["spec"])["/etc/rlhf/tls"][1]["secret"]["secretName"] == "rlhf-tls"
    names = set(spec["dnsNames"])
    for service in by_kind(objs, "Service"):
        assert {service, f"{service}.rlhf", f"{service}.rlhf.svc", f"{service}.rlhf.svc.cluster.local"} <= names
    assert "rlhf.rlhf.svc" in names  # what the controller, probes and helm test check
    assert {"*.rlhf-policy-headless.rlhf.svc", "*.rlhf-value-headless.rlhf.svc"} <= names  # each rank's own name
    with helm_python.Chart.load(CHART) as chart, pytest.raises(helm_python.HelmRenderError) as error:
        chart.render({"tls": {"enabled": True, "certManager": {"enabled": True}}}, name="rlhf")
    assert "issuerRef.name" in str(error.value)
    assert "Certificate" not in {o["kind"] for o in render({"tls": {"certManager": {"enabled": True}}})}


def test_default_network_policy_admits_the_controller_apps_and_scrapers_only():
    objs = render()
    policies = list(by_kind(objs, "NetworkPolicy").values())
    pods = process_pods(objs)
    controller = pods["controller"]["metadata"]["labels"]
    app = {"app": "web", "rlhf-mesh/reward-client": "true"}
    for name in MODEL_SERVICES:
        pod = pods[name]
        assert admits(policies, pod, "grpc", controller), name  # the training path stays open
        assert admits(policies, pod, "grpc", app) == (name == "reward"), name
        assert not admits(policies, pod, "grpc", app, client_namespace="other"), name
        assert not admits(policies, pod, "grpc", {"app": "web"}), name
    for name, pod in pods.items():
        assert admits(policies, pod, "metrics", {"app": "prometheus"}, client_namespace="monitoring"), name
        assert not admits(policies, pod, "metrics", {"app": "prometheus"}), name
        assert not admits(policies, pod, "grpc", {"app": "prometheus"}, client_namespace="monitoring"), name
    assert not admits(policies, pods["controller"], "grpc", app)  # the admin API: port-forward only
    for name in ("policy", "value"):  # ranks of one group reach each other, other pods do not
        assert admits(policies, pods[name], "dist", pods[name]["metadata"]["labels"])
        assert not admits(policies, pods[name], "dist", pods["reward"]["metadata"]["labels"])


def test_network_policy_selectors_come_from_values():
    objs = render({"networkPolicy": {
        "clientPodSelector": {"matchLabels": None,  # Helm merges maps: null drops the default label
                              "matchExpressions": [{"key": "team", "operator": "In", "values": ["search"]}]},
        "clientNamespaceSelector": {"matchLabels": {"rlhf-clients": "yes"}},
        "metricsNamespaces": ["observability"], "metricsPodSelector": {"matchLabels": {"app": "prometheus"}}}})
    assert CORE_KINDS <= set(validated(objs))
    policies = list(by_kind(objs, "NetworkPolicy").values())
    reward = process_pods(objs)["reward"]
    peers = [p for r in by_kind(objs, "NetworkPolicy")["rlhf-reward"]["spec"]["ingress"] for p in r.get("from", [])]
    assert {"namespaceSelector": {"matchLabels": {"rlhf-clients": "yes"}},
            "podSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["search"]}]}} in peers
    chosen = {"client_namespace": "search", "namespace_labels": {"rlhf-clients": "yes"}}
    assert admits(policies, reward, "grpc", {"team": "search"}, **chosen)
    assert not admits(policies, process_pods(objs)["policy"], "grpc", {"team": "search"}, **chosen)  # reward only
    assert not admits(policies, reward, "grpc", {"team": "search"})  # the right pods, but not in a chosen namespace
    assert not admits(policies, reward, "grpc", {"rlhf-mesh/reward-client": "true"})  # the default label is gone
    assert admits(policies, reward, "metrics", {"app": "prometheus"}, client_namespace="observability")
    assert not admits(policies, reward, "metrics", {"app": "grafana"}, client_namespace="observability")


# --- monitoring ---------------------------------------------------------------------------

def test_prometheus_operator_objects(gpu_chart):
    services = by_kind(gpu_chart, "Service")
    monitors = by_kind(gpu_chart, "ServiceMonitor")
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
    rule = by_kind(gpu_chart, "PrometheusRule")["rlhf"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"]
    alerts = yaml.safe_load((ROOT / "monitoring" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts and all(r["expr"] and r["alert"] for g in rule["spec"]["groups"] for r in g["rules"])


def test_grafana_dashboard_configmap(gpu_chart):
    dashboard = by_kind(gpu_chart, "ConfigMap")["rlhf-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    source = json.loads((ROOT / "monitoring" / "grafana" / "rlhf-mesh.json").read_text())
    assert json.loads(dashboard["data"]["rlhf-mesh.json"]) == source

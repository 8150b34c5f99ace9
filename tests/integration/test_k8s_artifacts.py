"""What the chart runs and ships beside its objects: training Jobs, model sources, pod scripts,
the generated plain manifests (k8s/) and the image recipe."""

import itertools
import subprocess
import sys
import tarfile

import pytest
import yaml

from tests.support.helm import CHART, ROOT, by_kind, render, render_k8s, tool, values_file, workloads

helm_python = pytest.importorskip("helm_python", reason="pip install helm-python-sdk (the test extra)")


# --- training Jobs and model sources -----------------------------------------------------------

def test_sft_and_reward_model_jobs_feed_the_services(gpu_chart):
    jobs = by_kind(gpu_chart, "Job")
    sft = jobs["rlhf-sft"]["spec"]["template"]["spec"]["containers"][0]
    assert sft["args"][0] == "sft" and sft["command"][:2] == ["/bin/sh", "-c"]
    assert {"name": "RLHF_COMPLETE_FILE", "value": "/checkpoints/sft/.rlhf-complete"} in sft["env"]
    assert jobs["rlhf-train-rm"]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "train-rm"
    policy = by_kind(gpu_chart, "StatefulSet")["rlhf-policy"]["spec"]["template"]["spec"]
    assert policy["initContainers"][0]["args"][1] == "/checkpoints/sft"
    assert "path: /checkpoints/sft\n" in by_kind(gpu_chart, "ConfigMap")["rlhf-policy"]["data"]["policy.yaml"]
    assert "path: /checkpoints/rm\n" in by_kind(gpu_chart, "ConfigMap")["rlhf-value"]["data"]["value.yaml"]
    waits = [c["args"][1] for c in jobs["rlhf-controller"]["spec"]["template"]["spec"]["initContainers"]]
    assert waits == ["/checkpoints/sft", "/checkpoints/rm"]


def test_pod_commands_parse_with_the_rlhf_cli(gpu_chart):
    import typer

    from cli.main import app

    cli = typer.main.get_command(app)
    for obj in workloads(gpu_chart):
        main = obj["spec"]["template"]["spec"]["containers"][0]
        args = main["args"]
        assert main.get("command", ["rlhf"])[-1] == "rlhf"  # the image's entrypoint, or `sh -c ... rlhf`
        command = cli.get_command(cli.make_context("rlhf", list(args)), args[0])
        assert command is not None, args
        parsed = command.make_context(args[0], list(args[1:])).params  # raises on an unknown option or a bad value
        given = {flag[2:].replace("-", "_"): text for flag, text in itertools.pairwise(args) if flag.startswith("--")}
        assert given, args  # every pod passes at least its config or its data
        for name, text in given.items():  # each option reaches the command as the value the chart meant
            assert parsed[name] == type(parsed[name])(text), (args, name, parsed[name])


def test_training_job_writes_its_marker_and_does_not_run_twice(gpu_chart, tmp_path):
    job = by_kind(gpu_chart, "Job")["rlhf-sft"]["spec"]["template"]["spec"]["containers"][0]
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
    objs = render({"reward": {"model": {"source": source}}})
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


def make_certificates(tmp_path, openssl: str, server_name: str) -> dict[str, bytes]:
    """A CA and one certificate it signed for `server_name` (server and client auth), as PEM bytes."""
    def run(*args):
        subprocess.run([openssl, *args], cwd=tmp_path, check=True, capture_output=True, timeout=60)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=rlhf test CA",
        "-keyout", "ca.key", "-out", "ca.crt")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={server_name}", "-keyout", "tls.key", "-out", "tls.csr")
    (tmp_path / "ext.cnf").write_text(f"subjectAltName=DNS:{server_name}\nextendedKeyUsage=serverAuth,clientAuth\n")
    run("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-extfile", "ext.cnf", "-out", "tls.crt")
    return {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "tls.crt", "tls.key")}


def test_tls_probe_arguments_pass_against_a_mutual_tls_server(tmp_path):
    """The exec probes that replace kubelet's plain-text gRPC probes when tls.enabled, run for real."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    objs = render({"tls": {"enabled": True, "secretName": "rlhf-certs", "mutual": True}})
    probe = by_kind(objs, "Deployment")["rlhf-reward"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    command = probe["exec"]["command"]
    server_name = command[command.index("--server-name") + 1]
    pem = make_certificates(tmp_path, tool("openssl"), server_name)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    credentials = grpc.ssl_server_credentials([(pem["tls.key"], pem["tls.crt"])], pem["ca.crt"],
                                              require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    script = CHART / "files" / "scripts" / "health_check.py"

    def probe_with(args):
        args = [str(tmp_path / a.removeprefix("/etc/rlhf/tls/")) if a.startswith("/etc/rlhf/tls/") else a
                for a in args]
        return subprocess.run([sys.executable, str(script), f"127.0.0.1:{port}", *args], check=False,
                              capture_output=True, text=True, timeout=60)
    try:
        passed = probe_with(command[3:])
        without_client_cert = probe_with(command[3:command.index("--cert")])
        plain_text = probe_with(command[3:4])  # what kubelet's own gRPC probe would do
    finally:
        server.stop(0)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"127.0.0.1:{port}: SERVING" in passed.stdout
    assert without_client_cert.returncode == 1 and plain_text.returncode == 1


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


def test_k8s_holds_no_tokens_and_reads_them_from_the_secret_users_create():
    objs = [o for path in (ROOT / "k8s").rglob("*.yaml") for o in yaml.safe_load_all(path.read_text())
            if isinstance(o, dict) and "kind" in o]
    assert "Secret" not in {o["kind"] for o in objs}  # rendered with auth.existingSecret: the same on every render
    secrets = {v["secret"]["secretName"] for o in workloads(objs) for v in o["spec"]["template"]["spec"]["volumes"]
               if "secret" in v}
    assert secrets == {"rlhf-auth"}  # docs/kubernetes.md: kubectl create secret generic rlhf-auth ...


@pytest.mark.parametrize("overlay, values", [("base", None), ("overlays/cpu", "values-cpu.yaml")])
def test_kustomize_builds_what_the_chart_renders(overlay, values):
    built = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / "k8s" / overlay)],
                           capture_output=True, text=True, check=True, timeout=60).stdout
    got = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(built) if o}
    expected = {}
    for obj in render(render_k8s.for_k8s(values_file(values) if values else None)):
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


# --- durability: the controller Job resumes its run, pods come back at its state, drains go one pod at a time --

def test_a_retried_controller_pod_resumes_the_releases_run():
    objs = render({"controller": {"config": {"checkpoint": {"every": 5}}}})
    job = by_kind(objs, "Job")["rlhf-controller"]
    assert job["spec"]["backoffLimit"] > 0
    assert job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 300  # a step and a checkpoint
    config = yaml.safe_load(by_kind(objs, "ConfigMap")["rlhf-controller"]["data"]["controller.yaml"])
    assert config["run_id"] == "rlhf" and config["checkpoint"] == {"resume": "auto", "every": 5}
    for role in ("policy", "value"):  # a restarted pod loads the run's newest complete state at start
        service = yaml.safe_load(by_kind(objs, "ConfigMap")[f"rlhf-{role}"]["data"][f"{role}.yaml"])
        assert service["training"]["restore_from"] == "runs/rlhf"
        assert service["server"]["checkpoint_dir"] == f"/checkpoints/{role}"


def test_each_enabled_model_service_has_a_disruption_budget():
    objs = render({"value": {"enabled": False}, "podDisruptionBudget": {"maxUnavailable": 2}})
    budgets = by_kind(objs, "PodDisruptionBudget")
    assert sorted(budgets) == ["rlhf-policy", "rlhf-reference", "rlhf-reward"]
    for name, budget in budgets.items():
        assert budget["spec"]["maxUnavailable"] == 2
        assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == name.removeprefix("rlhf-")
    assert not by_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget")

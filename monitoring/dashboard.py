"""The rlhf-mesh Grafana dashboard, built with grafana-foundation-sdk.

`python -m monitoring.dashboard` rewrites monitoring/grafana/rlhf-mesh.json;
tests/unit/test_dashboard.py fails when the committed JSON differs from what this
module builds. Every query reads the `datasource` template variable (no
data-source uid is written into the file), so the JSON imports into any
Grafana with a Prometheus data source.
"""

import json
import pathlib
from dataclasses import dataclass, field

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    GridPos,
)

OUTPUT = pathlib.Path(__file__).parent / "grafana" / "rlhf-mesh.json"
UID = "rlhf-mesh"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


def rate(metric: str, by: str = "") -> str:
    """sum [by (...)] (rate(metric[$__rate_interval]))."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}[{RATE}]))"


def mean_of(histogram: str, by: str) -> str:
    """Mean observation of a histogram over the rate window, per `by`."""
    return f"{rate(histogram + '_sum', by)} / {rate(histogram + '_count', by)}"


def quantile(q: float, histogram: str, by: str) -> str:
    """histogram_quantile over the rate window, per `by`."""
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', 'le, ' + by)})"


# A process's host memory, labelled with its role (every rlhf process exports rlhf_service_ready{role}).
HOST_MEMORY = "max by (role) (process_resident_memory_bytes * on (job, instance) group_left (role) (0 * rlhf_service_ready + 1))"
# Non-OK share per service; `or 0 * ...` keeps a 0 for services that had no error at all.
_HANDLED = rate("grpc_server_handled_total", "grpc_service")
_FAILED = rate('grpc_server_handled_total{grpc_code!="OK"}', "grpc_service")
RPC_ERRORS = f"({_FAILED} or 0 * {_HANDLED}) / {_HANDLED}"


@dataclass
class Panel:
    """One panel: title, description, unit and its (PromQL, legend) targets."""

    title: str
    description: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8
    height: int = 8
    stack: bool = False


@dataclass
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


ROWS = [
    Row("Training progress", [
        Panel("Step", "Training steps completed, of those planned.",
              [("max(rlhf_steps_total)", "done"), ("max(rlhf_steps_planned)", "planned")], kind="stat", width=4),
        Panel("Run state", "The controller's run: starting, running, finished or failed.",
              [("max by (state) (rlhf_run_state) == 1", "{{state}}")], kind="stat", width=4),
        Panel("Reward (RM score)", "r_theta(x, y) of the batch's responses: mean and standard deviation.",
              [("rlhf_reward_mean", "mean"), ("rlhf_reward_std", "std")], width=8),
        Panel("KL to the SFT model", "KL(pi || pi_ref) per sequence in nats, and beta (the KL coefficient).",
              [("rlhf_objective_kl", "KL (nats)"), ("rlhf_objective_kl_coef", "beta")], width=8),
        Panel("Losses", "PPO clipped surrogate loss (policy) and clipped value loss.",
              [("rlhf_policy_loss", "policy"), ("rlhf_value_loss", "value")]),
        Panel("PPO update", "Clip fractions and approximate KL of the update; large values mean too big a step.",
              [("rlhf_policy_clip_ratio", "policy clip fraction"), ("rlhf_policy_approx_kl", "approx KL"),
               ("rlhf_value_clip_ratio", "value clip fraction")]),
        Panel("Policy entropy", "Entropy per response token, in nats; a collapse means mode collapse.",
              [("rlhf_policy_entropy", "entropy")]),
        Panel("Value explained variance", "1 - Var(returns - values) / Var(returns); near 1 is a good critic.",
              [("rlhf_value_explained_variance", "explained variance")]),
        Panel("Response length", "Response tokens per sample, batch mean.", [("rlhf_response_length_tokens", "tokens")]),
        Panel("Advantages and returns", "GAE advantages (before whitening) and returns over response tokens.",
              [("rlhf_advantages_mean", "advantages mean"), ("rlhf_advantages_std", "advantages std"),
               ("rlhf_returns_mean", "returns mean"), ("rlhf_returns_std", "returns std")]),
        Panel("RM held-out accuracy", "Reward-model comparison accuracy on held-out pairs (latest evaluation).",
              [("rlhf_eval_rm_accuracy_ratio", "accuracy")], unit="percentunit"),
        Panel("Samples and tokens per second", "Prompts trained on and response tokens generated, per second.",
              [(rate("rlhf_samples_total"), "samples/s"), (rate("rlhf_response_tokens_total"), "tokens/s")]),
    ]),
    Row("Phase timing", [
        Panel("Seconds per phase (mean)", "Generate, score (reference, value, reward at once) and train, per step.",
              [(mean_of("rlhf_phase_seconds", "phase"), "{{phase}}")], unit="s"),
        Panel("Seconds per phase (p90)", "90th percentile of each phase's duration.",
              [(quantile(0.9, "rlhf_phase_seconds", "phase"), "{{phase}}")], unit="s"),
        Panel("Share of wall time", "Seconds spent in each phase per second of wall time.",
              [(rate("rlhf_phase_seconds_sum", "phase"), "{{phase}}")], unit="percentunit", stack=True),
    ]),
    Row("Service health and latency", [
        Panel("Ready", "1 while a process reports SERVING (model loaded, not draining).",
              [("rlhf_service_ready", "{{role}}")], kind="stat", width=6),
        Panel("Model load time", "Seconds each service took to load its weights.",
              [("rlhf_model_load_seconds", "{{role}}")], unit="s", kind="stat", width=6),
        Panel("Model version", "Optimizer steps applied by the trainable services.",
              [("rlhf_model_version", "{{role}}")], width=6),
        Panel("Replicas in rotation", "Replicas of each service the controller sends work to, and those it has "
              "taken out after failed calls or health checks.",
              [('rlhf_replicas{state="serving"}', "{{service}} serving"),
               ('rlhf_replicas{state="out"}', "{{service}} out")], width=6),
        Panel("RPC rate by method", "Completed RPCs per second.",
              [(rate("grpc_server_handled_total", "grpc_service, grpc_method"), "{{grpc_service}}/{{grpc_method}}")],
              unit="reqps"),
        Panel("RPCs by status code", "Completed RPCs per second, by gRPC status code.",
              [(rate("grpc_server_handled_total", "grpc_code"), "{{grpc_code}}")], unit="reqps"),
        Panel("Error ratio", "Share of RPCs that ended with a status other than OK.",
              [(RPC_ERRORS, "{{grpc_service}}")], unit="percentunit"),
        Panel("Latency by method", "RPC handling time, p50 and p99.",
              [(quantile(0.5, "grpc_server_handling_seconds", "grpc_method"), "p50 {{grpc_method}}"),
               (quantile(0.99, "grpc_server_handling_seconds", "grpc_method"), "p99 {{grpc_method}}")], unit="s"),
        Panel("Queue depth", "Requests waiting for a model call.", [("rlhf_queue_depth", "{{role}}/{{queue}}")]),
        Panel("Queue saturation", "Depth over capacity; at 1 requests get RESOURCE_EXHAUSTED.",
              [("rlhf_queue_depth / rlhf_queue_capacity", "{{role}}/{{queue}}")], unit="percentunit"),
        Panel("Memory", "Resident host memory per process; device memory where a GPU holds the model.",
              [(HOST_MEMORY, "host {{role}}"), ("rlhf_device_memory_allocated_bytes", "device {{role}} allocated"),
               ("rlhf_device_memory_reserved_bytes", "device {{role}} reserved")], unit="bytes", width=24),
    ]),
    Row("Per-service throughput", [
        Panel("Sequences per second", "Sequences through each service's model, by queue.",
              [(rate("rlhf_sequences_total", "role, queue"), "{{role}}/{{queue}}")]),
        Panel("Tokens per second", "Tokens scored by forward passes, and tokens sampled by the policy.",
              [(rate("rlhf_tokens_scored_total", "role, queue"), "{{role}}/{{queue}} scored"),
               (rate("rlhf_tokens_generated_total", "role"), "{{role}} generated")]),
        Panel("Batch size", "Mean sequences per model call: how well concurrent requests are merged.",
              [(mean_of("rlhf_batch_size", "role, queue"), "{{role}}/{{queue}}")]),
        Panel("Model call seconds (p90)", "90th percentile of one batched model call.",
              [(quantile(0.9, "rlhf_inference_seconds", "role, queue"), "{{role}}/{{queue}}")], unit="s", width=12),
        Panel("Model call seconds (mean)", "Mean duration of one batched model call.",
              [(mean_of("rlhf_inference_seconds", "role, queue"), "{{role}}/{{queue}}")], unit="s", width=12),
    ]),
]


def _targets(p: Panel) -> list:
    refs = "ABCDEFGHIJ"
    return [prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(refs[i]).datasource(DATASOURCE)
            for i, (expr, legend) in enumerate(p.targets)]


def build_panel(p: Panel, panel_id: int):
    """A timeseries or stat panel builder for `p`."""
    if p.kind == "stat":
        b = (stat.Panel().text_mode(common.BigValueTextMode.VALUE_AND_NAME)
             .graph_mode(common.BigValueGraphMode.NONE)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    else:
        b = (timeseries.Panel().line_width(1).fill_opacity(10 if not p.stack else 60)
             .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM).show_legend(True)))
        if p.stack:
            b = b.stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    b = b.id(panel_id).title(p.title).description(p.description).unit(p.unit).datasource(DATASOURCE)
    return b.grid_pos(GridPos(h=p.height, w=p.width)).targets(_targets(p))


def build() -> dict:
    """The dashboard as a JSON-ready dict."""
    d = (dash.Dashboard("rlhf-mesh: RLHF training").uid(UID)
         .description("PPO/DPO training, phase timing, service health and throughput of rlhf-mesh.")
         .tags(["rlhf", "rlhf-mesh", "grpc"]).refresh("10s").time("now-1h", "now").timezone("browser")
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus")))
    panel_id = 1
    for row in ROWS:
        d = d.with_row(dash.Row(row.title).id(panel_id))
        panel_id += 1
        for p in row.panels:
            d = d.with_panel(build_panel(p, panel_id))
            panel_id += 1
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def render() -> str:
    """The JSON file's text."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()

"""Prometheus metrics of the controller: each training step's statistics, phase timings, run state.

`observe_step(stats)` turns one `StepResult.stats` dict (controller/loop.py,
controller/dpo.py, plus the `eval/*` keys of periodic evaluations) into gauges,
counters and the phase-time histogram. Names follow Prometheus conventions:
`rlhf_` prefix, `_ratio` for fractions in [0, 1], `_seconds`, `_total` on
counters. The gRPC server metrics of ControllerService come from
services.metrics, in the same per-process registry.
"""

import logging
import re
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.metrics import (
    DISABLED,
    SECONDS_BUCKETS,
    GrpcServerMetrics,
    MetricsEndpoint,
    MetricsInterceptor,
)

log = logging.getLogger(__name__)

# stats key -> (metric name, help). Keys a step does not report leave their gauge as it was.
STEP_GAUGES: dict[str, tuple[str, str]] = {
    "reward/mean": ("rlhf_reward_mean", "RM score r_theta(x, y), mean over the batch."),
    "reward/std": ("rlhf_reward_std", "RM score, standard deviation over the batch."),
    "objective/kl": ("rlhf_objective_kl", "KL(pi || pi_ref) summed over response tokens, in nats, batch mean."),
    "objective/kl_coef": ("rlhf_objective_kl_coef", "beta, the weight of the per-token KL penalty."),
    "objective/non_score_reward": ("rlhf_objective_non_score_reward", "-beta * KL summed over tokens, batch mean."),
    "policy/loss": ("rlhf_policy_loss", "PPO clipped surrogate loss, mean over minibatches."),
    "policy/clipfrac": ("rlhf_policy_clip_ratio", "Fraction of response tokens whose probability ratio was clipped."),
    "policy/approx_kl": ("rlhf_policy_approx_kl", "Approximate KL(pi_old || pi) of the update, mean over minibatches."),
    "policy/entropy": ("rlhf_policy_entropy", "Policy entropy per response token, in nats."),
    "policy/grad_norm": ("rlhf_policy_grad_norm", "Policy gradient norm before clipping, mean over minibatches."),
    "policy/ptx_loss": ("rlhf_policy_ptx_loss", "PPO-ptx pretraining LM loss, mean over minibatches."),
    "policy/version": ("rlhf_policy_version", "Optimizer steps the policy has applied."),
    "policy/kl_loss": ("rlhf_policy_kl_loss", "The k3 KL(pi || pi_ref) term of the policy loss (critic_free.kl_in_loss)."),
    "group/reward_std": ("rlhf_group_reward_std", "Critic-free runs: score std within a prompt's group, mean."),
    "group/zero_variance_fraction": ("rlhf_group_zero_variance_ratio",
                                     "Critic-free runs: groups whose scores are all equal (no learning signal)."),
    "value/loss": ("rlhf_value_loss", "Clipped value loss, mean over minibatches."),
    "value/clipfrac": ("rlhf_value_clip_ratio", "Fraction of value predictions that were clipped."),
    "value/grad_norm": ("rlhf_value_grad_norm", "Value gradient norm before clipping, mean over minibatches."),
    "value/explained_variance": ("rlhf_value_explained_variance", "1 - Var(returns - values) / Var(returns)."),
    "response/length": ("rlhf_response_length_tokens", "Response tokens per sample, batch mean."),
    "advantages/mean": ("rlhf_advantages_mean", "GAE advantages before whitening, mean over response tokens."),
    "advantages/std": ("rlhf_advantages_std", "GAE advantages before whitening, std over response tokens."),
    "returns/mean": ("rlhf_returns_mean", "Returns (advantages + values), mean over response tokens."),
    "returns/std": ("rlhf_returns_std", "Returns (advantages + values), std over response tokens."),
    "dpo/loss": ("rlhf_dpo_loss", "DPO loss of the step."),
    "dpo/reward_accuracy": ("rlhf_dpo_reward_accuracy_ratio", "Pairs whose implicit reward prefers the chosen response."),
    "dpo/reward_margin": ("rlhf_dpo_reward_margin", "Implicit reward of chosen minus rejected, mean over pairs."),
    "eval/rm_accuracy": ("rlhf_eval_rm_accuracy_ratio", "RM comparison accuracy on held-out pairs (latest evaluation)."),
    "eval/rm_mean_margin": ("rlhf_eval_rm_mean_margin", "RM score of chosen minus rejected, held-out mean (latest)."),
    "eval/rm_ece": ("rlhf_eval_rm_ece", "Expected calibration error of P(chosen preferred), held out (latest)."),
}
PHASES = {"time/generate": "generate", "time/score": "score", "time/train": "train"}
SOURCE_MEAN = re.compile(r"reward/([a-z][a-z0-9_]*)/mean")  # one reward source's mean (controller rewards:)
RUN_STATES = ("starting", "running", "waiting", "restoring", "stopping", "finished", "failed")


class RunCollector(Collector):
    """The attached ControllerServicer's state, read at scrape time."""

    def __init__(self):
        self.servicer = None

    def collect(self):
        s = self.servicer
        if s is None:
            return
        state = GaugeMetricFamily("rlhf_run_state", "1 for the run's current state.", labels=["state"])
        current = s.current_state()
        for name in RUN_STATES:
            state.add_metric([name], 1.0 if current == name else 0.0)
        yield state
        d = s.driver
        yield GaugeMetricFamily("rlhf_run_checkpoint_step", "Step of the run's last complete checkpoint (-1: none).",
                                d.checkpoint_step if d else -1)
        yield CounterMetricFamily("rlhf_run_restores", "Times the run went back to its last checkpoint because a "
                                  "trained service restarted.", d.restores if d else 0)
        yield GaugeMetricFamily("rlhf_steps_planned", "Training steps the run is configured for.", s.cfg.total_steps())
        info = GaugeMetricFamily("rlhf_run_info", "The run (value 1).", labels=["run_id", "algorithm"])
        info.add_metric([s.runner.run_id if s.runner else s.cfg.run_id or "", s.cfg.algorithm], 1.0)
        yield info
        if s.clients is not None:
            yield replica_family(s.clients.pools)
            waiting = GaugeMetricFamily("rlhf_waiting_for_service", "1 while the run retries this service "
                                        "(unavailable or too slow).", labels=["service"])
            for role in s.clients.pools:
                waiting.add_metric([role], 1.0 if role in s.clients.outage.since else 0.0)
            yield waiting


def replica_family(pools: dict) -> GaugeMetricFamily:
    """rlhf_replicas{service, state}: replicas the controller sends work to (serving) or has taken out (out)."""
    family = GaugeMetricFamily("rlhf_replicas", "Replicas of each model service the controller knows, by state.",
                               labels=["service", "state"])
    for role, pool in pools.items():
        serving = len(pool.serving())
        family.add_metric([role, "serving"], serving)
        family.add_metric([role, "out"], len(pool.channels) - serving)
    return family


class StepCollector(Collector):
    """The latest value of each STEP_GAUGES statistic; one a step never reported is not exported."""

    def __init__(self):
        self.latest: dict[str, float] = {}
        self.sources: dict[str, float] = {}  # reward source name -> its mean score in the last step

    def collect(self):
        for key, value in list(self.latest.items()):
            name, doc = STEP_GAUGES[key]
            yield GaugeMetricFamily(name, doc, value)
        if self.sources:
            family = GaugeMetricFamily("rlhf_reward_source_mean", "Mean score of each reward source (rewards:) in "
                                       "the last step, before weighting.", labels=["source"])
            for source, value in self.sources.items():
                family.add_metric([source], value)
            yield family


class ControllerMetrics:
    """The controller process's registry, its /metrics endpoint and the per-step update."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.interceptor = MetricsInterceptor(GrpcServerMetrics(r))
        self.endpoint: MetricsEndpoint | None = None
        self._run = RunCollector()
        r.register(self._run)
        self._stats = StepCollector()
        r.register(self._stats)
        self._phase = Histogram("rlhf_phase_seconds", "Seconds per phase of a training step.", ["phase"],
                                buckets=SECONDS_BUCKETS, registry=r)
        self._phases = {key: self._phase.labels(name) for key, name in PHASES.items()}
        self._steps = Counter("rlhf_steps_total", "Training steps completed.", registry=r)
        self._samples = Counter("rlhf_samples_total", "Prompts (PPO) or preference pairs (DPO) trained on.", registry=r)
        self._tokens = Counter("rlhf_response_tokens_total", "Response tokens generated and trained on (PPO).",
                               registry=r)
        self._last_step = Gauge("rlhf_last_step_timestamp_seconds",
                                "Unix time of the last completed step (the run's start before the first).", registry=r)
        self._ready = Gauge("rlhf_service_ready", "1 while the process serves (as the model services report it).",
                            ["role"], registry=r).labels("controller")
        self._samples_seen = 0

    def attach(self, servicer) -> "ControllerMetrics":
        """Report `servicer`'s run (state, planned steps); the progress clock starts now (see run_started)."""
        self._run.servicer = servicer
        self._last_step.set_to_current_time()
        return self

    def run_started(self) -> None:
        """Training begins (the services are connected): restart the progress clock."""
        self._last_step.set_to_current_time()

    def serve(self, host: str, port: int) -> None:
        """Start the /metrics endpoint once (port 0: a free one; -1: none)."""
        if self.endpoint is None and port != DISABLED:
            self.endpoint = MetricsEndpoint(self.registry, host, port)
            self._ready.set(1)
            log.info("controller metrics on %s", self.endpoint.url)

    def observe_step(self, stats: dict) -> None:
        """Export one step's statistics (a StepResult.stats dict)."""
        for key, value in stats.items():
            source = SOURCE_MEAN.fullmatch(key)
            if source:
                self._stats.sources[source.group(1)] = float(value)
            elif key in STEP_GAUGES:
                self._stats.latest[key] = float(value)
            elif key in self._phases:
                self._phases[key].observe(float(value))
        samples = int(stats.get("samples", self._samples_seen))
        new = max(samples - self._samples_seen, 0)
        self._samples_seen = samples
        self._samples.inc(new)
        if "response/length" in stats:
            self._tokens.inc(new * float(stats["response/length"]))  # batch mean x batch = batch sum
        self._steps.inc()
        self._last_step.set(time.time())

    def close(self) -> None:
        """Stop the endpoint."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None

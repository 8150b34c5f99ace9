"""Controller configuration: one YAML file, validated by pydantic."""

import pathlib
from typing import Literal

from pydantic import Field, model_validator

from services.config import DEFAULT_PORTS, ClientSecurity, ListenConfig, Strict, parse, read_yaml

TARGET_HELP = ("host:port, a comma-separated list, dns:///host:port (every record of a headless Service) "
               "or kubernetes:///service[.namespace]:port (its EndpointSlices)")


class Endpoints(ClientSecurity):
    """Where each model service's replicas are (see controller/discovery.py for the target forms)."""

    policy: str = Field(f"127.0.0.1:{DEFAULT_PORTS['policy']}",
                        description=f"PolicyService replicas (one data-parallel group): {TARGET_HELP}")
    reference: str = Field(f"127.0.0.1:{DEFAULT_PORTS['reference']}",
                           description=f"ReferenceService replicas: {TARGET_HELP}")
    reward: str = Field(f"127.0.0.1:{DEFAULT_PORTS['reward']}", description=f"RewardService replicas: {TARGET_HELP}")
    value: str = Field(f"127.0.0.1:{DEFAULT_PORTS['value']}",
                       description=f"ValueService replicas (one data-parallel group): {TARGET_HELP}")
    restart_timeout_seconds: float = Field(
        600.0, gt=0, description="How long a call keeps retrying a service that is unavailable or too slow "
        "(capped exponential backoff with jitter) before the run fails: long enough for a pod to be rescheduled "
        "and load its weights")

    @model_validator(mode="after")
    def _targets_parse(self):
        from controller.discovery import parse_target

        for role in ("policy", "reference", "reward", "value"):
            try:
                parse_target(getattr(self, role))
            except ValueError as error:
                raise ValueError(f"{role}: {error}") from None
        return self


class PPOConfig(Strict):
    """PPO hyperparameters (names follow InstructGPT / Ziegler et al. / TRL)."""

    total_steps: int = Field(100, ge=1, description="PPO iterations (generate, score, train)")
    batch_size: int = Field(64, ge=1, description="Prompts per iteration")
    minibatch_size: int = Field(16, ge=1, description="Sequences per Train request (one optimizer step)")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each batch")
    micro_batch_size: int = Field(0, ge=0, description="Sequences per forward/backward in the services; 0 = their default")
    reuse_rows: bool = Field(
        True, description="Ask policy and value to keep a step's rows after the first minibatch that sends them, so "
        "that later PPO epochs send row ids instead of the rows (RowRefs; resent in full if a trainer restarted)")
    max_new_tokens: int = Field(32, ge=1, description="Most response tokens")
    temperature: float = Field(1.0, ge=0.01, le=100, description="Sampling temperature (log-probs use the same)")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling; 1 disables")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty (initial value if adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator")
    adaptive_kl: bool = Field(False, description="Adapt beta toward kl_target (Ziegler et al. 2019)")
    kl_target: float = Field(6.0, gt=0, description="Target KL (nats per sequence) of the adaptive controller")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive controller, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    clip_range: float = Field(0.2, gt=0, le=1000, description="Policy ratio clip epsilon")
    clip_range_value: float = Field(0.2, ge=0, description="Value clip around old values; 0 disables")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch")
    reward_clip: float | None = Field(None, gt=0, description="Clip RM scores to [-c, c]")
    normalize_reward: bool = Field(False, description="Standardise RM scores with running mean and std")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus")
    ptx_coef: float = Field(0.0, ge=0, description="gamma of PPO-ptx: weight of the pretraining LM loss")
    ptx_batch_size: int = Field(8, ge=1, description="Pretraining sequences per Train request")

    @model_validator(mode="after")
    def _minibatches_divide(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of minibatch_size {self.minibatch_size}")
        return self


class RewardSource(Strict):
    """One reward signal of a run: a RewardService (a model or a rule) and its weight in the sum."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="Names the source in statistics "
                      "(reward/<name>/mean)")
    target: str = Field(description=f"Its RewardService replicas: {TARGET_HELP}")
    weight: float = Field(1.0, description="Weight of its score in the row's reward")


class CriticFreeConfig(Strict):
    """GRPO, RLOO and REINFORCE++ (controller/critic_free.py): no value model; ppo.* sets the rest."""

    samples_per_prompt: int = Field(
        4, ge=1, description="Responses sampled per prompt (the group); ppo.batch_size counts responses and must be "
        "a multiple of it. RLOO needs >= 2")
    scale_rewards: bool = Field(True, description="GRPO: divide by the group's score std; false is Dr. GRPO")
    kl_in_loss: bool = Field(
        False, description="Put kl_coef x KL(pi || pi_ref) (k3 estimator) into the policy loss, as GRPO's paper "
        "does, instead of taking it out of the scores (ppo.kl_estimator)")
    loss_aggregation: Literal["token", "sequence"] = Field(
        "token", description="token: the mean over the minibatch's response tokens; sequence: each response's "
        "token mean, then the mean over responses (GRPO's paper)")


class DPOConfig(Strict):
    """DPO hyperparameters (Rafailov et al. 2023; names as in TRL)."""

    total_steps: int = Field(100, ge=1, description="DPO optimizer steps (one Policy.Train each)")
    batch_size: int = Field(16, ge=1, description="Preference pairs per step")
    beta: float = Field(0.1, gt=0, le=1000, description="DPO temperature beta")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed probability of a flipped label (cDPO)")
    micro_batch_size: int = Field(0, ge=0, description="Sequences per forward/backward in the policy; 0 = its default")


class EvaluationConfig(Strict):
    """Reward-model comparison evaluations on held-out pairs during training."""

    pairs: str | None = Field(None, description="Held-out preference pairs (any layout training.datasets reads)")
    every: int = Field(10, ge=1, description="Evaluate after every N training steps (and after the last)")
    max_pairs: int = Field(1000, ge=1, description="Use at most this many pairs")
    chunk: int = Field(64, ge=1, description="Pairs per Compare request")


class CheckpointConfig(Strict):
    """Run checkpoints: the controller's state plus the policy's and value's training state at one step."""

    every: int = Field(10, ge=0, description="Write one every N steps (0: only at the start, on SIGTERM and at the end)")
    keep: int = Field(3, ge=1, description="Complete run checkpoints kept (older ones are removed)")
    resume: Literal["no", "auto", "yes"] = Field(
        "no", description="yes: continue from the output directory's last complete checkpoint (--resume); auto: "
        "continue when there is one, else start; no: start, refusing a directory that holds another run")
    max_restores: int = Field(
        20, ge=0, description="How often a run may go back to its last checkpoint because a trained service "
        "restarted, before it fails")


class DataConfig(Strict):
    """Where prompts, preference pairs and PPO-ptx text come from."""

    prompts: str | None = Field(None, description="PPO prompts: a file or hub id training.datasets reads (.jsonl/.txt...)")
    pairs: str | None = Field(None, description="DPO preference pairs: a file or hub id training.datasets reads")
    ptx: str | None = Field(None, description="Pretraining text for PPO-ptx: .jsonl with `text`, or .txt")
    skip_bad_rows: bool = Field(False, description="Count and skip malformed rows instead of stopping")


class ControllerServerConfig(ListenConfig):
    """The controller's own gRPC endpoint (ControllerService)."""

    port: int = Field(DEFAULT_PORTS["controller"], ge=0, le=65535, description="gRPC port; 0 picks a free one")


class ControllerConfig(Strict):
    """Everything the controller reads."""

    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Names the run in Train keys and checkpoints (1-128 letters, digits, . _ -); default: the id "
        "in output_dir/run.json, or a fresh one for a new run")
    algorithm: Literal["ppo", "dpo", "grpo", "rloo", "reinforce_pp"] = Field(
        "ppo", description="ppo (four services), dpo (policy + reference), or a critic-free estimator: grpo, rloo, "
        "reinforce_pp (policy, reference, reward)")
    services: Endpoints = Endpoints()
    ppo: PPOConfig = PPOConfig()
    dpo: DPOConfig = DPOConfig()
    critic_free: CriticFreeConfig = CriticFreeConfig()
    rewards: list[RewardSource] = Field(
        default_factory=list, description="Several reward sources, weighted: each row's reward is the weighted "
        "sum of their scores. Empty: services.reward alone, weight 1")
    evaluation: EvaluationConfig = EvaluationConfig()
    data: DataConfig
    server: ControllerServerConfig = ControllerServerConfig()
    output_dir: str = Field("runs/ppo", description="Where stats.jsonl, run.json and checkpoints/ go")
    checkpoint: CheckpointConfig = CheckpointConfig()
    save_checkpoint: str | None = Field("final", description="Policy/value SaveCheckpoint path at the end; null skips")
    rpc_timeout_seconds: float = Field(
        600.0, gt=0, description="Deadline of each RPC; the service stops work whose deadline passed")
    rpc_retries: int = Field(3, ge=0, description="Retries of an RPC that failed with RESOURCE_EXHAUSTED (overloaded); "
                             "UNAVAILABLE and DEADLINE_EXCEEDED are retried for services.restart_timeout_seconds")
    ready_timeout_seconds: float = Field(
        600.0, gt=0, description="How long to wait at start for the services to report SERVING")
    probe_seconds: float = Field(2.0, gt=0, description="Health-check period of each replica (taken out / back in)")
    seed: int = Field(0, description="Seed for prompt order and minibatch shuffling")


    @model_validator(mode="after")
    def _data_for_algorithm(self):
        needed = "pairs" if self.algorithm == "dpo" else "prompts"
        if getattr(self.data, needed) is None:
            raise ValueError(f"algorithm {self.algorithm} needs data.{needed}")
        group = self.critic_free.samples_per_prompt
        if self.critic_free_run() and self.ppo.batch_size % group:
            raise ValueError(f"ppo.batch_size {self.ppo.batch_size} must be a multiple of "
                             f"critic_free.samples_per_prompt {group}")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: names must differ, got {names}")
        if self.algorithm == "rloo" and group < 2:
            raise ValueError("rloo needs critic_free.samples_per_prompt >= 2 (the baseline is the other samples)")
        return self

    def reward_sources(self) -> list[tuple[str, str, float, str]]:
        """(pool name, target, weight, source name) of each reward source; the first pool is "reward"."""
        if not self.rewards:
            return [("reward", self.services.reward, 1.0, "reward")]
        return [("reward" if i == 0 else f"reward:{r.name}", r.target, r.weight, r.name)
                for i, r in enumerate(self.rewards)]

    def critic_free_run(self) -> bool:
        """Whether the algorithm is one of the critic-free estimators."""
        return self.algorithm in ("grpo", "rloo", "reinforce_pp")

    def total_steps(self) -> int:
        """Training steps of the configured algorithm."""
        return self.dpo.total_steps if self.algorithm == "dpo" else self.ppo.total_steps

    def roles(self) -> tuple[str, ...]:
        """The services this run talks to."""
        if self.algorithm == "ppo":
            return ("policy", "reference", "reward", "value")
        if self.critic_free_run():
            return ("policy", "reference", "reward")
        return ("policy", "reference", "reward") if self.evaluation.pairs else ("policy", "reference")


def load_controller_config(path: str | pathlib.Path) -> ControllerConfig:
    """Read and validate a controller YAML."""
    return parse(ControllerConfig, read_yaml(path), str(path))

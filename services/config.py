"""Service configuration: one YAML file per process, validated by pydantic.

The Helm chart renders the same YAML into ConfigMaps, so this module is the
one schema for local runs and the cluster.
"""

import pathlib
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Role = Literal["policy", "reference", "reward", "value"]
Scope = Literal["score", "infer", "train", "admin"]

DEFAULT_PORTS = {"controller": 50050, "policy": 50051, "reference": 50052, "reward": 50053, "value": 50054}
DEFAULT_METRICS_PORTS = {"controller": 9400, "policy": 9401, "reference": 9402, "reward": 9403, "value": 9404}


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    """Which checkpoint to load and where to run it."""

    path: str = Field(description="Hugging Face hub id or local directory of the checkpoint")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    tokenizer: str | None = Field(None, description="Tokenizer id or directory; defaults to `path`")
    device: str = Field("cpu", description="torch device: cpu, cuda or cuda:N")
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Weight and compute dtype")
    max_sequence_length: int | None = Field(
        None, ge=2, description="Longest prompt + response in tokens; defaults to the model's position limit"
    )
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub")
    fused_activations: bool = Field(
        True, description="Run the tanh-approximate GELU that GPT-2-style models write as a chain of elementwise "
        "ops (gelu_new, gelu_fast) as torch's one fused kernel of the same function; false keeps the model's own")


class BatchingConfig(Strict):
    """Dynamic batching of concurrent requests."""

    max_batch_size: int = Field(64, ge=1, description="Most sequences in one model call")
    max_batch_tokens: int = Field(32768, ge=1, description="Most tokens (sum of row lengths) in one model call")
    max_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits for more requests, in milliseconds")
    max_queue: int = Field(256, ge=1, description="Requests waiting beyond this get RESOURCE_EXHAUSTED")
    max_request_rows: int = Field(4096, ge=1, description="Most rows in one request (every RPC, Tokenize included)")
    max_request_tokens: int = Field(
        1 << 20, ge=1, description="Token budget of one request: rows x its longest row (with max_new_tokens for "
        "Generate); a larger request is INVALID_ARGUMENT")
    max_text_bytes: int = Field(
        64 * 1024, ge=1, description="Most UTF-8 bytes in one text (prompt, response), checked before tokenising")
    max_request_text_bytes: int = Field(
        8 * 1024 * 1024, ge=1, description="Most UTF-8 bytes of text in one request, checked before tokenising")


class TrainingConfig(Strict):
    """Optimizer and DeepSpeed engine of a trainable service (policy, value)."""

    learning_rate: float = Field(1e-5, gt=0, description="Adam learning rate")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    micro_batch_size: int = Field(8, ge=1, description="Default sequences per forward/backward pass")
    max_micro_batch_tokens: int = Field(
        8192, ge=1, description="Token budget of one forward/backward pass (rows x longest row): a request's "
        "micro-batches are made smaller until they fit, whatever micro_batch_size it asks for")
    max_abs_input: float = Field(
        1e6, gt=0, description="Largest magnitude a Train request may send in advantages, returns, old values, "
        "old log-probs and DPO reference log-probs (INVALID_ARGUMENT beyond it)")
    lease_seconds: float = Field(
        600.0, gt=0, description="How long a run's lease on this trainer lasts after its last Train, "
        "SaveCheckpoint or LoadCheckpoint; meanwhile other runs' Train keys are refused")
    row_cache_tokens: int = Field(
        4_194_304, ge=0, description="Tokens of the current PPO step's rows kept between its minibatches (RowRefs), "
        "so that later epochs name rows by id instead of sending them again; 0 keeps none")
    idempotency_cache: int = Field(
        4096, ge=1, description="Applied Train results kept for replay; an older key of the same run is refused, "
        "never applied again")
    restore_from: str | None = Field(
        None, description="At start, load the newest complete training state under this directory (relative to "
        "server.checkpoint_dir; the controller writes runs/<run_id>/step-N), e.g. runs/my-run")
    collective_timeout_seconds: float = Field(
        600.0, gt=0,
        description="How long a rank of a data-parallel group waits for the others in one Train step "
        "before the process exits (the group then restarts as a unit)",
    )


class ServerTLSConfig(Strict):
    """TLS of a gRPC server; with client_ca_file, mutual TLS (clients must present a certificate)."""

    cert_file: str = Field(description="PEM certificate chain the server presents")
    key_file: str = Field(description="PEM private key of cert_file")
    client_ca_file: str | None = Field(
        None, description="PEM CA bundle; when set, every client must present a certificate it signed (mutual TLS)")
    reload_seconds: float = Field(
        60.0, ge=0, description="How often new connections check the files for a renewed certificate; 0 never")


class TokenConfig(Strict):
    """One bearer token a server accepts: its SHA-256 (or a file holding the token) and its scopes."""

    name: str = Field(description="Who holds it (appears in logs, never the token)")
    scopes: list[Scope] = Field(min_length=1, description="score, infer, train and/or admin")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the token")
    file: str | None = Field(None, description="A file holding the token itself (a mounted Secret); hashed at start")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.sha256 is None) == (self.file is None):
            raise ValueError(f"token {self.name!r}: set exactly one of sha256 and file")
        return self


class AuthConfig(Strict):
    """Bearer-token authentication of a gRPC server: no tokens configured means none is asked for."""

    tokens: list[TokenConfig] = Field(
        default_factory=list, description="Accepted tokens; each call sends `authorization: Bearer <token>` and "
        "needs a token with the method's scope (health checks and reflection stay open)")


class ListenConfig(Strict):
    """Where a process listens and who may call it: gRPC address, TLS, tokens, limits, /metrics port."""

    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 for every interface (the chart sets it)")
    tls: ServerTLSConfig | None = Field(None, description="TLS (mutual with client_ca_file); null serves plain text")
    auth: AuthConfig = AuthConfig()
    reflection: bool = Field(True, description="Serve gRPC server reflection (the schema, no data)")
    max_message_mb: int = Field(64, ge=1, le=2047, description="Largest request message accepted, in MiB")
    max_concurrent_rpcs: int = Field(
        512, ge=1, description="RPCs in progress at once (health checks not counted); beyond it a call is "
        "refused at once with RESOURCE_EXHAUSTED")
    refusals_per_second: int = Field(
        100, ge=1, description="Refusals for load a second the server aims to answer: the retry delay it asks of "
        "refused callers (grpc-retry-pushback-ms, 10 ms - 10 s, honoured by gRPC retry policies and the controller) "
        "is sized so that callers who wait it are refused about this often")
    metrics_port: int | None = Field(
        None, ge=-1, le=65535,
        description="Prometheus /metrics HTTP port; 0 picks a free one, -1 disables; default per process "
        "(controller 9400, policy 9401, reference 9402, reward 9403, value 9404), or a free one when `port` is 0",
    )


class ServerConfig(ListenConfig):
    """Network and process settings of a model service."""

    port: int | None = Field(None, ge=0, le=65535, description="gRPC port; 0 picks a free one; default per role")
    grace_seconds: float = Field(10.0, ge=0, description="How long SIGTERM waits for in-flight requests")
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; default: the CPUs this process may use (affinity mask and "
        "cgroup CPU quota), divided among the processes a launcher started together (RLHF_PROCESSES_PER_HOST)")
    checkpoint_dir: str | None = Field(
        None, description="SaveCheckpoint paths are relative to this directory; default checkpoints/<role>"
    )
    checkpoint_max_count: int = Field(
        256, ge=1, description="Most checkpoints (weights, and training states under runs/<run_id>/) kept in "
        "checkpoint_dir; SaveCheckpoint beyond it is RESOURCE_EXHAUSTED. Finished runs' states stay until removed")
    checkpoint_max_gb: float = Field(
        1024.0, gt=0, description="Most GiB checkpoint_dir may hold; a SaveCheckpoint that would pass it is "
        "RESOURCE_EXHAUSTED")
    seed: int = Field(0, description="Seed for initialisation and sampling")
    freeze_gc: bool = Field(
        True, description="Once the model is loaded, move every object then alive out of Python's cyclic garbage "
        "collector's scans (gc.freeze), so that full collections stop pausing the event loop for the time it "
        "takes to walk the model's objects")


class TGIConfig(Strict):
    """A text-generation-inference server that computes the reference log-probs (`backend: tgi`)."""

    url: str = Field(description="Base URL of the TGI server, e.g. http://tgi:8080; it must serve the policy's "
                     "tokenizer and return prefill log-probs (decoder_input_details)")
    timeout_seconds: float = Field(30.0, gt=0, description="Limit of one HTTP request, in seconds (a LogProbs "
                                   "call's own deadline also bounds it)")
    max_concurrency: int = Field(16, ge=1, description="Most HTTP requests in flight at once (one per row)")
    retries: int = Field(3, ge=0, description="Retries of a request after a connection error, timeout, HTTP 429 "
                         "or 5xx, with exponential backoff; then the call is UNAVAILABLE")
    token_file: str | None = Field(
        None, description="File holding the bearer token for the TGI server; without it huggingface_hub sends the "
        "machine's Hugging Face token (HF_TOKEN), if there is one")


class TEIConfig(Strict):
    """A text-embeddings-inference server that serves the reward model (`backend: tei`, reward role)."""

    url: str = Field(description="Base URL of the TEI server, e.g. http://tei:8080; it serves the reward model as a "
                     "sequence classifier at /predict")
    input: Literal["joined", "pair"] = Field(
        "joined", description="joined: send prompt + response + the tokenizer's eos as one text (models trained by "
        "rlhf train-rm); pair: send [prompt, response] (cross-encoder reward models)")
    label: str | None = Field(None, description="Which label's raw score is the reward when the model has several; "
                              "default: the only one")
    max_batch_rows: int = Field(32, ge=1, description="Most rows in one /predict request (TEI's "
                                "--max-client-batch-size, 32 by default)")
    max_concurrency: int = Field(4, ge=1, description="Most /predict requests in flight at once")
    timeout_seconds: float = Field(30.0, gt=0, description="Limit of one HTTP request, in seconds")
    retries: int = Field(3, ge=0, description="Retries of a request after a connection error, timeout, HTTP 429 "
                         "or 5xx, with exponential backoff; then the call is UNAVAILABLE")
    token_file: str | None = Field(None, description="File holding a bearer token for the TEI server")


class PythonRewardConfig(Strict):
    """A rule or verifier in Python served as the RewardService (`backend: python`)."""

    function: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description=
                          "package.module:function, called as function(prompt, response, **kwargs) -> float "
                          "(with batched: function(prompts, responses, **kwargs) -> list of floats)")
    batched: bool = Field(False, description="Call the function once per request with the lists of rows")
    kwargs: dict = Field(default_factory=dict, description="Keyword arguments for every call (e.g. a file path)")
    timeout_seconds: float = Field(10.0, gt=0, description="A request whose rows take longer is DEADLINE_EXCEEDED")
    workers: int = Field(4, ge=1, description="Threads that run the function")


class ServiceConfig(Strict):
    """Everything one model service process reads."""

    role: Role
    model: ModelConfig | None = Field(None, description="The checkpoint to serve; required but with backend: python")
    server: ServerConfig = ServerConfig()
    batching: BatchingConfig = BatchingConfig()
    training: TrainingConfig = TrainingConfig()
    backend: Literal["local", "tgi", "tei", "python"] = Field(
        "local", description="local: run the model in this process; tgi (reference role only): ask the TGI "
        "server of `tgi` for the log-probs, loading only the tokenizer of `model`; tei (reward role only): ask "
        "the TEI server of `tei` for the scores, loading only the tokenizer of `model`; python (reward role only): "
        "score texts with the function of `python`")
    tgi: TGIConfig | None = Field(None, description="The TGI server of `backend: tgi`")
    tei: TEIConfig | None = Field(None, description="The TEI server of `backend: tei`")
    python: PythonRewardConfig | None = Field(None, description="The rule of `backend: python`")

    @model_validator(mode="after")
    def _backend(self):
        if self.backend == "tgi" and self.role != "reference":
            raise ValueError(f"backend: tgi serves the reference role only, not {self.role}")
        if self.backend == "tgi" and self.tgi is None:
            raise ValueError("backend: tgi needs a `tgi` section with the server's url")
        if self.backend != "tgi" and self.tgi is not None:
            raise ValueError("tgi: set only with backend: tgi")
        if self.backend == "tei" and self.role != "reward":
            raise ValueError(f"backend: tei serves the reward role only, not {self.role}")
        if (self.backend == "tei") != (self.tei is not None):
            raise ValueError("backend: tei and a `tei` section (url: the TEI server) go together")
        if self.backend == "python" and self.role != "reward":
            raise ValueError(f"backend: python serves the reward role only, not {self.role}")
        if (self.backend == "python") != (self.python is not None):
            raise ValueError("backend: python and a `python` section (function: package.module:function) go together")
        if self.model is None:
            if self.backend != "python":
                raise ValueError("model: required (the checkpoint to serve)")
            self.model = ModelConfig(path=self.python.function)  # what Info and the logs name
        return self

    def grpc_port(self) -> int:
        """The configured port, or the role's default."""
        return DEFAULT_PORTS[self.role] if self.server.port is None else self.server.port


class ClientTLSConfig(Strict):
    """TLS of a client's channels: the CA that signed the servers' certificates, and for mutual TLS its own."""

    ca_file: str | None = Field(None, description="PEM CA bundle the servers' certificates chain to; default: "
                                "the system's roots")
    cert_file: str | None = Field(None, description="PEM client certificate (mutual TLS)")
    key_file: str | None = Field(None, description="PEM private key of cert_file")
    server_name: str | None = Field(None, description="Name to check the server certificates against, when it "
                                    "differs from the address dialled")

    @model_validator(mode="after")
    def _pair(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: cert_file and key_file go together")
        return self


class ClientSecurity(Strict):
    """How a client (the controller, rlhf score / eval-rm, the benchmarks) reaches secured services."""

    tls: ClientTLSConfig | None = Field(None, description="Connect with TLS; null: plain text")
    token_file: str | None = Field(
        None, description="File holding the bearer token to send; default: the RLHF_TOKEN environment variable")


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message says where."""


def read_yaml(path: str | pathlib.Path) -> dict:
    """Load a YAML mapping, raising ConfigError with the file name on failure."""
    path = pathlib.Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"{path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def parse(model: type[BaseModel], data: dict, source: str):
    """Validate `data` as `model`, turning pydantic errors into one-line ConfigErrors."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise ConfigError(f"{source}: {where}: {first['msg']}{more}") from None


def load_service_config(path: str | pathlib.Path, role: str | None = None) -> ServiceConfig:
    """Read a service YAML; `role` (from the CLI) fills in or must match `role:`."""
    data = read_yaml(path)
    if role is not None:
        if data.setdefault("role", role) != role:
            raise ConfigError(f"{path}: role is {data['role']!r} but the command serves {role!r}")
    return parse(ServiceConfig, data, str(path))

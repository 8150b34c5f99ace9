"""Loading Hugging Face checkpoints: the one model and tokenizer loader.

The services load each role through the LOADERS registry; the offline
trainer of steps 1-2 (training/) loads its starting models with the same
functions, so a checkpoint means the same thing everywhere.

policy / reference: AutoModelForCausalLM.
reward: AutoModelForSequenceClassification with one label (a causal LM
  checkpoint gets that architecture's scalar `score` head).
value: the same one-label architecture, used per token: backbone hidden
  states -> scalar head. Point it at the reward model to initialise the
  critic from the RM as InstructGPT does, or at the SFT model for a fresh head.
"""

import functools
import hashlib
import inspect
import json
import logging
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.activations import FastGELUActivation, NewGELUActivation
from transformers.utils import logging as hf_logging

from services.batch import ModelLimits
from services.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length")


@functools.cache
def _forward_parameters(model_type: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model_type.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def forward_takes(model, argument: str) -> bool:
    """Whether the model's forward (or that of the model a DeepSpeed engine wraps) takes `argument`."""
    return argument in _forward_parameters(type(getattr(model, "module", model)))


def no_cache(model) -> dict:
    """Forward arguments that spare a pass that does not generate building a KV cache: {"use_cache": False}
    where the model takes the argument, else none."""
    return {"use_cache": False} if forward_takes(model, "use_cache") else {}


class TokenValueModel(torch.nn.Module):
    """A one-label sequence-classification model read at every position.

    forward -> (B, T) scalar per position: head(backbone(x).last_hidden_state).
    """

    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        head = getattr(hf_model, "score", None)
        if head is None:
            raise ValueError(f"{type(hf_model).__name__} has no `score` head; the critic needs a decoder backbone")
        self.hf_model = hf_model
        self.config = hf_model.config

    def forward(self, input_ids, attention_mask):
        backbone = self.hf_model.base_model
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **no_cache(backbone)).last_hidden_state
        return self.hf_model.score(hidden).squeeze(-1)  # (B, T)

    def save_pretrained(self, path, **kwargs):
        """Save as the underlying sequence-classification checkpoint."""
        self.hf_model.save_pretrained(path, **kwargs)


@dataclass
class LoadedModel:
    """A model ready to serve, with the facts clients ask Info for."""

    model: torch.nn.Module | None  # None when another server runs it (reference with backend: tgi)
    tokenizer: object
    limits: ModelLimits
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    pad_id: int
    eos_id: int


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over the vocabulary and special tokens: equal iff token ids mean the same."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def position_limit(hf_config, requested: int | None = None, default: int = 2048) -> int:
    """The model's number of positions (`default` if its config declares none), capped at `requested`."""
    limit = next((getattr(hf_config, a) for a in _POSITION_ATTRS if isinstance(getattr(hf_config, a, None), int)),
                 default)
    return int(min(limit, requested) if requested is not None else limit)


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer at `path` with an eos token (sep for BERT-style tokenizers) and a pad token (eos if none).

    Sequences end with eos (`encode_for_reward` reads the score there), and
    batches are padded, so both must exist.
    """
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:  # many causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def causal_lm(path: str, dtype: torch.dtype, tokenizer, revision: str | None = None,
              trust_remote_code: bool = False) -> torch.nn.Module:
    """Any causal LM (AutoModelForCausalLM), its config's pad id set from the tokenizer when missing."""
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                                 dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def sequence_classifier(path: str, dtype: torch.dtype, tokenizer, revision: str | None = None,
                        trust_remote_code: bool = False, new_head: bool = False) -> torch.nn.Module:
    """A one-label AutoModelForSequenceClassification on `path`.

    A decoder (GPT-2, OPT, Llama...) reads its score at the last non-pad token,
    which needs config.pad_token_id. new_head: a head of another size is
    replaced by a fresh one-output head, quietly (training a reward model from
    an SFT checkpoint); otherwise a causal-LM checkpoint still gets a fresh
    scalar `score` head.
    """
    verbosity = hf_logging.get_verbosity()
    if new_head:
        hf_logging.set_verbosity_error()  # "newly initialised score head" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, revision=revision, trust_remote_code=trust_remote_code, dtype=dtype,
            **({"ignore_mismatched_sizes": True} if new_head else {}))
    finally:
        hf_logging.set_verbosity(verbosity)
    if new_head or model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def fuse_activations(model: torch.nn.Module) -> int:
    """Swap each tanh-approximate GELU written as elementwise ops (gelu_new, gelu_fast) for torch's one fused
    kernel of the same function, equal to float rounding; returns how many were swapped.

    Six to eight tensor ops, each a pass over the MLP's widest activation, were about a third of a small GPT-2's
    MLP forward time on a CPU (docs/benchmarks.md).
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def _finish(model, tokenizer, cfg: ModelConfig) -> LoadedModel:
    device = torch.device(cfg.device)
    if cfg.fused_activations and (swapped := fuse_activations(model)):
        log.info("running %d tanh-GELU activations as torch's fused kernel (model.fused_activations)", swapped)
    dtype = DTYPES[cfg.dtype]
    model.to(device=device, dtype=dtype)
    model.eval()  # dropout off: sampling-time and training-time log-probs must agree
    hf_config = model.config
    if getattr(hf_config, "pad_token_id", None) is None:
        hf_config.pad_token_id = tokenizer.pad_token_id
    embeddings = (model.hf_model if isinstance(model, TokenValueModel) else model).get_input_embeddings()
    limits = ModelLimits(vocab_size=embeddings.num_embeddings,
                         max_length=position_limit(hf_config, cfg.max_sequence_length))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    return LoadedModel(model, tokenizer, limits, device, dtype, tokenizer_fingerprint(tokenizer), tokenizer.pad_token_id, eos)


def _tokenizer_for(cfg: ModelConfig):
    return load_tokenizer(cfg.tokenizer or cfg.path, cfg.revision, cfg.trust_remote_code)


def load_causal_lm(cfg: ModelConfig) -> LoadedModel:
    """Policy and reference: any causal LM."""
    tokenizer = _tokenizer_for(cfg)
    model = causal_lm(cfg.path, DTYPES[cfg.dtype], tokenizer, cfg.revision, cfg.trust_remote_code)
    return _finish(model, tokenizer, cfg)


def load_reward_model(cfg: ModelConfig) -> LoadedModel:
    """Reward: one-label sequence classifier, score read at the last non-pad token."""
    tokenizer = _tokenizer_for(cfg)
    model = sequence_classifier(cfg.path, DTYPES[cfg.dtype], tokenizer, cfg.revision, cfg.trust_remote_code)
    return _finish(model, tokenizer, cfg)


def load_value_model(cfg: ModelConfig) -> LoadedModel:
    """Value: one-label classifier backbone + head applied at every position."""
    tokenizer = _tokenizer_for(cfg)
    model = sequence_classifier(cfg.path, DTYPES[cfg.dtype], tokenizer, cfg.revision, cfg.trust_remote_code)
    return _finish(TokenValueModel(model), tokenizer, cfg)


def load_tokenizer_only(cfg: ModelConfig) -> LoadedModel:
    """The tokenizer and the limits of `cfg`'s model, from its config.json alone (no weights): for a role whose
    model runs elsewhere (reference with backend: tgi)."""
    tokenizer = _tokenizer_for(cfg)
    hf_config = AutoConfig.from_pretrained(cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    limits = ModelLimits(vocab_size=hf_config.vocab_size, max_length=position_limit(hf_config, cfg.max_sequence_length))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    return LoadedModel(None, tokenizer, limits, torch.device("cpu"), DTYPES[cfg.dtype],
                       tokenizer_fingerprint(tokenizer), tokenizer.pad_token_id, eos)


LOADERS = {
    "policy": load_causal_lm,
    "reference": load_causal_lm,
    "reward": load_reward_model,
    "value": load_value_model,
}

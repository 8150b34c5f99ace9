"""Loading Hugging Face checkpoints for each role, through a registry dict.

policy / reference: AutoModelForCausalLM.
reward: AutoModelForSequenceClassification with one label (a causal LM
  checkpoint gets that architecture's scalar `score` head).
value: the same one-label architecture, used per token: backbone hidden
  states -> scalar head. Point it at the reward model to initialise the
  critic from the RM as InstructGPT does, or at the SFT model for a fresh head.
"""

import hashlib
import json
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from services.batch import ModelLimits
from services.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


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
        hidden = self.hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.hf_model.score(hidden).squeeze(-1)  # (B, T)

    def save_pretrained(self, path, **kwargs):
        """Save as the underlying sequence-classification checkpoint."""
        self.hf_model.save_pretrained(path, **kwargs)


@dataclass
class LoadedModel:
    """A model ready to serve, with the facts clients ask Info for."""

    model: torch.nn.Module
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


def _max_length(hf_config, cfg: ModelConfig) -> int:
    limit = next((getattr(hf_config, a) for a in _POSITION_ATTRS if getattr(hf_config, a, None)), 2048)
    if cfg.max_sequence_length is not None:
        limit = min(limit, cfg.max_sequence_length)
    return int(limit)


def _load_tokenizer(cfg: ModelConfig):
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.tokenizer or cfg.path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
    )
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _finish(model, tokenizer, cfg: ModelConfig) -> LoadedModel:
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    model.to(device=device, dtype=dtype)
    model.eval()  # dropout off: sampling-time and training-time log-probs must agree
    hf_config = model.config
    if getattr(hf_config, "pad_token_id", None) is None:
        hf_config.pad_token_id = tokenizer.pad_token_id
    embeddings = (model.hf_model if isinstance(model, TokenValueModel) else model).get_input_embeddings()
    limits = ModelLimits(vocab_size=embeddings.num_embeddings, max_length=_max_length(hf_config, cfg))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else -1
    return LoadedModel(model, tokenizer, limits, device, dtype, tokenizer_fingerprint(tokenizer), tokenizer.pad_token_id, eos)


def _hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code, "dtype": DTYPES[cfg.dtype]}


def load_causal_lm(cfg: ModelConfig) -> LoadedModel:
    """Policy and reference: any causal LM."""
    tokenizer = _load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.path, **_hub_kwargs(cfg))
    return _finish(model, tokenizer, cfg)


def _sequence_classifier(cfg: ModelConfig, tokenizer):
    model = AutoModelForSequenceClassification.from_pretrained(cfg.path, num_labels=1, **_hub_kwargs(cfg))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_reward_model(cfg: ModelConfig) -> LoadedModel:
    """Reward: one-label sequence classifier, score read at the last non-pad token."""
    tokenizer = _load_tokenizer(cfg)
    return _finish(_sequence_classifier(cfg, tokenizer), tokenizer, cfg)


def load_value_model(cfg: ModelConfig) -> LoadedModel:
    """Value: one-label classifier backbone + head applied at every position."""
    tokenizer = _load_tokenizer(cfg)
    return _finish(TokenValueModel(_sequence_classifier(cfg, tokenizer)), tokenizer, cfg)


LOADERS = {
    "policy": load_causal_lm,
    "reference": load_causal_lm,
    "reward": load_reward_model,
    "value": load_value_model,
}

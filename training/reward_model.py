"""Step 2 of InstructGPT: a reward model from pairwise comparisons.

A sequence classifier with one output (GPT2ForSequenceClassification from the
SFT checkpoint) reads its score r(x, y) at the last non-pad token, which is
the eos that `encode_for_reward` appends. Loss (InstructGPT eq. 1, one
comparison per pair): -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).
"""

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          PreTrainedTokenizerBase)
from transformers.utils import logging as hf_logging

from training.formatting import encode_for_reward, pad_right
from training.sft import adamw_with_cosine

Pair = tuple[str, str, str]  # (prompt, chosen, rejected)


def encode_reward_batch(tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                        responses: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (B, T), right-padded with the pad id."""
    seqs = [encode_for_reward(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    ids, mask = pad_right(seqs, tokenizer.pad_token_id)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss: mean of -log sigmoid(r_chosen - r_rejected); inputs (B,)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def pair_rewards(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair],
                 max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), from ONE forward over the 2B sequences."""
    prompts = [p for p, _, _ in pairs] * 2
    responses = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    rewards = model(**encode_reward_batch(tokenizer, prompts, responses, max_length)).logits
    rewards = rewards[:, 0]  # (2B,)
    return rewards[:len(pairs)], rewards[len(pairs):]


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                responses: list[str], max_length: int = 64, batch_size: int = 128
                ) -> torch.Tensor:
    """Reward-model scores r(x, y) of prompt/response pairs, shape (B,), float32."""
    model.eval()
    scores = []
    for start in range(0, len(prompts), batch_size):
        batch = encode_reward_batch(tokenizer, prompts[start:start + batch_size],
                                    responses[start:start + batch_size], max_length)
        scores.append(model(**batch).logits[:, 0].float())
    return torch.cat(scores) if scores else torch.zeros(0)


def pair_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[Pair],
                  max_length: int = 64) -> float:
    """Fraction of pairs whose chosen response the model scores strictly higher."""
    chosen = score_texts(model, tokenizer, [p for p, _, _ in pairs], [c for _, c, _ in pairs],
                         max_length)
    rejected = score_texts(model, tokenizer, [p for p, _, _ in pairs], [r for _, _, r in pairs],
                           max_length)
    return float((chosen > rejected).float().mean())


def load_reward_base(base_dir: str | Path
                     ) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer): a one-output sequence classifier on the checkpoint in base_dir.

    config.pad_token_id is set from the tokenizer, so the score is read at the
    last non-pad token (the eos) of right-padded rows.
    """
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError("the reward tokenizer needs a pad token distinct from eos")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a causal-LM checkpoint has no score head: expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def train_reward_model(base_dir: str | Path, pairs: list[Pair], out_dir: str | Path, *,
                       epochs: int = 2, lr: float = 1e-3, batch_size: int = 32,
                       max_length: int = 64, seed: int = 0, eval_pairs: list[Pair] | None = None,
                       progress: bool = True, warmup_ratio: float = 0.05,
                       max_grad_norm: float = 1.0) -> dict:
    """Train a reward model on (prompt, chosen, rejected) pairs; save it (+ tokenizer) to out_dir.

    batch_size counts pairs per step (2 * batch_size sequences per forward).
    The defaults suit the demo's tiny GPT-2 on 3,000 pairs (188 steps, about
    15 s on 2 CPU cores; held-out pair accuracy ~0.85).
    Saves config.reward_mean / reward_std: the score's mean and std over
    training responses, for callers that normalise rewards. Returns {"loss",
    "train_accuracy", "eval_accuracy" (None without eval_pairs), "reward_mean",
    "reward_std", "steps", "seconds"}.
    """
    torch.manual_seed(seed)
    model, tokenizer = load_reward_base(base_dir)
    total_steps = epochs * math.ceil(len(pairs) / batch_size)
    optimizer, scheduler = adamw_with_cosine(model, lr, total_steps, warmup_ratio)
    generator = torch.Generator().manual_seed(seed)
    losses, hits = [], []
    start_time = time.perf_counter()
    model.train()
    with tqdm(total=total_steps, desc="reward model", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(pairs), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = [pairs[i] for i in order[start:start + batch_size]]
                r_chosen, r_rejected = pair_rewards(model, tokenizer, batch, max_length)
                loss = pairwise_loss(r_chosen, r_rejected)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                hits.append(float((r_chosen > r_rejected).float().mean()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{hits[-1]:.2f}")
    seconds = time.perf_counter() - start_time
    stats = _finish(model, tokenizer, pairs, eval_pairs, max_length, out_dir)
    tail = max(1, len(losses) // 10)
    return {"loss": sum(losses[-tail:]) / tail, "train_accuracy": sum(hits[-tail:]) / tail,
            **stats, "steps": len(losses), "seconds": seconds}


def _finish(model, tokenizer, pairs: list[Pair], eval_pairs: list[Pair] | None,
            max_length: int, out_dir: str | Path) -> dict:
    """Evaluate, record reward statistics in the config, and save model + tokenizer."""
    sample = pairs[:512]
    scores = torch.cat([
        score_texts(model, tokenizer, [p for p, _, _ in sample], [c for _, c, _ in sample], max_length),
        score_texts(model, tokenizer, [p for p, _, _ in sample], [r for _, _, r in sample], max_length),
    ])
    model.config.reward_mean = float(scores.mean())
    model.config.reward_std = float(scores.std()) if len(scores) > 1 else 1.0
    eval_accuracy = pair_accuracy(model, tokenizer, eval_pairs, max_length) if eval_pairs else None
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return {"eval_accuracy": eval_accuracy, "reward_mean": model.config.reward_mean,
            "reward_std": model.config.reward_std}

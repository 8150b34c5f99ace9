"""`rlhf train-rm`: step 2 with InstructGPT's loss over all C(K, 2) pairs of a ranking.

InstructGPT eq. 1: for a prompt x with K ranked responses, every pair
(y_w better than y_l) adds -log sigmoid(r(x, y_w) - r(x, y_l)). All pairs of a
prompt go into ONE batch and each response is forwarded ONCE: a batch of
prompts forwards sum(K_i) sequences and its loss is the mean over its
sum(C(K_i, 2)) pairs. This avoids K-1 redundant forwards per response and the
overfitting that InstructGPT saw when the pairs of one prompt were shuffled
across batches as independent examples. A plain (prompt, chosen, rejected)
pair is K = 2.

Texts are encoded by `services.formatting.encode_for_reward` (prompt +
response + eos), exactly as the reward service scores them; the model's own
head reads the score (decoders: at the last non-pad token, the eos).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from services.formatting import encode_for_reward, pad_right
from services.models import position_limit, sequence_classifier
from services.objectives import pairwise_ranking_loss
from training.checkpoints import load_tokenizer, save_model
from training.datasets import RankedPrompt
from training.ds_trainer import TrainerConfig, train


@dataclass(frozen=True)
class RankedGroup:
    """One prompt's K encoded responses (best first) and its (better, worse) index pairs."""

    sequences: tuple[tuple[int, ...], ...]  # K token-id rows: prompt + response + eos
    pairs: tuple[tuple[int, int], ...]  # C(K, 2) pairs of indices into sequences


def encode_groups(tokenizer, records: Sequence, max_length: int) -> list[RankedGroup]:
    """Groups from RankedPrompt records (all C(K, 2) pairs) or (prompt, chosen, rejected) tuples."""
    groups = []
    for record in records:
        if isinstance(record, RankedPrompt):
            prompt, responses, pairs = record.prompt, record.responses, tuple(record.pairs())
        else:
            prompt, chosen, rejected = record
            responses, pairs = (chosen, rejected), ((0, 1),)
        sequences = tuple(tuple(encode_for_reward(tokenizer, prompt, r, max_length)) for r in responses)
        groups.append(RankedGroup(sequences, pairs))
    return groups


def collate_groups(groups: Sequence[RankedGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (N, T) with N = sum(K_i) rows, right-padded; better, worse (P,).

    better[p] / worse[p] index the rows of pair p; P = sum(C(K_i, 2)).
    """
    rows, better, worse = [], [], []
    for group in groups:
        offset = len(rows)
        rows.extend(list(seq) for seq in group.sequences)
        better.extend(offset + b for b, _ in group.pairs)
        worse.extend(offset + w for _, w in group.pairs)
    ids, mask = pad_right(rows, pad_id)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "better": torch.tensor(better), "worse": torch.tensor(worse)}


def ranking_loss(rewards: torch.Tensor, better: torch.Tensor, worse: torch.Tensor,
                 margin: float | None = None) -> torch.Tensor:
    """InstructGPT eq. 1: mean over pairs of -log sigmoid(r[better] - r[worse] - margin).

    rewards (N,): one score per forwarded response; better, worse (P,) index it.
    """
    return pairwise_ranking_loss(rewards[better], rewards[worse], margin or None)


def group_rewards(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores (N,) of every row of a collated batch, one forward pass."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()


@dataclass
class RankingObjective:
    """The K-choose-2 ranking loss; eval: loss and pair accuracy on held-out prompts."""

    pad_id: int
    margin: float = 0.0
    eval_groups: list[RankedGroup] = field(default_factory=list)
    eval_batch_size: int = 8
    name: str = "reward model"
    unit: str = "pairs"

    def weight(self, group: RankedGroup) -> int:
        """C(K, 2): the pairs this prompt adds to the batch mean."""
        return len(group.pairs)

    def loss(self, engine, groups: Sequence[RankedGroup], normaliser: int) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(engine.device) for k, v in collate_groups(groups, self.pad_id).items()}
        rewards = group_rewards(engine, batch)  # (N,) each response forwarded once
        n_pairs = len(batch["better"])
        loss = ranking_loss(rewards, batch["better"], batch["worse"], self.margin) * (n_pairs / normaliser)
        correct = float((rewards[batch["better"]] > rewards[batch["worse"]]).sum())
        return loss, {"accuracy": correct}

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module) -> dict[str, float | int]:
        if not self.eval_groups:
            return {}
        module.eval()
        device = next(module.parameters()).device
        loss_sum, correct, pairs = 0.0, 0.0, 0
        for start in range(0, len(self.eval_groups), self.eval_batch_size):
            batch = collate_groups(self.eval_groups[start:start + self.eval_batch_size], self.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            rewards = group_rewards(module, batch)
            n = len(batch["better"])
            loss_sum += float(ranking_loss(rewards, batch["better"], batch["worse"], self.margin)) * n
            correct += float((rewards[batch["better"]] > rewards[batch["worse"]]).sum())
            pairs += n
        return {"eval/loss": loss_sum / pairs, "eval/accuracy": correct / pairs, "eval/pairs": pairs}


@torch.no_grad()
def reward_statistics(module: torch.nn.Module, groups: Sequence[RankedGroup], pad_id: int,
                      batch_size: int = 8) -> tuple[float, float]:
    """Mean and std of the scores of (up to 256 prompts') training responses."""
    module.eval()
    device = next(module.parameters()).device
    scores = []
    for start in range(0, min(len(groups), 256), batch_size):
        batch = collate_groups(groups[start:start + batch_size], pad_id)
        scores.append(group_rewards(module, {k: v.to(device) for k, v in batch.items()}).cpu())
    scores = torch.cat(scores)
    return float(scores.mean()), float(scores.std()) if len(scores) > 1 else 1.0


def run_train_rm(model_path: str | Path, records: Sequence, out_dir: str | Path, cfg: TrainerConfig, *,
                 max_length: int = 512, margin: float = 0.0, eval_records: Sequence = (),
                 resume: bool = False) -> dict:
    """Train a reward model from the model at model_path on ranked/paired records; save to out_dir.

    cfg.batch_size counts prompts per optimizer step. Saves with save_pretrained
    (plus config.reward_mean / reward_std, the score's mean and std over training responses), so
    `AutoModelForSequenceClassification.from_pretrained(out_dir)` and the
    reward service load it. Returns the trainer's summary (pairs/s, eval accuracy...).
    """
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    model = sequence_classifier(str(model_path), torch.float32, tokenizer, new_head=True)
    model.config.use_cache = False  # scoring never decodes; no KV cache to build in training
    max_length = position_limit(model.config, max_length, default=max_length)
    groups = encode_groups(tokenizer, records, max_length)
    objective = RankingObjective(tokenizer.pad_token_id, margin, encode_groups(tokenizer, eval_records, max_length),
                                 cfg.micro_batch_size)
    engine, summary = train(model, tokenizer, objective, groups, cfg, out_dir, resume)
    mean, std = reward_statistics(engine.module, groups, tokenizer.pad_token_id, cfg.micro_batch_size)
    engine.module.config.reward_mean, engine.module.config.reward_std = mean, std
    save_model(engine, tokenizer, out_dir)
    return summary

"""`rlhf sft`: step 1 on the DeepSpeed loop of training/ds_trainer.py.

Examples are encoded by `services.formatting.encode_sft_example` (prompt tokens
labelled -100, response + eos kept), so the loss is the next-token
cross-entropy on response tokens only, averaged over the response tokens of
the whole batch (not per micro-batch, not per example).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from services.formatting import IGNORE_INDEX, collate_sft, encode_sft_example
from services.models import causal_lm, position_limit
from training.checkpoints import load_tokenizer, save_model
from training.ds_trainer import TrainerConfig, train

Encoded = tuple[list[int], list[int]]  # (input_ids, labels) of one demonstration


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL over labelled positions, their count).

    logits (B, T, V) predict token t+1 at position t; labels (B, T) are -100 on
    prompt and padding tokens, which therefore carry no loss.
    """
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


@dataclass
class SFTObjective:
    """Response-token cross-entropy of a causal LM; eval: mean NLL per response token."""

    pad_id: int
    eval_items: list[Encoded] = field(default_factory=list)
    eval_batch_size: int = 8
    name: str = "sft"
    unit: str = "tokens"

    def weight(self, item: Encoded) -> int:
        """Response tokens (+ eos) that carry loss: labels past the first position."""
        return sum(label != IGNORE_INDEX for label in item[1][1:])

    def loss(self, engine, items: Sequence[Encoded], normaliser: int) -> tuple[torch.Tensor, dict]:
        batch = {k: v.to(engine.device) for k, v in collate_sft(list(items), self.pad_id).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        use_cache=False).logits  # (B, T, V)
        nll, _ = response_nll(logits, batch["labels"])
        return nll / normaliser, {}

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        if not self.eval_items:
            return {}
        module.eval()
        device = next(module.parameters()).device
        total, count = 0.0, 0
        for start in range(0, len(self.eval_items), self.eval_batch_size):
            batch = collate_sft(self.eval_items[start:start + self.eval_batch_size], self.pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            use_cache=False).logits
            nll, n = response_nll(logits, batch["labels"])
            total, count = total + float(nll), count + n
        return {"eval/loss": total / max(1, count)}


def run_sft(model_path: str | Path, examples: Sequence[tuple[str, str]], out_dir: str | Path,
            cfg: TrainerConfig, *, max_length: int = 512,
            eval_examples: Sequence[tuple[str, str]] = (), resume: bool = False) -> dict:
    """Fine-tune the causal LM at model_path on (prompt, response) examples; save it to out_dir.

    Checkpoints go to out_dir/checkpoint-STEP every cfg.save_every steps. The
    final model and tokenizer load with `from_pretrained(out_dir)`. Returns the
    trainer's summary (steps, train loss, last eval loss, tokens/s).
    """
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    model = causal_lm(str(model_path), torch.float32, tokenizer)
    max_length = position_limit(model.config, max_length, default=max_length)
    items = [encode_sft_example(tokenizer, p, r, max_length) for p, r in examples]
    evaluation = [encode_sft_example(tokenizer, p, r, max_length) for p, r in eval_examples]
    objective = SFTObjective(tokenizer.pad_token_id, evaluation, cfg.micro_batch_size)
    engine, summary = train(model, tokenizer, objective, items, cfg, out_dir, resume)
    save_model(engine, tokenizer, out_dir)
    return summary

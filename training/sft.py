"""Step 1 of InstructGPT: supervised fine-tuning on (prompt, response) demonstrations.

The loss is the next-token cross-entropy on the RESPONSE tokens only (prompt
tokens are labelled -100), with eos appended so the model learns to stop.
Prompt and response are tokenized separately and concatenated, exactly as the
policy sees them at generation time (prompt ids, then sampled response ids).
"""

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from training.formatting import pad_right

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def encode_sft_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                       max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one demonstration, both of length <= max_length.

    labels are IGNORE_INDEX on prompt tokens; response + eos keep their ids.
    Over-long examples lose prompt tokens from the left, then response tail.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = (response_ids + [tokenizer.eos_token_id])[:max_length]
    keep = max_length - len(response_ids)  # room left for the prompt
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def collate_sft(batch: list[tuple[list[int], list[int]]], pad_id: int
                ) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into input_ids, attention_mask, labels, each (B, T)."""
    ids, mask = pad_right([b[0] for b in batch], pad_id)
    labels, _ = pad_right([b[1] for b in batch], pad_id, fill=IGNORE_INDEX)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels)}


def adamw_with_cosine(model: torch.nn.Module, lr: float, total_steps: int,
                      warmup_ratio: float = 0.05, min_lr_ratio: float = 0.1,
                      weight_decay: float = 0.0
                      ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9, 0.95) and a schedule: linear warmup, cosine to min_lr_ratio * lr."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                  weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def response_loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                  examples: list[tuple[str, str]], max_length: int = 64,
                  batch_size: int = 64) -> float:
    """Mean cross-entropy (nats/token) of the response tokens (+ eos) of examples."""
    model.eval()
    total, count = 0.0, 0
    encoded = [encode_sft_example(tokenizer, p, r, max_length) for p, r in examples]
    for start in range(0, len(encoded), batch_size):
        batch = collate_sft(encoded[start:start + batch_size], tokenizer.pad_token_id)
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += float(model(**batch).loss) * n
        count += n
    return total / max(1, count)


def train_sft(model_dir: str | Path, examples: list[tuple[str, str]], out_dir: str | Path, *,
              epochs: int = 4, lr: float = 5e-3, batch_size: int = 32, max_length: int = 64,
              seed: int = 0, progress: bool = True, warmup_ratio: float = 0.05,
              min_lr_ratio: float = 0.1, max_grad_norm: float = 1.0) -> dict:
    """Fine-tune the causal LM in model_dir on examples; save model + tokenizer to out_dir.

    lr is the peak learning rate; batch_size counts examples per optimizer step.
    The defaults suit the demo's tiny GPT-2 on 4,000-6,000 demonstrations
    (500-750 steps, 20-30 s on 2 CPU cores): fewer than ~500 steps and it has
    not yet learned to pick nouns of the prompt's topic. A pretrained model
    wants lr ~1e-5.
    Returns {"loss", "first_loss", "steps", "seconds"}: "loss" is the mean
    response loss (nats/token) over the last 10 % of steps.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.train()
    encoded = [encode_sft_example(tokenizer, p, r, max_length) for p, r in examples]
    total_steps = epochs * math.ceil(len(encoded) / batch_size)
    optimizer, scheduler = adamw_with_cosine(model, lr, total_steps, warmup_ratio, min_lr_ratio)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start_time = time.perf_counter()
    with tqdm(total=total_steps, desc="sft", disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(encoded), generator=generator).tolist()
            for start in range(0, len(order), batch_size):
                batch = collate_sft([encoded[i] for i in order[start:start + batch_size]],
                                    tokenizer.pad_token_id)
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start_time
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    tail = losses[-max(1, len(losses) // 10):]
    return {"loss": sum(tail) / len(tail), "first_loss": losses[0], "steps": len(losses),
            "seconds": seconds}

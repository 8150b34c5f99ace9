"""How a (prompt, response) pair becomes tokens, for training and serving alike.

One definition each: the reward model is trained on `encode_for_reward` and
the reward service scores with it; SFT trains on `encode_sft_example` and the
policy service's Tokenize (DPO) encodes with it. So training and serving
cannot drift apart.
"""

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def join_prompt_response(prompt: str, response: str) -> str:
    """The full text of a sample: plain concatenation (prompts carry their own separator)."""
    return prompt + response


def encode_for_reward(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                      max_length: int) -> list[int]:
    """Token ids of prompt+response followed by eos, at most max_length long.

    The score is read at the final eos, so the eos is always kept: an
    over-long sample loses tokens from the left (the prompt's start first).
    """
    return encode_many_for_reward(tokenizer, [prompt], [response], max_length)[0]


def encode_many_for_reward(tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str],
                           max_length: int) -> list[list[int]]:
    """`encode_for_reward` of each (prompt, response) pair, in one tokenizer call (a fast tokenizer encodes the
    batch in Rust, without the per-call overhead)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the reward tokenizer needs an eos token")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not prompts:
        return []
    texts = [join_prompt_response(p, r) for p, r in zip(prompts, responses, strict=True)]
    eos = tokenizer.eos_token_id
    return [(ids + [eos])[-max_length:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_right(seqs: list[list[int]], pad_id: int, fill: int | None = None
              ) -> tuple[list[list[int]], list[list[int]]]:
    """Right-pad ragged sequences to one length.

    Returns (padded, attention_mask), both (B, T_max) nested lists; padded
    positions hold `fill` (default pad_id) and mask 0.
    """
    width = max(len(s) for s in seqs)
    value = pad_id if fill is None else fill
    padded = [s + [value] * (width - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    return padded, mask


def encode_sft_example(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                       max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one demonstration, both of length <= max_length.

    Prompt and response are tokenized separately and concatenated, exactly as
    the policy sees them at generation time (prompt ids, then sampled response
    ids). labels are IGNORE_INDEX on prompt tokens; response + eos keep their
    ids, so the model learns to stop. Over-long examples lose prompt tokens
    from the left, then the response's tail.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids = (response_ids + [tokenizer.eos_token_id])[:max_length]
    keep = max_length - len(response_ids)  # room left for the prompt
    prompt_ids = prompt_ids[-keep:] if keep > 0 else []
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def collate_sft(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into input_ids, attention_mask, labels, each (B, T)."""
    ids, mask = pad_right([b[0] for b in batch], pad_id)
    labels, _ = pad_right([b[1] for b in batch], pad_id, fill=IGNORE_INDEX)
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}

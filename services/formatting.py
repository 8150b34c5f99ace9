"""How a (prompt, response) pair becomes text and reward-model tokens.

One definition for training and serving: the reward model is trained on
`encode_for_reward` and the reward service scores with the same function, so
the two cannot drift apart.
"""

from transformers import PreTrainedTokenizerBase


def join_prompt_response(prompt: str, response: str) -> str:
    """The full text of a sample: plain concatenation (prompts carry their own separator)."""
    return prompt + response


def encode_for_reward(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str,
                      max_length: int) -> list[int]:
    """Token ids of prompt+response followed by eos, at most max_length long.

    The score is read at the final eos, so the eos is always kept: an
    over-long sample loses tokens from the left (the prompt's start first).
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the reward tokenizer needs an eos token")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    text = join_prompt_response(prompt, response)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids[-max_length:]


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

"""Forward passes shared by serving and training: one code path for log-probs.

Generate, LogProbs and Train all turn logits into log-probs with
`services.objectives.logprobs_from_logits(logits, tokens, temperature)`, so the
PPO ratio on freshly sampled data is 1 up to floating-point noise.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.batch import Sequences
from services.codec import pad_rows
from services.models import forward_takes, no_cache
from services.objectives import logprobs_from_logits
from services.seeds import row_seed


def _temperature(t: float) -> float:
    """0 (unset or greedy) means 1: log-probs of the untempered distribution."""
    return t if t > 0 else 1.0


def response_logits(model, seqs: Sequences, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits that predict each response token.

    Returns logits (B, R, V), response tokens (B, R) and response mask (B, R).
    """
    input_ids, attention_mask, index, mask = seqs.padded(pad_id)
    input_ids, attention_mask, index = input_ids.to(device), attention_mask.to(device), index.to(device)
    if forward_takes(model, "logits_to_keep"):
        # The LM head runs on the response positions only, not on the prompt's and the padding's.
        picked = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=index,
                       **no_cache(model)).logits  # (B, R, V)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **no_cache(model)).logits  # (B, T, V)
        picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, R, V)
    labels = input_ids.gather(1, (index + 1).clamp(max=input_ids.shape[1] - 1)) * mask.to(device).long()  # (B, R)
    return picked, labels, mask.to(device)


def response_logprobs(model, seqs: Sequences, pad_id: int, device, temperature: float) -> list[torch.Tensor]:
    """log pi(a_t|s_t) of each response token, one float32 row per sequence."""
    logits, labels, mask = response_logits(model, seqs, pad_id, device)
    logprobs = logprobs_from_logits(logits.float(), labels, _temperature(temperature))  # (B, R)
    return [row[:n].cpu() for row, n in zip(logprobs, seqs.response_lengths)]


def response_values(model, seqs: Sequences, pad_id: int, device) -> list[torch.Tensor]:
    """V(s_t) for each response token: the value head at the position before it."""
    input_ids, attention_mask, index, _ = seqs.padded(pad_id)
    values = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))  # (B, T)
    picked = values.gather(1, index.to(device)).float()  # (B, R)
    return [row[:n].cpu() for row, n in zip(picked, seqs.response_lengths)]


def sequence_scores(model, rows: list[torch.Tensor], pad_id: int, device) -> torch.Tensor:
    """Reward-model score of each whole sequence (read at its last token). (B,)"""
    input_ids, mask = pad_rows(rows, pad_id)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device),
                   **no_cache(model)).logits  # (B, 1)
    return logits[:, 0].float().cpu()


@dataclass
class Sampling:
    """Decoded SamplingParams; temperature 0 means greedy."""

    temperature: float
    max_new_tokens: int
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def key(self) -> tuple:
        """Requests with equal keys can share one generate call."""
        return (self.temperature, self.max_new_tokens, self.top_k, self.top_p, self.seed)


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: ids (B, T) and attention mask (B, T)."""
    width = max(int(r.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.numel():] = row
        mask[i, width - row.numel():] = 1
    return ids, mask


def generation_config(s: Sampling, pad_id: int, eos_id: int) -> GenerationConfig:
    """The transformers GenerationConfig: greedy search over scores that RowSampler already sampled.

    Temperature, top-k and top-p are applied by `sampling_processors`, so the
    config itself stays greedy; with temperature 0 decoding is plain greedy.
    """
    return GenerationConfig(
        max_new_tokens=s.max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id if eos_id >= 0 else None,
        return_dict_in_generate=True,
        output_logits=True,
    )


class RowSampler(LogitsProcessor):
    """Samples each row by inverse CDF from its own stream of uniforms.

    The uniforms of a row depend only on (seed, its index in the caller's
    batch), so a row samples the same tokens whichever rows share its batch
    (dynamic batching, or a batch split across policy replicas). Returns scores
    that are 0 at the sampled token and -inf elsewhere, for greedy search to pick.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_width: int):
        self.uniforms = uniforms  # (B, N) float64 in [0, 1)
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_width
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(-1)  # (B, V)
        u = self.uniforms[:, t : t + 1].to(cdf.device) * cdf[:, -1:]  # (B, 1)
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=scores.shape[-1] - 1)  # first index with cdf > u
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def sampling_processors(s: Sampling, row_indices: list[int], prompt_width: int) -> LogitsProcessorList:
    """Temperature, top-k, top-p, then RowSampler; empty for greedy decoding.

    `row_indices`: each row's index in the caller's batch (GenerateRequest.first_row_index + row).
    """
    if s.temperature <= 0:
        return LogitsProcessorList()
    seed = s.seed or int(torch.randint(1, 2**62, (1,)))  # unseeded: one draw from the service's generator
    streams = [torch.rand(s.max_new_tokens, generator=torch.Generator().manual_seed(row_seed(seed, r)),
                          dtype=torch.float64) for r in row_indices]
    processors = [TemperatureLogitsWarper(s.temperature)]
    if s.top_k:
        processors.append(TopKLogitsWarper(s.top_k))
    if 0 < s.top_p < 1:
        processors.append(TopPLogitsWarper(s.top_p))
    return LogitsProcessorList([*processors, RowSampler(torch.stack(streams), prompt_width)])


class Abandoned(StoppingCriteria):
    """Stops decoding between two steps once nobody waits for the result (the calls were cancelled)."""

    def __init__(self, wanted: Callable[[], bool]):
        self.wanted = wanted

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), not self.wanted(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, prompts: list[torch.Tensor], s: Sampling, pad_id: int, eos_id: int, device,
             row_indices: list[int] | None = None, wanted: Callable[[], bool] | None = None):
    """Sample responses; returns (responses, logprobs, finished) per row.

    A response ends with (and includes) the first end-of-sequence token.
    Log-probs come from the raw logits of each step at the sampling temperature.
    `row_indices` name each row's sampling stream (default 0..B-1). `wanted()`
    is asked between decoding steps; once it is False, decoding stops (the
    result is thrown away by the caller).
    """
    ids, mask = left_pad(prompts, pad_id)
    rows = list(range(len(prompts))) if row_indices is None else row_indices
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=generation_config(s, pad_id, eos_id),
        logits_processor=sampling_processors(s, rows, ids.shape[1]),
        stopping_criteria=StoppingCriteriaList([Abandoned(wanted)] if wanted is not None else []),
    )
    new = out.sequences[:, ids.shape[1]:]  # (B, N)
    logits = torch.stack(out.logits, dim=1).float()  # (B, N, V)
    logprobs = logprobs_from_logits(logits, new, _temperature(s.temperature))  # (B, N)
    responses, lps, finished = [], [], []
    for row, lp in zip(new.cpu(), logprobs.cpu()):
        ends = (row == eos_id).nonzero()
        n = int(ends[0]) + 1 if len(ends) else row.numel()
        responses.append(row[:n])
        lps.append(lp[:n])
        finished.append(bool(len(ends)))
    return responses, lps, finished

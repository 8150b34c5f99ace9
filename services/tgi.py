"""Reference log-probs from a text-generation-inference server (ReferenceService with `backend: tgi`).

TGI returns, with `decoder_input_details`, the log-prob of every input token
given the ones before it (the "prefill"), at temperature 1. Each row of a
LogProbs request goes out as one generate call with max_new_tokens=1: the
row's token ids decoded to text, which the server tokenises again. The
log-probs belong to the policy's rows only if that gives back the same ids,
so every row is checked and a row the server tokenised differently is
refused (FAILED_PRECONDITION) with the first position that differs.

Rows go out concurrently (tgi.max_concurrency at once); the server batches
them. Connection errors, timeouts, HTTP 429 and 5xx are retried with
exponential backoff (tgi.retries), then the call is UNAVAILABLE.
"""

import asyncio
import pathlib

import httpx2
import torch
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import InferenceTimeoutError

from services.batch import Sequences
from services.config import TGIConfig
from services.errors import InvalidArgument, NotReady, Refused
from services.validation import check_temperature

BACKOFF_SECONDS = 0.1  # first retry's wait; doubled for each further one
MAX_BACKOFF_SECONDS = 5.0


def check_tgi_temperature(value: float, field: str) -> float:
    """A LogProbs temperature the tgi backend serves: 0 (unset) or 1, as TGI's prefill log-probs are unscaled."""
    check_temperature(value, field)
    if value not in (0.0, 1.0):
        raise InvalidArgument(field, f"the tgi backend serves temperature 1 only (TGI's prefill log-probs are "
                              f"unscaled), got {value}")
    return 1.0


def http_status(error: Exception) -> int | None:
    """The HTTP status of a failed request, from the error or the HTTP error it was raised from."""
    for candidate in (error, error.__cause__):
        code = getattr(getattr(candidate, "response", None), "status_code", None)
        if isinstance(code, int):
            return code
    return None


def retryable(error: Exception) -> bool:
    """Connection errors, timeouts, HTTP 429 (TGI's queue is full) and 5xx: worth another try."""
    if isinstance(error, httpx2.TransportError | InferenceTimeoutError):
        return True
    code = http_status(error)
    return code is not None and (code == 429 or code >= 500)


def server_ids(prefill: list[int], bos_id: int | None, row_length: int) -> list[int]:
    """The prefill ids that stand for the row's tokens: TGI may prepend the tokenizer's BOS, which is dropped."""
    if len(prefill) == row_length + 1 and bos_id is not None and prefill[0] == bos_id:
        return prefill[1:]
    return prefill


def check_ids(index: int, row: list[int], received: list[int]) -> None:
    """Refuse a row the server tokenised to other ids than the policy's, naming the first position that differs."""
    for position, (expected, got) in enumerate(zip(row, received)):
        if expected != got:
            raise Refused(f"sequences row {index}, position {position}: the TGI server tokenised to id {got} where "
                          f"the policy has {expected}: serve the policy's tokenizer")
    if len(row) != len(received):
        raise Refused(f"sequences row {index}: the TGI server tokenised to {len(received)} tokens where the policy "
                      f"has {len(row)}: serve the policy's tokenizer")


class TGIClient:
    """Log-probs of response tokens from a TGI server, one generate call per row, under a concurrency cap."""

    def __init__(self, cfg: TGIConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer
        token = pathlib.Path(cfg.token_file).read_text().strip() if cfg.token_file else None
        self.client = AsyncInferenceClient(model=cfg.url, token=token, timeout=cfg.timeout_seconds)
        self.slots = asyncio.Semaphore(cfg.max_concurrency)

    def texts(self, seqs: Sequences) -> list[str]:
        """Each row decoded to the text the server tokenises (special tokens kept, spaces as they are)."""
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                for row in seqs.rows]

    async def logprobs(self, seqs: Sequences, texts: list[str], time_left: float | None) -> list[torch.Tensor]:
        """log pi_ref(response token | prefix) of each row, (R_i,) float32, within `time_left` seconds (None: no
        limit but tgi.timeout_seconds per request). A failed row fails the call; the first in row order is raised."""
        rows = [self._row(i, row.tolist(), p, text)
                for i, (row, p, text) in enumerate(zip(seqs.rows, seqs.prompt_lengths, texts))]
        async with asyncio.timeout(time_left):
            results = await asyncio.gather(*rows, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def _row(self, index: int, row: list[int], prompt_length: int, text: str) -> torch.Tensor:
        async with self.slots:
            output = await self._generate(index, text)
        prefill = output.details.prefill if output.details is not None else None
        if not prefill:
            raise Refused(f"the TGI server at {self.cfg.url} returned no prefill tokens: it must return prefill "
                          "log-probs (decoder_input_details)")
        ids = server_ids([t.id for t in prefill], self.tokenizer.bos_token_id, len(row))
        check_ids(index, row, ids)
        logprobs = [t.logprob for t in prefill[len(prefill) - len(row) + prompt_length:]]
        if any(lp is None for lp in logprobs):
            raise Refused(f"the TGI server at {self.cfg.url} left response log-probs of row {index} empty")
        return torch.tensor(logprobs, dtype=torch.float32)

    async def _generate(self, index: int, text: str):
        """One generate call with prefill details, retried on errors worth another try."""
        last = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(min(BACKOFF_SECONDS * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
            try:
                return await self.client.text_generation(text, details=True, decoder_input_details=True,
                                                         max_new_tokens=1)
            except httpx2.HTTPError as error:  # huggingface_hub's HTTP, timeout and TGI errors derive from it
                if not retryable(error):
                    raise self.refusal(index, error)
                last = error
        raise NotReady(f"the TGI server at {self.cfg.url} failed {self.cfg.retries + 1} attempts: {last}")

    def refusal(self, index: int, error: Exception) -> Exception:
        """What a failure not worth retrying becomes: an HTTP error answer (4xx) is FAILED_PRECONDITION with the
        server's message; anything else stays as it is."""
        if http_status(error) is None:
            return error
        refused = Refused(f"the TGI server at {self.cfg.url} refused row {index}: {error}")
        refused.__cause__ = error
        return refused

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self.client.close()

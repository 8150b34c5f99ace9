"""Reward scores from a text-embeddings-inference server (RewardService with `backend: tei`).

TEI serves sequence-classification models at POST /predict. A batch of the
reward service's rows goes out as one request, {"inputs": [[text], ...],
"raw_scores": true}: raw scores are the classification head's logits, the
reward the local backend reads. `tei.input` says what a row's text is:

- joined: prompt + response + the reward tokenizer's EOS, the text a model
  trained by `rlhf train-rm` was trained on (scored at the final EOS); an
  over-long row is cut from the left, as the local backend does;
- pair: [prompt, response], for cross-encoder reward models trained on
  (question, answer) pairs.

Batches run on threads of their own, `tei.max_concurrency` at once, of at
most `tei.max_batch_rows` rows (TEI's --max-client-batch-size). Connection
errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff
(`tei.retries`), then the call is UNAVAILABLE; another HTTP error, or a reply
that is not one score per row, is FAILED_PRECONDITION naming the server.
"""

import math
import pathlib
import time

import httpx2

from services.config import TEIConfig
from services.errors import NotReady, Refused
from services.formatting import join_prompt_response
from services.tgi import BACKOFF_SECONDS, MAX_BACKOFF_SECONDS, http_status, retryable


class TEIScorer:
    """Scores (prompt, response) rows with a TEI server's /predict, one POST per batch."""

    def __init__(self, cfg: TEIConfig, eos_text: str | None):
        self.cfg = cfg
        if cfg.input == "joined" and not eos_text:
            raise ValueError("tei.input: joined needs the reward tokenizer's eos token (model: the checkpoint the TEI "
                             "server serves)")
        self.eos_text = eos_text or ""
        headers = {}
        if cfg.token_file:
            headers["Authorization"] = f"Bearer {pathlib.Path(cfg.token_file).read_text().strip()}"
        self.client = httpx2.Client(base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_seconds, headers=headers)

    def inputs(self, items: list[tuple[str, str]]) -> list[list[str]]:
        """TEI's batch input: one [text] (joined) or [prompt, response] (pair) per row."""
        if self.cfg.input == "pair":
            return [[prompt, response] for prompt, response in items]
        return [[join_prompt_response(prompt, response) + self.eos_text] for prompt, response in items]

    async def score(self, batcher, prompts: list[str], responses: list[str], alive) -> list[float]:
        """One score per row through `batcher`, whose batches run_rows sends."""
        return await batcher.submit(None, list(zip(prompts, responses)), len(prompts), alive)

    def run_rows(self, _key, items: list[tuple[str, str]]) -> list[float]:
        """One score per (prompt, response) item; runs on a TEI thread."""
        body = {"inputs": self.inputs(items), "raw_scores": True, "truncate": True, "truncation_direction": "Left"}
        return self.scores(self._post(body), len(items))

    def scores(self, reply, rows: int) -> list[float]:
        """The score of each row in a /predict reply (a list of predictions per row); Refused when malformed."""
        if not isinstance(reply, list) or len(reply) != rows:
            got = f"{len(reply)} entries" if isinstance(reply, list) else type(reply).__name__
            raise Refused(f"the TEI server at {self.cfg.url} answered {got} for {rows} rows")
        out = []
        for i, predictions in enumerate(reply):
            score = self._pick(i, predictions)
            if not math.isfinite(score):
                raise Refused(f"the TEI server at {self.cfg.url} scored row {i} {score}")
            out.append(score)
        return out

    def _pick(self, row: int, predictions) -> float:
        try:
            labels = {str(p["label"]): float(p["score"]) for p in predictions}
        except (TypeError, KeyError, ValueError):
            raise Refused(f"the TEI server at {self.cfg.url} answered row {row} with {predictions!r}, not a list of "
                          "{label, score}") from None
        if self.cfg.label is not None:
            if self.cfg.label not in labels:
                raise Refused(f"the TEI server at {self.cfg.url} has no label {self.cfg.label!r} "
                              f"(it has {', '.join(sorted(labels))})")
            return labels[self.cfg.label]
        if len(labels) != 1:
            raise Refused(f"the TEI server at {self.cfg.url} answers {len(labels)} labels ({', '.join(sorted(labels))}): "
                          "a reward model has one; or choose one with tei.label")
        return next(iter(labels.values()))

    def _post(self, body: dict):
        last = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(BACKOFF_SECONDS * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS))
            try:
                response = self.client.post("/predict", json=body)
                response.raise_for_status()
                return response.json()
            except httpx2.HTTPError as error:
                if not retryable(error):
                    raise Refused(f"the TEI server at {self.cfg.url} refused {len(body['inputs'])} rows: "
                                  f"HTTP {http_status(error)}: {_message(error)}") from error
                last = error
            except ValueError as error:  # not JSON
                raise Refused(f"the TEI server at {self.cfg.url} answered something that is not JSON: {error}") from None
        raise NotReady(f"the TEI server at {self.cfg.url} failed {self.cfg.retries + 1} attempts: {last!r}")

    def close(self) -> None:
        """Close the HTTP connections."""
        self.client.close()


def _message(error: Exception) -> str:
    """TEI's error text ({"error": ..., "error_type": ...}) from an HTTP error answer, else the error itself."""
    response = getattr(error, "response", None)
    try:
        return str(response.json().get("error")) if response is not None else str(error)
    except (ValueError, AttributeError):
        return str(error)

"""A stand-in for a text-embeddings-inference server on loopback, for the tests of the reward service's tei backend:
TEI's documented /predict schema, with a real sequence-classification model computing the scores.

POST /predict takes {"inputs": str | [str, str] | [[str] | [str, str], ...], "raw_scores": bool, "truncate": bool,
"truncation_direction": "Left" | "Right"} and answers, per input, a list of {"label", "score"} (a single input: that
list; a batch: a list of them). A pair is scored as its two texts joined. Raw scores are the head's logits; without
raw_scores a one-label model's score goes through a sigmoid, several labels through a softmax. GET /health answers
200. Switches for the tests: `fail_next` answers that many POSTs with 503, `max_batch` refuses bigger batches with
413 as TEI does, `extra_label` adds a second label (score 0) to every prediction.
"""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bench.standin import StandInServer


class TEIStandIn(StandInServer):
    """The stand-in server in a background thread; `url` is its base URL, `batches` the row counts it was sent."""

    def __init__(self, model_dir, max_batch: int = 32):
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.max_length = self.model.config.max_position_embeddings if hasattr(
            self.model.config, "max_position_embeddings") else self.model.config.n_positions
        self.fail_next = 0  # POSTs still to answer with 503
        self.max_batch = max_batch
        self.extra_label: str | None = None
        self.batches: list[int] = []
        self.last_inputs = None  # the last /predict request's inputs

    def post(self, path: str, request) -> tuple[int, object]:
        if path != "/predict":
            return 404, {"error": f"no route {path}", "error_type": "validation"}
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503, {"error": "model is loading", "error_type": "unhealthy"}
        try:
            texts, batch = _texts(request["inputs"])
        except (KeyError, TypeError, ValueError) as error:
            return 422, {"error": str(error), "error_type": "validation"}
        if len(texts) > self.max_batch:
            return 413, {"error": f"batch size {len(texts)} > maximum allowed batch size {self.max_batch}",
                         "error_type": "validation"}
        self.batches.append(len(texts))
        self.last_inputs = request["inputs"]
        left = request.get("truncate") and request.get("truncation_direction", "Right") == "Left"
        predictions = self.predict(texts, bool(request.get("raw_scores")), bool(left))
        return 200, predictions if batch else predictions[0]

    def predict(self, texts: list[str], raw: bool, truncate_left: bool) -> list[list[dict]]:
        """Predictions for each text, scored one by one (no padding) at its last token."""
        out = []
        for text in texts:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = ids[-self.max_length:] if truncate_left else ids[: self.max_length]
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].float()  # (labels,)
            scores = logits if raw else (torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, -1))
            names = [self.model.config.id2label[i] for i in range(logits.numel())]
            predictions = [{"label": name, "score": float(score)} for name, score in zip(names, scores)]
            if self.extra_label is not None:
                predictions.append({"label": self.extra_label, "score": 0.0})
            out.append(predictions)
        return out


def _texts(inputs) -> tuple[list[str], bool]:
    """The texts of a /predict input, and whether it was a batch; a pair's texts are joined."""
    if isinstance(inputs, str):
        return [inputs], False
    if len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
        return ["".join(inputs)], False
    if all(isinstance(x, list) and 1 <= len(x) <= 2 and all(isinstance(t, str) for t in x) for x in inputs):
        return ["".join(x) for x in inputs], True
    raise ValueError("inputs must be a string, a pair of strings, or a batch of [string] or [string, string]")


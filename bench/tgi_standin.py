"""A stand-in for a text-generation-inference server on loopback, for `rlhf bench reference` and the tests:
TGI's documented generate schema, with a real causal LM computing the prefill log-probs.

POST /generate (and POST /, TGI's route that huggingface_hub's text_generation posts to for a base URL) take
{"inputs": str, "parameters": {"details", "decoder_input_details", "max_new_tokens", ...}} and answer
{"generated_text", "details": {"finish_reason", "generated_tokens", "seed", "prefill": [{id, text, logprob}],
"tokens": [{id, text, logprob, special}]}}; GET /health answers 200. Switches for the tests: `fail_next` answers
that many POSTs with 503, `shift` gives one input text a wrong id at one position, `prepend_bos` prepends the
tokenizer's BOS as Llama-style tokenizers do.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.standin import StandInServer


class TGIStandIn(StandInServer):
    """The stand-in server in a background thread; `url` is its base URL, `paths` the POST paths it was sent."""

    def __init__(self, model_dir):
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.fail_next = 0  # POSTs still to answer with 503
        self.shift: tuple[str, int] | None = None  # (input text, position): that id comes back one higher
        self.prepend_bos = False
        self.paths: list[str] = []

    def post(self, path: str, request) -> tuple[int, object]:
        self.paths.append(path)
        if path not in ("/", "/generate"):
            return 404, {"error": f"no route {path}"}
        if self.fail_next > 0:
            self.fail_next -= 1
            return 503, {"error": "model is loading"}
        parameters = request.get("parameters") or {}
        if not (parameters.get("details") and parameters.get("decoder_input_details")):
            return 422, {"error": "the stand-in answers only with details", "error_type": "validation"}
        return 200, self.generate(request["inputs"])

    def generate(self, inputs: str) -> dict:
        """TGI's generate reply for max_new_tokens=1 with details and decoder_input_details."""
        ids = self.tokenizer(inputs, add_special_tokens=False)["input_ids"]
        if self.prepend_bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        with torch.no_grad():
            logits = self.model(torch.tensor([ids])).logits[0].float()  # (T, V)
        logp = torch.log_softmax(logits, dim=-1)
        prefill = [{"id": ids[0], "text": self.tokenizer.decode([ids[0]]), "logprob": None}]
        prefill += [{"id": t, "text": self.tokenizer.decode([t]), "logprob": float(logp[j - 1, t])}
                    for j, t in enumerate(ids) if j > 0]
        if self.shift is not None and self.shift[0] == inputs:
            prefill[self.shift[1]]["id"] += 1
        new = int(logp[-1].argmax())
        text = self.tokenizer.decode([new])
        return {"generated_text": text, "details": {
            "finish_reason": "length", "generated_tokens": 1, "seed": None, "prefill": prefill,
            "tokens": [{"id": new, "text": text, "logprob": float(logp[-1, new]),
                        "special": new in self.tokenizer.all_special_ids}]}}


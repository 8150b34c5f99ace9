"""A stand-in for a text-generation-inference server on loopback, for `rlhf bench reference` and the tests:
TGI's documented generate schema, with a real causal LM computing the prefill log-probs.

POST /generate (and POST /, TGI's route that huggingface_hub's text_generation posts to for a base URL) take
{"inputs": str, "parameters": {"details", "decoder_input_details", "max_new_tokens", ...}} and answer
{"generated_text", "details": {"finish_reason", "generated_tokens", "seed", "prefill": [{id, text, logprob}],
"tokens": [{id, text, logprob, special}]}}; GET /health answers 200. Switches for the tests: `fail_next` answers
that many POSTs with 503, `shift` gives one input text a wrong id at one position, `prepend_bos` prepends the
tokenizer's BOS as Llama-style tokenizers do.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class TGIStandIn:
    """The stand-in server in a background thread; `url` is its base URL, `paths` the POST paths it was sent."""

    def __init__(self, model_dir):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.lock = threading.Lock()  # one forward pass at a time; counters change under it
        self.fail_next = 0  # POSTs still to answer with 503
        self.shift: tuple[str, int] | None = None  # (input text, position): that id comes back one higher
        self.prepend_bos = False
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

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


def _handler(stand_in: TGIStandIn):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply(200, {}) if self.path == "/health" else self._reply(404, {"error": "not found"})

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with stand_in.lock:
                stand_in.paths.append(self.path)
                if self.path not in ("/", "/generate"):
                    return self._reply(404, {"error": f"no route {self.path}"})
                if stand_in.fail_next > 0:
                    stand_in.fail_next -= 1
                    return self._reply(503, {"error": "model is loading"})
                parameters = request.get("parameters") or {}
                if not (parameters.get("details") and parameters.get("decoder_input_details")):
                    return self._reply(422, {"error": "the stand-in answers only with details",
                                             "error_type": "validation"})
                self._reply(200, stand_in.generate(request["inputs"]))

    return Handler

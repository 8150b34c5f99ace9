"""`rlhf bench metrics`: the cost of instrumentation on Reward.Score throughput.

Two reward services run side by side on the same checkpoint: one with metrics
on (the gRPC interceptor, the batch hooks, the gauges and the /metrics
endpoint, scraped every `scrape_interval` seconds as Prometheus would), one
with `server.metrics_port: -1`, which installs none of them. Timed rounds
alternate between the two (ABBA order), so machine noise hits both alike. The
figure is (prompt, response) pairs scored per second; the overhead is
1 - on / off.
"""

import asyncio
import json
import pathlib
import statistics
import tempfile
import threading
import time
import types
import urllib.request

import grpc
import torch

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.channels import open_channel
from services.launcher import LocalMesh


def bench_reward_model(out: pathlib.Path) -> pathlib.Path:
    """The demo's tiny GPT-2 with a scalar score head, saved once so both services load the same weights."""
    from transformers import AutoModelForSequenceClassification

    from training import synthetic, tiny

    torch.manual_seed(0)
    tokenizer = tiny.build_tokenizer(synthetic.corpus_texts(0), out / "tokenizer")
    lm = tiny.build_tiny_lm(tokenizer, out / "lm")
    rm = AutoModelForSequenceClassification.from_pretrained(lm, num_labels=1)
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")
    return out / "rm"


def score_request(pairs: int) -> reward_pb2.ScoreRequest:
    """`pairs` demo prompts with short responses, as text."""
    from training import synthetic

    prompts = synthetic.train_prompts(pairs, seed=0)
    return reward_pb2.ScoreRequest(texts=reward_pb2.TextPairs(prompts=prompts, responses=["a short answer"] * pairs))


async def timed_round(stub, request, n_requests: int, concurrency: int) -> float:
    """Seconds to complete `n_requests` Score calls with `concurrency` in flight."""
    remaining = n_requests

    async def worker():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await stub.Score(request, timeout=120)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


class Scraper:
    """GETs a /metrics URL every `interval` seconds while active, as Prometheus would."""

    def __init__(self, url: str, interval: float):
        self.url, self.interval, self.scrapes = url, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            with urllib.request.urlopen(self.url, timeout=5) as reply:
                reply.read()
            self.scrapes += 1

    def __enter__(self):
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


async def alternate(stubs: dict, request, rounds: int, n_requests: int, concurrency: int) -> dict[str, list[float]]:
    """Warm both up, then time `rounds` rounds per side in ABBA order."""
    for stub in stubs.values():
        await timed_round(stub, request, n_requests // 4 or 1, concurrency)
    seconds = {name: [] for name in stubs}
    order = list(stubs)
    for i in range(rounds):
        for name in (order if i % 2 == 0 else order[::-1]):
            seconds[name].append(await timed_round(stubs[name], request, n_requests, concurrency))
    return seconds


async def _run(meshes: dict[str, LocalMesh], request, rounds, n_requests, concurrency) -> dict[str, list[float]]:
    channels = {n: open_channel(m.endpoints["reward"]) for n, m in meshes.items()}
    try:
        stubs = {n: reward_pb2_grpc.RewardServiceStub(c) for n, c in channels.items()}
        return await alternate(stubs, request, rounds, n_requests, concurrency)
    finally:
        for channel in channels.values():
            await channel.close()


def measure_pair(work: pathlib.Path, config: dict, request, rounds: int, n_requests: int, concurrency: int,
                 scrape_interval: float, on_first: bool) -> tuple[dict[str, list[float]], int]:
    """One fresh (on, off) pair of reward processes, timed in alternate rounds; returns seconds and scrapes.

    on_first: start (and time first) the instrumented side; alternate it across pairs, since the
    process started first tends to run a little slower.
    """
    meshes = {"on": LocalMesh(work / "on", config, metrics_ports={"reward": 0}), "off": LocalMesh(work / "off", config)}
    order = ["on", "off"] if on_first else ["off", "on"]
    with meshes[order[0]], meshes[order[1]]:
        for name in order:
            asyncio.run(meshes[name].wait_ready(300))
        url = f"http://{meshes['on'].metrics_endpoints['reward']}/metrics"
        with Scraper(url, scrape_interval) as scraper:
            seconds = asyncio.run(_run({name: meshes[name] for name in order}, request, rounds, n_requests, concurrency))
    return seconds, scraper.scrapes


class _Context:
    """The one ServicerContext call the interceptor makes on success."""

    def code(self):
        return None


def per_call_cost_us(calls: int = 20000) -> float:
    """In-process microseconds the interceptor and the batch hooks add to one unary call (no network)."""
    from prometheus_client import CollectorRegistry

    from services.metrics import GrpcServerMetrics, MetricsInterceptor

    interceptor = MetricsInterceptor(GrpcServerMetrics(CollectorRegistry()))
    details = types.SimpleNamespace(method="/rlhf.v1.RewardService/Score")

    async def handle(request, context):
        return request

    handler = grpc.unary_unary_rpc_method_handler(handle)

    async def continuation(_details):
        return handler

    async def loop(instrumented: bool) -> float:
        context, start = _Context(), time.perf_counter()
        for _ in range(calls):
            h = await (interceptor.intercept_service(continuation, details) if instrumented else continuation(details))
            await h.unary_unary(None, context)
        return time.perf_counter() - start

    plain = min(asyncio.run(loop(False)) for _ in range(3))
    wrapped = min(asyncio.run(loop(True)) for _ in range(3))
    return 1e6 * (wrapped - plain) / calls + hook_cost_us(calls)


def hook_cost_us(calls: int) -> float:
    """Microseconds of one on_batch + on_result pair (a batch of 4 rows)."""
    from services.metrics import ServiceMetrics

    metrics = ServiceMetrics(types.SimpleNamespace(role="reward", model_version=lambda: 0, cfg=None))
    batcher = types.SimpleNamespace(depth=lambda: 0, on_batch=None, on_result=None)
    metrics.watch(batcher, "score", 256)
    start = time.perf_counter()
    for _ in range(calls):
        batcher.on_batch(4, 120)
        batcher.on_result([0.0] * 4, 0.002)
    return 1e6 * (time.perf_counter() - start) / calls


def bench_metrics(model_path, processes: int, rounds: int, n_requests: int, pairs: int, concurrency: int,
                  scrape_interval: float, as_json: bool) -> dict:
    """Print Score throughput with metrics on and off and the overhead (one JSON object with --json)."""
    work = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-bench-metrics-"))
    model_path = model_path or str(bench_reward_model(work))
    config = {"reward": {"model": {"path": model_path}, "server": {"num_threads": 1}}}
    request = score_request(pairs)
    totals, per_pair, scrapes = {"on": 0.0, "off": 0.0}, [], 0
    for i in range(processes):  # fresh processes each time: a process's own speed varies by a few %
        seconds, n = measure_pair(work / f"pair{i}", config, request, rounds, n_requests, concurrency, scrape_interval,
                                  on_first=i % 2 == 0)
        per_pair.append(1 - sum(seconds["off"]) / sum(seconds["on"]))
        totals = {side: totals[side] + sum(seconds[side]) for side in totals}
        scrapes += n
    scored = processes * rounds * n_requests * pairs
    on_ps, off_ps = scored / totals["on"], scored / totals["off"]
    wall_us = 1e6 * totals["on"] / (processes * rounds * n_requests)  # server time per request at full load
    result = {"metrics_on_pairs_per_s": on_ps, "metrics_off_pairs_per_s": off_ps, "overhead": 1 - on_ps / off_ps,
              "overhead_per_process_pair": per_pair, "overhead_median_of_pairs": statistics.median(per_pair),
              "instrumentation_us_per_call": per_call_cost_us(), "wall_us_per_request": wall_us,
              "process_pairs": processes, "rounds": rounds, "requests_per_round": n_requests,
              "pairs_per_request": pairs, "concurrency": concurrency, "scrape_interval_s": scrape_interval,
              "scrapes": scrapes, "model": model_path}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"Reward.Score, metrics on  : {on_ps:10.1f} pairs/s ({scrapes} scrapes)")
        print(f"Reward.Score, metrics off : {off_ps:10.1f} pairs/s")
        print(f"overhead (1 - on/off)     : {100 * result['overhead']:9.2f} %  (per process pair: "
              + ", ".join(f"{100 * o:.1f}" for o in per_pair) + " %)")
        print(f"instrumentation per call  : {result['instrumentation_us_per_call']:9.1f} us in-process, "
              f"vs {wall_us:.0f} us of wall time per Score request")
    return result

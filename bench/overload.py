"""`rlhf bench overload`: how a reward service sheds load beyond its queue.

One reward service process (the demo's tiny reward model unless `model` is
given) with a bounded request queue. Clients keep a fixed number of Score
calls in flight, each sending its next call as soon as the last one
answered, rejected or not. Rounds alternate between two loads:

- saturation: as many calls in flight as the queue holds (every call is
  admitted, the model never idles);
- overload: `factor` times that; the calls that find the queue full are
  refused with RESOURCE_EXHAUSTED.

By default a refused client retries at once (the hostile case: every
refusal costs the server a call's worth of work); with `backoff_ms` it waits
a jittered backoff first; with `pushback` it waits as long as the refusal's
`grpc-retry-pushback-ms` trailer asks (services/pushback.py), as gRPC retry
policies and the controller do.

The figures: successful Score calls per second under each load and their
ratio (overload / saturation, target >= 0.9), and the latency of the
refusals (p50 and p99, target p99 < 50 ms).
"""

import asyncio
import json
import pathlib
import random
import statistics
import tempfile
import time

import grpc

from bench.metrics import bench_reward_model, score_request
from rlhf.v1 import reward_pb2_grpc
from services.channels import open_channel
from services.launcher import LocalMesh
from services.pushback import pushback_seconds


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values` by nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_load(stub, request, in_flight: int, seconds: float, backoff_ms: float = 0.0,
                     pushback: bool = False) -> dict:
    """Keep `in_flight` Score calls going for `seconds`; successes per second and latencies of each outcome.

    A refused caller waits backoff_ms x uniform(0.5, 1.5) before its next call (0: none), or, with `pushback`,
    at least as long as the refusal's grpc-retry-pushback-ms asks.
    """
    ok: list[float] = []
    refused: list[float] = []
    other: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                await stub.Score(request, timeout=60)
                ok.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused.append(time.perf_counter() - start)
                    wait = backoff_ms / 1000 * random.uniform(0.5, 1.5)
                    if pushback:
                        wait = max(wait, pushback_seconds(error))
                    if wait:
                        await asyncio.sleep(min(wait, max(deadline - time.perf_counter(), 0.0)))
                else:
                    other[error.code().name] = other.get(error.code().name, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    return {"in_flight": in_flight, "ok_per_second": len(ok) / elapsed, "ok": len(ok), "refused": len(refused),
            "other": other, "ok_p50_ms": 1000 * percentile(ok, 0.5),
            "refused_p50_ms": 1000 * percentile(refused, 0.5), "refused_p99_ms": 1000 * percentile(refused, 0.99)}


def service_config(model: str, queue: int, batch: int) -> dict:
    return {"role": "reward", "model": {"path": model},
            "server": {"num_threads": 1, "grace_seconds": 1, "metrics_port": -1},
            "batching": {"max_queue": queue, "max_batch_size": batch, "max_wait_ms": 2.0}}


async def measure(address: str, queue: int, factor: int, rounds: int, seconds: float, pairs: int,
                  backoff_ms: float, pushback: bool = False) -> dict:
    """Alternate saturation and overload rounds (ABAB) against the service at `address`."""
    request = score_request(pairs)
    loads = {"saturation": queue, "overload": factor * queue}
    results: dict[str, list[dict]] = {name: [] for name in loads}
    async with open_channel(address) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        await timed_load(stub, request, queue, min(seconds, 2.0))  # warm-up
        for i in range(rounds):
            for name in (("saturation", "overload") if i % 2 == 0 else ("overload", "saturation")):
                results[name].append(await timed_load(stub, request, loads[name], seconds, backoff_ms, pushback))
                print(f"round {i + 1}/{rounds} {name:10s} {json.dumps(results[name][-1])}", flush=True)
    saturation = statistics.median(r["ok_per_second"] for r in results["saturation"])
    overload = statistics.median(r["ok_per_second"] for r in results["overload"])
    refused = [r for r in results["overload"] if r["refused"]]
    return {
        "queue": queue, "factor": factor, "rounds": rounds, "seconds": seconds, "pairs": pairs, "backoff_ms": backoff_ms,
        "pushback": pushback,
        "saturation_ok_per_second": saturation, "overload_ok_per_second": overload,
        "throughput_ratio": overload / saturation,
        "refused_p50_ms": statistics.median(r["refused_p50_ms"] for r in refused) if refused else float("nan"),
        "refused_p99_ms": max(r["refused_p99_ms"] for r in refused) if refused else float("nan"),
        "refused_total": sum(r["refused"] for r in results["overload"]),
        "rounds_detail": results,
    }


def bench_overload(model: str | None, queue: int, batch: int, factor: int, rounds: int, seconds: float, pairs: int,
                   backoff_ms: float, as_json: bool, pushback: bool = False) -> dict:
    """Start the reward service, measure, print the summary (or JSON) and return it."""
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-overload-") as tmp:
        work = pathlib.Path(tmp)
        model = model or str(bench_reward_model(work / "model"))
        with LocalMesh(work / "mesh", {"reward": service_config(model, queue, batch)}) as mesh:
            asyncio.run(mesh.wait_ready(300))
            result = asyncio.run(measure(mesh.endpoints["reward"], queue, factor, rounds, seconds, pairs, backoff_ms,
                                         pushback))
    if as_json:
        print(json.dumps({k: v for k, v in result.items() if k != "rounds_detail"}))
    else:
        retry = f"refused callers back off {backoff_ms:g} ms" if backoff_ms else "refused callers retry at once"
        if pushback:
            retry = "refused callers wait as the server's grpc-retry-pushback-ms asks"
        print(f"Score, {pairs} pairs per call, queue of {queue}, {retry}: saturation ({queue} in flight) "
              f"{result['saturation_ok_per_second']:.1f} ok/s; overload ({factor * queue} in flight) "
              f"{result['overload_ok_per_second']:.1f} ok/s; ratio {result['throughput_ratio']:.3f} (target >= 0.9)\n"
              f"refusals: {result['refused_total']}, p50 {result['refused_p50_ms']:.1f} ms, "
              f"p99 {result['refused_p99_ms']:.1f} ms (target p99 < 50 ms)")
    return result

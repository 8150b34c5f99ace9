"""Reward rules for the tests of `backend: python`: one that fails, one that hangs, one batched."""

import time


def length_score(prompt: str, response: str, scale: float = 1.0) -> float:
    return scale * len(response)


def lengths(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) for r in responses]


def broken(prompt: str, response: str) -> float:
    if "boom" in response:
        raise KeyError("no rule for boom")
    return 1.0


def not_a_number(prompt: str, response: str):
    return "high" if response == "text" else float("nan")


def slow(prompt: str, response: str) -> float:
    time.sleep(2.0)
    return 0.0


CALLS: list[int] = []  # rows per call of `recorded`, for the batching test


def recorded(prompts: list[str], responses: list[str]) -> list[float]:
    CALLS.append(len(prompts))
    time.sleep(0.05)  # long enough for concurrent requests to queue up behind the first call
    return [1.0] * len(prompts)


def slow_when_asked(prompt: str, response: str) -> float:
    if response == "slow":
        time.sleep(2.0)
    return 0.5

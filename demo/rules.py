"""Example rule-based rewards for `rlhf serve reward` with `backend: python` (docs/algorithms.md).

tidy_answer fits the demo task; exact_match is a generic verifier against a
reference answer per prompt.
"""

import functools
import json
import pathlib


def tidy_answer(prompt: str, response: str) -> float:
    """The demo task's format rule: one sentence that ends with a single full stop, no word said twice in a row,
    and not too short. In [0, 1]."""
    words = response.replace(".", " . ").replace(",", " , ").split()
    if not words:
        return 0.0
    ends = float(words[-1] == "." and words.count(".") == 1)
    stutters = sum(a == b for a, b in zip(words, words[1:]))
    length = min(1.0, len(words) / 8)
    return round(0.5 * ends + 0.3 * length + 0.2 * (stutters == 0), 6)


@functools.lru_cache(maxsize=8)
def _answers(path: str) -> dict[str, str]:
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    return {row["prompt"]: str(row["answer"]).strip() for row in rows}


def exact_match(prompt: str, response: str, answers: str) -> float:
    """1.0 when the response, stripped, equals the prompt's reference answer, else 0.0.

    answers: a .jsonl file of {"prompt": ..., "answer": ...} rows (the prompt data set's answer column);
    configure it with `python: {function: demo.rules:exact_match, kwargs: {answers: data/answers.jsonl}}`.
    A prompt without a reference answer scores 0.
    """
    expected = _answers(answers).get(prompt)
    return float(expected is not None and response.strip() == expected)

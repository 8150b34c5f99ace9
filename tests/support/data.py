"""Data files as the CLI and the controller read them."""

import json
import pathlib

from training import synthetic


def write_jsonl(path: pathlib.Path, rows, opener=open) -> pathlib.Path:
    """Rows as jsonl (a str row is written verbatim, for malformed lines)."""
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_prompts(path: pathlib.Path, prompts) -> pathlib.Path:
    """A prompts file: one {"prompt": ...} row per prompt."""
    return write_jsonl(path, [{"prompt": p} for p in prompts])


def write_pairs(path: pathlib.Path, pairs) -> pathlib.Path:
    """A preference-pairs file: one {"prompt", "chosen", "rejected"} row per (prompt, chosen, rejected)."""
    return write_jsonl(path, [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])

# five training prompts, each with one good and one bland answer
FIVE_PAIRS = [(p, "first , the ocean has waves and salt .", "well , it is okay .")
              for p in synthetic.train_prompts(5, seed=40)]

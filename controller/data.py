"""Prompt and pretraining-text files for the controller."""

import json
import pathlib


def read_texts(path: str | pathlib.Path, field: str) -> list[str]:
    """Rows of a .jsonl file (`field` of each object) or a .txt file (one per line).

    Raises ValueError naming the file and line of a malformed row.
    """
    path = pathlib.Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str) or not row[field]:
            raise ValueError(f"{path}:{number}: missing or empty string field {field!r}")
        texts.append(row[field])
    if not texts:
        raise ValueError(f"{path}: no rows")
    return texts

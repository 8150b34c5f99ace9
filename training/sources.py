"""Where data rows come from: local .jsonl/.jsonl.gz/.json/.parquet files or a Hugging Face dataset id.

Each reader yields (where, row): `where` names the file and line (or row) for
error messages; `row` is a dict, or a RowError saying why the line is not one.
training/datasets.py turns rows into records.
"""

import gzip
import importlib
import json
import pathlib
import re
from typing import Any, Iterator

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DatasetError(ValueError):
    """A data file or row that cannot be loaded; the message starts with `file:line:`."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        super().__init__(message)
        self.where = where  # "data/rm.jsonl:17", "data/rm.parquet:row 3", or None for the whole source
        self.field = field  # the offending column, or None


class RowError(Exception):
    """A problem with one row; `_load` adds the location and turns it into a DatasetError."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def to_dataset_error(self, where: str) -> DatasetError:
        """The user-facing error: `where: field 'x': reason`."""
        prefix = f"{where}: field {self.field!r}: " if self.field else f"{where}: "
        return DatasetError(prefix + self.reason, where=where, field=self.field)


Rows = Iterator[tuple[str, dict | RowError]]


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
             str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def is_hub_id(source: str) -> bool:
    """True when `source` (without a `:split` suffix) is not a local path and looks like `owner/name`."""
    name = source.rsplit(":", 1)[0] if ":" in source else source
    if pathlib.Path(source).exists() or pathlib.Path(name).exists():
        return False
    return _HUB_ID.fullmatch(name) is not None and not name.endswith(_FILE_SUFFIXES)


def open_source(source: str | pathlib.Path, split: str) -> tuple[str, Rows]:
    """(display name, rows) for a local file or a hub id."""
    text = str(source)
    if is_hub_id(text):
        name, _, suffix = text.partition(":")
        return f"{name}[{suffix or split}]", _hub_rows(name, suffix or split)
    path = pathlib.Path(text)
    if not path.is_file():
        what = "file" if text.endswith(_FILE_SUFFIXES) else "file or Hugging Face id (owner/name)"
        raise DatasetError(f"{text}: no such {what}", where=text)
    readers = {".jsonl": _jsonl_rows, ".jsonl.gz": _jsonl_rows, ".json": _json_rows,
               ".json.gz": _json_rows, ".parquet": _parquet_rows}
    for suffix, reader in readers.items():
        if text.endswith(suffix):
            return text, reader(path, text)
    raise DatasetError(f"{text}: unknown file type; expected one of {', '.join(_FILE_SUFFIXES)}",
                       where=text)


def _open_text(path: pathlib.Path):
    """A text handle on a plain or gzipped UTF-8 file (a leading BOM is dropped)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return path.open(encoding="utf-8-sig")


def _jsonl_rows(path: pathlib.Path, name: str) -> Rows:
    """One JSON object per line; blank lines are skipped, `where` is the 1-based line."""
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield f"{name}:{number}", _decode_line(line)
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DatasetError(f"{name}: cannot read ({error})", where=name) from None


def _decode_line(line: str) -> dict | RowError:
    """A jsonl line as a dict, or the reason it is not one."""
    try:
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        return RowError(f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(row, dict):
        return RowError(f"expected a JSON object, got {json_type(row)}")
    return row


def _json_rows(path: pathlib.Path, name: str) -> Rows:
    """A JSON list of objects; `where` is the 0-based row index."""
    try:
        with _open_text(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{name}:{error.lineno}: not valid JSON ({error.msg})", where=name) from None
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DatasetError(f"{name}: cannot read ({error})", where=name) from None
    if not isinstance(data, list):
        raise DatasetError(f"{name}: expected a JSON list of objects, got {json_type(data)}",
                           where=name)
    for index, row in enumerate(data):
        bad = None if isinstance(row, dict) else RowError(f"expected an object, got {json_type(row)}")
        yield f"{name}:row {index}", bad or row


def _parquet_rows(path: pathlib.Path, name: str) -> Rows:
    """Rows of a parquet file read in batches with pyarrow; `where` is the 0-based row index."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{name}: install `pyarrow` to read parquet files", where=name) from None
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{name}:row {index}", row
                index += 1
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DatasetError(f"{name}: cannot read parquet ({error})", where=name) from None


def _hub_rows(repo_id: str, split: str) -> Rows:
    """Rows of `datasets.load_dataset(repo_id, split=split)`; `datasets` is imported only here."""
    try:
        hf_datasets = importlib.import_module("datasets")
        load_dataset = hf_datasets.load_dataset
    except (ImportError, AttributeError):
        raise DatasetError(f"{repo_id}: install `datasets` to load hub ids (pip install datasets); "
                           "no local file has this name", where=repo_id) from None
    name = f"{repo_id}[{split}]"
    try:
        dataset = load_dataset(repo_id, split=split)
    except Exception as error:  # network, auth, unknown split: all end the load the same way
        raise DatasetError(f"{name}: could not load from the hub ({error})", where=name) from error
    for index, row in enumerate(dataset):
        bad = None if isinstance(row, dict) else RowError(f"expected a mapping, got {json_type(row)}")
        yield f"{name}:row {index}", bad or row

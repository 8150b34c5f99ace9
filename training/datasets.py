"""One loader for the SFT, preference and prompt data of every RLHF step.

Sources: a local `.jsonl`, `.jsonl.gz`, `.json` (a list of objects) or
`.parquet` file, or a Hugging Face dataset id `owner/name[:split]` (needs the
optional `datasets` package). Row layouts, detected from the keys of the first
usable row or forced with `layout=`:

    pairs   {"prompt", "chosen", "rejected"}            Dahoas/rm-static
    hh      {"chosen", "rejected"} full dialogues       Anthropic/hh-rlhf
    ranked  {"prompt", "responses", "ranking"} or {"prompt", "ranked_responses"}
    sft     {"prompt", "response" | "completion"}
    prompt  {"prompt"}

A malformed row raises `DatasetError` naming file, line (or row) and field;
with `skip_bad_rows=True` it is counted in the `LoadReport` instead. Splits
(training/splits.py) hash the prompt, so a prompt never lands in two splits and
file order does not matter. See docs/datasets.md.
"""

import pathlib
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, NamedTuple, Sequence

# DatasetError, is_hub_id and the splits are part of this module's interface: users load, then split.
from training.sources import DatasetError, RowError, Rows, is_hub_id, json_type, open_source  # noqa: F401
from training.splits import parse_fractions, phase_split, prompt_of, train_eval_split  # noqa: F401

LAYOUTS = ("pairs", "hh", "ranked", "sft", "prompt")
PREFERENCE_LAYOUTS = ("pairs", "hh", "ranked")
SFT_LAYOUTS = ("sft", "pairs", "hh", "ranked")

PROMPT_KEYS = ("prompt", "question")
CHOSEN_KEYS = ("chosen", "response_j", "chosen_response")
REJECTED_KEYS = ("rejected", "response_k", "rejected_response")
RESPONSE_KEYS = ("response", "completion")
HH_ASSISTANT = "\n\nAssistant:"
MAX_REPORTED_ERRORS = 5



class PreferencePair(NamedTuple):
    """One comparison: `chosen` is preferred to `rejected` as a reply to `prompt`.

    A NamedTuple, so it is also the `(prompt, chosen, rejected)` tuple that
    `training.rm_objective` takes.
    """

    prompt: str
    chosen: str
    rejected: str


class SFTExample(NamedTuple):
    """One demonstration: the `response` a labeler wrote for `prompt`."""

    prompt: str
    response: str


@dataclass(frozen=True)
class RankedPrompt:
    """K >= 2 distinct responses to one prompt, ordered best -> worst (InstructGPT K = 4..9)."""

    prompt: str
    responses: tuple[str, ...]

    def __post_init__(self):
        if len(self.responses) < 2:
            raise ValueError(f"a ranking needs at least 2 responses, got {len(self.responses)}")
        if len(set(self.responses)) != len(self.responses):
            raise ValueError("a ranking cannot hold the same response twice")

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (better, worse) index pairs into `responses`, in lexicographic order."""
        return list(combinations(range(len(self.responses)), 2))


@dataclass
class LoadReport:
    """What a load read: rows seen, records kept, rows skipped and the first few reasons."""

    total: int = 0  # non-blank rows read
    loaded: int = 0  # records returned
    skipped: int = 0  # malformed rows dropped (only with skip_bad_rows)
    first_errors: list[str] = field(default_factory=list)  # up to MAX_REPORTED_ERRORS messages
    source: str = ""
    layout: str = ""  # the layout used, detected or forced

    def summary(self) -> str:
        """One line for a log: counts, layout, and the first skipped row's reason."""
        line = f"{self.source}: loaded {self.loaded} of {self.total} rows (layout {self.layout})"
        if self.skipped:
            line += f", skipped {self.skipped} bad rows; first: {self.first_errors[0]}"
        return line


Record = PreferencePair | RankedPrompt | SFTExample | str
# ---- row layouts: each parser turns a dict into a record or raises RowError ---------------

def _key(row: dict, names: Sequence[str]) -> str:
    """The first of `names` present in `row` (names[0] if none, so 'missing' names the canonical key)."""
    return next((name for name in names if name in row), names[0])


def _text(row: dict, name: str) -> str:
    """row[name] if it is a non-blank string, else a RowError naming the field."""
    if name not in row:
        raise RowError(f"missing (row has keys {sorted(row)})", name)
    return _check_text(row[name], name)


def _check_text(value: Any, name: str) -> str:
    """`value` if it is a non-blank string, else a RowError saying what it was."""
    if not isinstance(value, str):
        raise RowError(f"expected a non-empty string, got {json_type(value)}", name)
    if not value.strip():
        got = "an empty string" if not value else "a whitespace-only string"
        raise RowError(f"expected a non-empty string, got {got}", name)
    return value


def _parse_pairs(row: dict) -> PreferencePair:
    """prompt/chosen/rejected columns (or the response_j/response_k, *_response aliases)."""
    prompt = _text(row, _key(row, PROMPT_KEYS))
    chosen_key, rejected_key = _key(row, CHOSEN_KEYS), _key(row, REJECTED_KEYS)
    chosen, rejected = _text(row, chosen_key), _text(row, rejected_key)
    if chosen == rejected:
        raise RowError(f"identical to {chosen_key!r} (a comparison needs two different responses)",
                        rejected_key)
    return PreferencePair(prompt, chosen, rejected)


def split_hh_dialogue(dialogue: str) -> tuple[str, str]:
    """(prompt, response) of an Anthropic HH dialogue, split after the LAST "\\n\\nAssistant:".

    The prompt keeps the tag; the response is exactly the text after it,
    leading space included, so prompt + response == dialogue. Raises
    ValueError if there is no Assistant turn or the last one is blank.
    """
    cut = dialogue.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"no {HH_ASSISTANT!r} turn in the dialogue")
    prompt, response = dialogue[:cut + len(HH_ASSISTANT)], dialogue[cut + len(HH_ASSISTANT):]
    if not response.strip():
        raise ValueError("the last Assistant turn is empty")
    return prompt, response


def _parse_hh(row: dict) -> PreferencePair:
    """Two full dialogues that share every turn but the last Assistant reply."""
    halves = {}
    for name in ("chosen", "rejected"):
        try:
            halves[name] = split_hh_dialogue(_text(row, name))
        except ValueError as error:
            raise RowError(str(error), name) from None
    (prompt, chosen), (other_prompt, rejected) = halves["chosen"], halves["rejected"]
    if prompt != other_prompt:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other_prompt)) if a != b),
                  min(len(prompt), len(other_prompt)))
        raise RowError(f"its dialogue before the last {HH_ASSISTANT!r} differs from the chosen "
                        f"one at character {at}", "rejected")
    if chosen == rejected:
        raise RowError("identical to 'chosen' (a comparison needs two different responses)",
                        "rejected")
    return PreferencePair(prompt, chosen, rejected)


def _parse_ranked(row: dict) -> RankedPrompt:
    """{"prompt", "responses", "ranking"} (ranking[i] = rank of responses[i], 0 = best)
    or {"prompt", "ranked_responses"} (best first)."""
    prompt = _text(row, _key(row, PROMPT_KEYS))
    name = "ranked_responses" if "ranked_responses" in row else "responses"
    responses = _text_list(row, name)
    if name == "responses":
        ranks = _ranking(row, len(responses))
        responses = [response for _, response in sorted(zip(ranks, responses))]
    return RankedPrompt(prompt, tuple(responses))


def _text_list(row: dict, name: str) -> list[str]:
    """row[name] as a list of >= 2 distinct non-blank strings."""
    if name not in row:
        raise RowError(f"missing (row has keys {sorted(row)})", name)
    values = row[name]
    if not isinstance(values, list):
        raise RowError(f"expected a list of at least 2 strings, got {json_type(values)}", name)
    if len(values) < 2:
        raise RowError(f"expected at least 2 responses, got {len(values)}", name)
    texts = [_check_text(value, f"{name}[{i}]") for i, value in enumerate(values)]
    first = {}
    for i, text in enumerate(texts):
        if text in first:
            raise RowError(f"{name}[{first[text]}] and {name}[{i}] are identical", name)
        first[text] = i
    return texts


def _ranking(row: dict, k: int) -> list[int]:
    """row["ranking"] as a permutation of 0..k-1 (no ties)."""
    if "ranking" not in row:
        raise RowError(f"missing (row has keys {sorted(row)})", "ranking")
    ranks = row["ranking"]
    if not isinstance(ranks, list) or not all(type(r) is int for r in ranks):
        got = json_type(ranks) if not isinstance(ranks, list) else f"{ranks!r}"
        raise RowError(f"expected a list of integer ranks (0 = best), got {got}", "ranking")
    if len(ranks) != k:
        raise RowError(f"has {len(ranks)} ranks for {k} responses", "ranking")
    tied = sorted({r for r in ranks if ranks.count(r) > 1})
    if tied:
        raise RowError(f"rank {tied[0]} is given twice; ties are not allowed", "ranking")
    if sorted(ranks) != list(range(k)):
        hint = " (1-based? use 0 for the best)" if sorted(ranks) == list(range(1, k + 1)) else ""
        raise RowError(f"ranks must be 0..{k - 1} with 0 = best, got {ranks}{hint}", "ranking")
    return ranks


def _parse_sft(row: dict) -> SFTExample:
    """prompt plus a `response` or `completion` column."""
    return SFTExample(_text(row, _key(row, PROMPT_KEYS)), _text(row, _key(row, RESPONSE_KEYS)))


def _parse_prompt(row: dict) -> str:
    """The prompt column alone (PPO prompts)."""
    return _text(row, _key(row, PROMPT_KEYS))


_COLUMNS = {  # what each layout needs, for error messages
    "pairs": "prompt, chosen, rejected", "hh": "chosen, rejected (full dialogues)",
    "ranked": "prompt, responses, ranking (or prompt, ranked_responses)",
    "sft": "prompt, response (or completion)", "prompt": "prompt",
}

_PARSERS: dict[str, Callable[[dict], Record]] = {
    "pairs": _parse_pairs, "hh": _parse_hh, "ranked": _parse_ranked,
    "sft": _parse_sft, "prompt": _parse_prompt,
}


def detect_layout(keys) -> str:
    """The layout whose columns `keys` (one row's keys) hold; DatasetError if none fits."""
    keys = set(keys)
    has_prompt = bool(keys.intersection(PROMPT_KEYS))
    if "ranked_responses" in keys or {"responses", "ranking"} <= keys:
        return "ranked"
    if has_prompt and keys.intersection(CHOSEN_KEYS) and keys.intersection(REJECTED_KEYS):
        return "pairs"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    if has_prompt and keys.intersection(RESPONSE_KEYS):
        return "sft"
    if has_prompt:
        return "prompt"
    raise DatasetError(f"cannot tell the layout from the keys {sorted(keys)}: expected "
                       "prompt/chosen/rejected, chosen/rejected (hh), prompt/responses/ranking, "
                       "prompt/ranked_responses, prompt/response or prompt; pass layout= to force one")


# ---- loading ------------------------------------------------------------------------------

def _load(source: str | pathlib.Path, layout: str | None, split: str, skip_bad_rows: bool,
          allowed: tuple[str, ...], convert: Callable[[Record], Any]) -> tuple[list, LoadReport]:
    """Read `source`, parse each row with one layout, convert the records; see load_pairs."""
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    name, rows = open_source(source, split)
    if layout is not None:
        _check_allowed(name, layout, allowed)
    report = LoadReport(source=name)
    records = []
    for where, row in rows:
        report.total += 1
        try:
            if isinstance(row, RowError):
                raise row
            if layout is None:
                layout = _detect_row_layout(row, allowed)
            records.append(convert(_PARSERS[layout](row)))
        except RowError as error:
            _skip_or_raise(error.to_dataset_error(where), report, skip_bad_rows)
    report.loaded, report.layout = len(records), layout or ""
    if not records:
        detail = f"; first errors: {report.first_errors}" if report.skipped else ""
        raise DatasetError(f"{name}: no usable rows ({report.skipped} of {report.total} bad){detail}",
                           where=name)
    return records, report


def _detect_row_layout(row: dict, allowed: tuple[str, ...]) -> str:
    """detect_layout for one row, as a row error (so skip_bad_rows can move on to the next row)."""
    try:
        layout = detect_layout(row.keys())
    except DatasetError as error:
        raise RowError(str(error)) from None
    if layout not in allowed:
        expected = "; ".join(f"{name}: {_COLUMNS[name]}" for name in allowed)
        raise RowError(f"columns {sorted(row)} fit layout {layout!r}, which cannot be used here; "
                        f"expected {expected}")
    return layout


def _check_allowed(name: str, layout: str, allowed: tuple[str, ...]) -> None:
    """Fail the whole load when the layout cannot give the records asked for."""
    if layout not in allowed:
        raise DatasetError(f"{name}: layout {layout!r} cannot be loaded here; "
                           f"expected one of {', '.join(allowed)}", where=name)


def _skip_or_raise(error: DatasetError, report: LoadReport, skip_bad_rows: bool) -> None:
    """Count a bad row (keeping the first few messages) or raise it."""
    if not skip_bad_rows:
        raise error from None
    report.skipped += 1
    if len(report.first_errors) < MAX_REPORTED_ERRORS:
        report.first_errors.append(str(error))


def load_pairs(source: str | pathlib.Path, *, layout: str | None = None, split: str = "train",
               skip_bad_rows: bool = False) -> tuple[list[PreferencePair | RankedPrompt], LoadReport]:
    """Preference records for the reward model (or DPO) from a pairs, hh or ranked source.

    `source` is a file path or a hub id `owner/name[:split]` (`split` is used
    when there is no suffix, and ignored for files). Ranked prompts stay whole;
    `to_pairs` expands them. Raises DatasetError at the first bad row unless
    skip_bad_rows, and always when no row is usable.
    """
    return _load(source, layout, split, skip_bad_rows, PREFERENCE_LAYOUTS, lambda record: record)


def _as_sft(record: Record) -> SFTExample:
    """A demonstration from any record: preference data gives prompt + its best response."""
    if isinstance(record, PreferencePair):
        return SFTExample(record.prompt, record.chosen)
    if isinstance(record, RankedPrompt):
        return SFTExample(record.prompt, record.responses[0])
    return record


def load_sft(source: str | pathlib.Path, *, layout: str | None = None, split: str = "train",
             skip_bad_rows: bool = False) -> tuple[list[SFTExample], LoadReport]:
    """(prompt, response) demonstrations from an sft source, or prompt + best response of
    preference data (pairs/hh: chosen, ranked: the top one), as DeepSpeed-Chat step 1 does."""
    return _load(source, layout, split, skip_bad_rows, SFT_LAYOUTS, _as_sft)


def load_prompts(source: str | pathlib.Path, *, layout: str | None = None, split: str = "train",
                 skip_bad_rows: bool = False) -> tuple[list[str], LoadReport]:
    """Prompts for PPO rollouts from any layout (hh: the dialogue up to the last Assistant tag).

    Rows are fully validated by their layout; prompts are kept in file order, duplicates included.
    """
    return _load(source, layout, split, skip_bad_rows, LAYOUTS, prompt_of)


def to_pairs(records: Sequence[PreferencePair | RankedPrompt]) -> list[PreferencePair]:
    """Flatten preference records: each ranked prompt becomes its C(K, 2) pairs, in `pairs()` order."""
    out = []
    for record in records:
        if isinstance(record, RankedPrompt):
            out.extend(PreferencePair(record.prompt, record.responses[better], record.responses[worse])
                       for better, worse in record.pairs())
        else:
            out.append(record)
    return out

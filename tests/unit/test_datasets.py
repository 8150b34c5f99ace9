"""The data loader: every file format and row layout, error messages, bad-row skipping, splits."""

import gzip
import json
import random
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.data import write_jsonl
from training.datasets import (
    DatasetError,
    LoadReport,
    PreferencePair,
    RankedPrompt,
    SFTExample,
    detect_layout,
    is_hub_id,
    load_pairs,
    load_prompts,
    load_sft,
    parse_fractions,
    phase_split,
    split_hh_dialogue,
    to_pairs,
    train_eval_split,
)

PAIR_ROWS = [
    {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "response": " Blue.",
     "chosen": " Blue.", "rejected": " I don't know."},
    {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "response": " 4",
     "chosen": " 4", "rejected": " 5"},
]
PAIRS = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in PAIR_ROWS]

HH_CHOSEN = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Whiskers?"
             "\n\nHuman: Something shorter?\n\nAssistant: How about Tom?")
HH_REJECTED = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Whiskers?"
               "\n\nHuman: Something shorter?\n\nAssistant: Cats do not need names.")
HH_PROMPT = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Whiskers?"
             "\n\nHuman: Something shorter?\n\nAssistant:")


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "json", "parquet"])
def test_every_file_format_gives_the_same_pairs(tmp_path, suffix):
    path = tmp_path / f"rm.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, PAIR_ROWS)
    elif suffix == "jsonl.gz":
        write_jsonl(path, PAIR_ROWS, opener=gzip.open)
    elif suffix == "json":
        path.write_text(json.dumps(PAIR_ROWS))
    else:
        write_parquet(path, PAIR_ROWS)
    records, report = load_pairs(path)
    assert records == PAIRS
    assert (report.total, report.loaded, report.skipped, report.layout) == (2, 2, 0, "pairs")
    assert report.source == str(path)


def test_pairs_accept_common_column_aliases(tmp_path):
    stack = write_jsonl(tmp_path / "se.jsonl", [{"question": "Q?", "response_j": "good", "response_k": "bad"}])
    named = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "Q?", "chosen_response": "good",
                                                "rejected_response": "bad"}])
    assert load_pairs(stack)[0] == [PreferencePair("Q?", "good", "bad")]
    assert load_pairs(named)[0] == [PreferencePair("Q?", "good", "bad")]


def test_preference_pair_is_the_tuple_the_reward_trainer_unpacks():
    prompt, chosen, rejected = PAIRS[0]
    assert (prompt, chosen, rejected) == (PAIRS[0].prompt, PAIRS[0].chosen, PAIRS[0].rejected)


# ---- layouts --------------------------------------------------------------------------------

@pytest.mark.parametrize("keys, layout", [
    (["prompt", "response", "chosen", "rejected"], "pairs"),  # Dahoas/rm-static
    (["chosen", "rejected"], "hh"),
    (["prompt", "responses", "ranking"], "ranked"),
    (["prompt", "ranked_responses"], "ranked"),
    (["prompt", "completion"], "sft"),
    (["prompt", "response"], "sft"),
    (["prompt", "id"], "prompt"),
])
def test_layout_is_detected_from_the_keys(keys, layout):
    assert detect_layout(keys) == layout


def test_unknown_keys_name_the_expected_layouts(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "hello"}])
    with pytest.raises(DatasetError, match=r"x\.jsonl:1: cannot tell the layout .*\['text'\]"):
        load_prompts(path)


def test_hh_splits_a_two_turn_dialogue_after_the_last_assistant_tag(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    (pair,), report = load_pairs(path)
    assert report.layout == "hh"
    assert pair.prompt == HH_PROMPT
    assert pair.chosen == " How about Tom?" and pair.rejected == " Cats do not need names."
    assert pair.prompt + pair.chosen == HH_CHOSEN  # nothing lost: join_prompt_response round-trips
    assert split_hh_dialogue(HH_REJECTED) == (HH_PROMPT, " Cats do not need names.")


def test_ranked_rows_are_ordered_best_first(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "p", "responses": ["ok", "best", "worst", "good"], "ranking": [2, 0, 3, 1]},
        {"prompt": "q", "ranked_responses": ["a", "b", "c"]},
    ])
    records, report = load_pairs(path)
    assert report.layout == "ranked"
    assert records == [RankedPrompt("p", ("best", "good", "ok", "worst")),
                       RankedPrompt("q", ("a", "b", "c"))]


def test_ranked_prompt_expands_to_all_k_choose_2_pairs_in_order():
    ranked = RankedPrompt("p", ("r0", "r1", "r2", "r3"))
    assert ranked.pairs() == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    flat = to_pairs([PAIRS[0], ranked, PAIRS[1]])
    assert len(flat) == 1 + 6 + 1
    assert flat[0] == PAIRS[0] and flat[-1] == PAIRS[1]
    assert [(p.chosen, p.rejected) for p in flat[1:7]] == [
        ("r0", "r1"), ("r0", "r2"), ("r0", "r3"), ("r1", "r2"), ("r1", "r3"), ("r2", "r3")]
    assert len(RankedPrompt("p", tuple(f"r{i}" for i in range(9))).pairs()) == 36  # InstructGPT K=9


def test_ranked_prompt_rejects_short_or_duplicate_rankings():
    with pytest.raises(ValueError, match="at least 2"):
        RankedPrompt("p", ("only",))
    with pytest.raises(ValueError, match="twice"):
        RankedPrompt("p", ("a", "a"))


def test_sft_rows_and_preference_rows_give_demonstrations(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p1", "response": "r1"},
                                               {"prompt": "p2", "response": "r2"}])
    completion = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "completion": "c"}])
    pairs = write_jsonl(tmp_path / "rm.jsonl", PAIR_ROWS)
    ranked = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "p", "ranked_responses": ["top", "low"]}])
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert load_sft(sft)[0] == [SFTExample("p1", "r1"), SFTExample("p2", "r2")]
    assert load_sft(completion)[0] == [SFTExample("p", "c")]
    assert load_sft(pairs)[0] == [SFTExample(p.prompt, p.chosen) for p in PAIRS]
    assert load_sft(ranked)[0] == [SFTExample("p", "top")]
    assert load_sft(hh)[0] == [SFTExample(HH_PROMPT, " How about Tom?")]


def test_prompts_come_from_every_layout(tmp_path):
    files = {
        "prompt": [{"prompt": "a"}, {"prompt": "b"}],
        "sft": [{"prompt": "a", "response": "x"}, {"prompt": "b", "completion": "y"}],
        "pairs": [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x", "rejected": "y"}],
        "ranked": [{"prompt": "a", "ranked_responses": ["x", "y"]}, {"prompt": "b", "responses": ["x", "y"], "ranking": [1, 0]}],
    }
    for layout, rows in files.items():
        prompts, report = load_prompts(write_jsonl(tmp_path / f"{layout}.jsonl", rows))
        assert (prompts, report.layout) == (["a", "b"], layout)
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
    assert load_prompts(hh)[0] == [HH_PROMPT]


def test_a_forced_layout_overrides_detection(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", PAIR_ROWS)
    prompts, report = load_prompts(path, layout="prompt")
    assert report.layout == "prompt" and prompts == [r["prompt"] for r in PAIR_ROWS]
    sft, _ = load_sft(path, layout="sft")  # rm-static also has a `response` column
    assert sft == [SFTExample(r["prompt"], r["response"]) for r in PAIR_ROWS]


def test_a_layout_without_preferences_is_refused_by_load_pairs(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DatasetError, match=r"sft\.jsonl:1: columns \['prompt', 'response'\] fit "
                                           r"layout 'sft', which cannot be used here; expected "
                                           r"pairs: prompt, chosen, rejected; hh: "):
        load_pairs(path)
    with pytest.raises(DatasetError, match="layout 'prompt' cannot be loaded here"):
        load_sft(path, layout="prompt")
    with pytest.raises(ValueError, match="unknown layout 'pair'"):
        load_pairs(path, layout="pair")


# ---- bad rows --------------------------------------------------------------------------------

GOOD_PAIR = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "chosen": null, "rejected": "r"}',
     "field 'chosen': expected a non-empty string, got null"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r"',
     "not valid JSON (Expecting ',' delimiter at column 47)"),
    ('["p", "c", "r"]', "expected a JSON object, got a list"),
    ('{"prompt": "p", "chosen": "c"}', "field 'rejected': missing (row has keys ['chosen', 'prompt'])"),
    ('{"prompt": 7, "chosen": "c", "rejected": "r"}', "field 'prompt': expected a non-empty string, got a number"),
    ('{"prompt": "p", "chosen": "", "rejected": "r"}', "field 'chosen': expected a non-empty string, got an empty string"),
    ('{"prompt": "  ", "chosen": "c", "rejected": "r"}', "field 'prompt': expected a non-empty string, got a whitespace-only string"),
    ('{"prompt": "p", "chosen": "c", "rejected": "c"}', "field 'rejected': identical to 'chosen'"),
])
def test_a_bad_pairs_row_names_file_line_and_field(tmp_path, line, message):
    path = write_jsonl(tmp_path / "rm.jsonl", [GOOD_PAIR, "", line, GOOD_PAIR])  # line 2 is blank
    with pytest.raises(DatasetError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:3: {message}")
    assert caught.value.where == f"{path}:3"


def test_the_error_reads_like_the_documented_example(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", [GOOD_PAIR, '{"prompt": "p", "chosen": null, "rejected": "r"}'])
    with pytest.raises(DatasetError) as caught:
        load_pairs(path)
    assert str(caught.value) == f"{path}:2: field 'chosen': expected a non-empty string, got null"
    assert isinstance(caught.value, ValueError) and caught.value.field == "chosen"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]},
     "field 'responses': responses[0] and responses[2] are identical"),
    ({"prompt": "p", "ranked_responses": ["a", "a"]},
     "field 'ranked_responses': ranked_responses[0] and ranked_responses[1] are identical"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 1]},
     "field 'ranking': rank 1 is given twice; ties are not allowed"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1, 5]},
     "field 'ranking': ranks must be 0..2 with 0 = best, got [0, 1, 5]"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [1, 2, 3]},
     "(1-based? use 0 for the best)"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]},
     "field 'ranking': has 2 ranks for 3 responses"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [0, "1"]},
     "field 'ranking': expected a list of integer ranks (0 = best), got [0, '1']"),
    ({"prompt": "p", "responses": ["a"], "ranking": [0]},
     "field 'responses': expected at least 2 responses, got 1"),
    ({"prompt": "p", "responses": ["a", None], "ranking": [0, 1]},
     "field 'responses[1]': expected a non-empty string, got null"),
    ({"prompt": "p", "ranked_responses": "a"},
     "field 'ranked_responses': expected a list of at least 2 strings, got a string"),
])
def test_a_bad_ranked_row_says_what_is_wrong(tmp_path, row, message):
    good = {"prompt": "p", "responses": ["x", "y"], "ranking": [1, 0]}
    path = write_jsonl(tmp_path / "ranked.jsonl", [good, row])
    with pytest.raises(DatasetError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:2: ")
    assert message in str(caught.value)


@pytest.mark.parametrize("row, message", [
    ({"chosen": "\n\nHuman: hi", "rejected": HH_REJECTED},
     "field 'chosen': no '\\n\\nAssistant:' turn in the dialogue"),
    ({"chosen": HH_CHOSEN, "rejected": HH_PROMPT + "  "},
     "field 'rejected': the last Assistant turn is empty"),
    ({"chosen": HH_CHOSEN, "rejected": HH_REJECTED.replace("cat", "dog")},
     "field 'rejected': its dialogue before the last '\\n\\nAssistant:' differs from the chosen one "
     "at character 35"),
    ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "field 'rejected': identical to 'chosen'"),
])
def test_a_bad_hh_row_says_what_is_wrong(tmp_path, row, message):
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, row])
    with pytest.raises(DatasetError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:2: {message}")


def test_parquet_and_json_errors_name_the_row_index(tmp_path):
    rows = [PAIR_ROWS[0], {**PAIR_ROWS[1], "rejected": None}]
    parquet = write_parquet(tmp_path / "rm.parquet", rows)
    as_json = tmp_path / "rm.json"
    as_json.write_text(json.dumps(rows))
    for path in (parquet, as_json):
        with pytest.raises(DatasetError, match=rf"^{path}:row 1: field 'rejected': .* got null$"):
            load_pairs(path)


def test_sft_and_prompt_rows_are_validated(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": 3}])
    with pytest.raises(DatasetError, match=r"sft\.jsonl:2: field 'response': expected a non-empty string, got a number"):
        load_sft(sft)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}, {"prompt": ""}])
    with pytest.raises(DatasetError, match=r"p\.jsonl:2: field 'prompt': .* got an empty string"):
        load_prompts(prompts)


def test_whole_file_problems_are_reported(tmp_path):
    with pytest.raises(DatasetError, match="missing.jsonl: no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "rm.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match="unknown file type"):
        load_pairs(tmp_path / "rm.csv")
    (tmp_path / "obj.json").write_text('{"prompt": "p"}')
    with pytest.raises(DatasetError, match="expected a JSON list of objects, got an object"):
        load_prompts(tmp_path / "obj.json")
    (tmp_path / "broken.json").write_text('[\n{"prompt": "p"},\n{"prompt": }\n]')
    with pytest.raises(DatasetError, match=r"broken\.json:3: not valid JSON"):
        load_prompts(tmp_path / "broken.json")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DatasetError, match="no usable rows"):
        load_prompts(empty)


# ---- skip_bad_rows ---------------------------------------------------------------------------

def test_skip_bad_rows_counts_and_keeps_the_first_five_errors(tmp_path):
    bad = '{"prompt": "p", "chosen": null, "rejected": "r"}'
    lines = [GOOD_PAIR, bad, "not json", GOOD_PAIR] + [bad] * 6 + [GOOD_PAIR]
    path = write_jsonl(tmp_path / "rm.jsonl", lines)
    records, report = load_pairs(path, skip_bad_rows=True)
    assert len(records) == 3
    assert (report.total, report.loaded, report.skipped) == (11, 3, 8)
    assert len(report.first_errors) == 5
    assert report.first_errors[0] == f"{path}:2: field 'chosen': expected a non-empty string, got null"
    assert report.first_errors[1].startswith(f"{path}:3: not valid JSON")
    assert "skipped 8 bad rows" in report.summary()


def test_skip_bad_rows_detects_the_layout_from_the_first_usable_row(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", ["{oops", {"text": "?"}, GOOD_PAIR])
    records, report = load_pairs(path, skip_bad_rows=True)
    assert records == [PreferencePair("p", "c", "r")]
    assert report == LoadReport(total=3, loaded=1, skipped=2, first_errors=report.first_errors,
                                source=str(path), layout="pairs")


def test_skip_bad_rows_still_fails_when_nothing_is_usable(tmp_path):
    path = write_jsonl(tmp_path / "rm.jsonl", ['{"prompt": "p", "chosen": "c"}'] * 3)
    with pytest.raises(DatasetError, match=r"no usable rows \(3 of 3 bad\)"):
        load_pairs(path, skip_bad_rows=True)
    with pytest.raises(DatasetError, match=r"rm\.jsonl:1: columns \['chosen', 'prompt'\] fit layout 'prompt'"):
        load_pairs(path)


# ---- splits ----------------------------------------------------------------------------------

def make_pairs(n_prompts: int, per_prompt: int = 1) -> list[PreferencePair]:
    return [PreferencePair(f"prompt {i}", f"good {j}", f"bad {j}")
            for i in range(n_prompts) for j in range(per_prompt)]


def test_train_eval_split_is_deterministic_and_order_free():
    records = make_pairs(2000, per_prompt=2)
    train, evaluation = train_eval_split(records, 0.1, seed=3)
    assert train_eval_split(records, 0.1, seed=3) == (train, evaluation)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    train2, eval2 = train_eval_split(shuffled, 0.1, seed=3)
    assert set(train2) == set(train) and set(eval2) == set(evaluation)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in evaluation})
    assert len(train) + len(evaluation) == len(records)
    assert 0.08 < len(evaluation) / len(records) < 0.12
    assert train_eval_split(records, 0.1, seed=4)[1] != evaluation  # the seed matters


def test_train_eval_split_does_not_move_old_prompts_when_data_grows():
    _, evaluation = train_eval_split(make_pairs(500), 0.2)
    _, grown = train_eval_split(make_pairs(1000), 0.2)
    assert set(evaluation) == {p for p in grown if int(p.prompt.split()[1]) < 500}


def test_train_eval_split_takes_prompts_and_checks_the_fraction():
    prompts = [f"p{i}" for i in range(100)]
    train, evaluation = train_eval_split(prompts, 0.0)
    assert (train, evaluation) == (prompts, [])
    with pytest.raises(ValueError, match=r"eval_fraction must be in \[0, 1\)"):
        train_eval_split(prompts, 1.0)


def test_phase_split_is_disjoint_deterministic_and_near_the_fractions():
    records = make_pairs(5000)
    sft, rm, ppo = phase_split(records, "2,4,4", seed=1)
    assert phase_split(records, (0.2, 0.4, 0.4), seed=1) == (sft, rm, ppo)
    assert phase_split(list(reversed(records)), "2,4,4", seed=1) == (sft[::-1], rm[::-1], ppo[::-1])
    prompts = [{p.prompt for p in phase} for phase in (sft, rm, ppo)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert len(sft) + len(rm) + len(ppo) == len(records)
    for phase, share in zip((sft, rm, ppo), (0.2, 0.4, 0.4)):
        assert abs(len(phase) / len(records) - share) < 0.03


def test_phase_split_and_eval_split_are_independent():
    _, rm, _ = phase_split(make_pairs(3000), "2,4,4")
    _, evaluation = train_eval_split(rm, 0.1)
    assert 0.06 < len(evaluation) / len(rm) < 0.14


def test_phase_fractions_parse_and_validate():
    assert parse_fractions("2,4,4") == pytest.approx((0.2, 0.4, 0.4))
    assert parse_fractions([6, 2, 2]) == pytest.approx((0.6, 0.2, 0.2))
    assert phase_split(make_pairs(50), "10,0,0")[0] == make_pairs(50)
    for bad in ("2,4", "a,b,c", (1, -1, 1), (0, 0, 0)):
        with pytest.raises(ValueError, match="phase fractions"):
            parse_fractions(bad)


# ---- hub ids ---------------------------------------------------------------------------------

def test_hub_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "rm", PAIR_ROWS)
    assert is_hub_id("Anthropic/hh-rlhf") and is_hub_id("Dahoas/rm-static:test")
    assert not is_hub_id("data/rm")  # exists locally
    assert not is_hub_id("data/rm.jsonl")  # a file name, even though missing
    assert not is_hub_id("/abs/path") and not is_hub_id("rm-static") and not is_hub_id("a/b/c")


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in `datasets` module that records load_dataset calls."""
    calls = []
    rows = {"train": [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}],
            "test": [{"prompt": "p", "chosen": "c", "rejected": None}]}

    def load_dataset(repo_id, split):
        calls.append((repo_id, split))
        return rows[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_a_hub_id_calls_load_dataset_with_the_split(fake_hub):
    (pair,), report = load_pairs("Anthropic/hh-rlhf")
    assert fake_hub == [("Anthropic/hh-rlhf", "train")]
    assert pair.prompt == HH_PROMPT and report.source == "Anthropic/hh-rlhf[train]"
    with pytest.raises(DatasetError, match=r"^Dahoas/rm-static\[test\]:row 0: field 'rejected'"):
        load_pairs("Dahoas/rm-static:test")
    assert fake_hub[-1] == ("Dahoas/rm-static", "test")
    load_prompts("Dahoas/rm-static", split="test", skip_bad_rows=True, layout="prompt")
    assert fake_hub[-1] == ("Dahoas/rm-static", "test")


def test_a_hub_id_without_datasets_installed_says_how_to_fix_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DatasetError, match="install `datasets` to load hub ids"):
        load_pairs("Anthropic/hh-rlhf")

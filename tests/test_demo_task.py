"""The demo's task, tiny model and offline training steps (SFT, reward model).

Fast (a few seconds on 2 CPU cores): the training tests run a few dozen steps.
"""

import torch
import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from demo import task
from training.formatting import encode_for_reward, join_prompt_response
from training.reward_model import load_reward_base, pair_accuracy, score_texts, train_reward_model
from training.sft import IGNORE_INDEX, encode_sft_example, response_loss, train_sft

OCEAN = "Describe the ocean for a child :\n"
GOOD = "first , the ocean has waves and coral because it also has whales ."
BLAND = "well , it is really nice and it is very good ."


@pytest.fixture(scope="module")
def lm_dir(tiny_dirs):
    """The session's tokenizer + tiny GPT-2 (random weights; tests only read it)."""
    torch.set_num_threads(1)  # small models; one thread is robust on a busy machine
    return tiny_dirs["lm"]


# --- the task and its gold function ---------------------------------------------------


def test_gold_is_in_unit_interval_and_ranks_hand_written_responses():
    scores = {r: task.gold_score(OCEAN, r) for r in (GOOD, BLAND, "", "ocean ocean")}
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert scores[GOOD] > 0.9
    assert scores[GOOD] > scores[BLAND] + 0.5
    assert task.gold_score(OCEAN, "first , it has waves and coral .") > task.gold_score(
        OCEAN, "first , it has things and stuff .")


def test_gold_depends_on_the_prompt_topic():
    forest = "Describe the forest for a child :\n"
    assert task.gold_score(OCEAN, GOOD) - task.gold_score(forest, GOOD) > 0.5


def test_repetition_scores_low():
    assert task.gold_score(OCEAN, "waves waves waves waves waves waves .") < 0.05
    assert task.gold_score(OCEAN, "first first first because because because .") < 0.1
    stuttered = GOOD.replace("coral", "coral coral")
    assert task.gold_score(OCEAN, stuttered) < task.gold_score(OCEAN, GOOD) - 0.3


def test_heldout_prompts_are_disjoint_from_train_prompts():
    train = set(task.train_prompts(5000, seed=1))
    heldout = task.heldout_prompts(64, seed=2)
    assert len(set(heldout)) == 64 and not train & set(heldout)
    assert task.heldout_prompts(64, seed=2) == heldout  # deterministic by seed
    assert all(p.endswith("\n") and task.topic_of(p) for p in heldout)


def test_pair_labels_agree_with_gold():
    pairs = task.preference_pairs(300, seed=0)
    gaps = [task.gold_score(p, c) - task.gold_score(p, r) for p, c, r in pairs]
    assert len(pairs) == 300 and min(abs(g) for g in gaps) >= 0.05
    assert sum(g > 0 for g in gaps) / len(gaps) > 0.9  # a little annotator noise only
    noiseless = task.preference_pairs(100, seed=0, label_temperature=1e-4)
    assert all(task.gold_score(p, c) > task.gold_score(p, r) for p, c, r in noiseless)


def test_sft_corpus_is_mediocre_but_contains_good_behaviour():
    gold = [task.gold_score(p, r) for p, r in task.sft_examples(2000, seed=0)]
    assert 0.3 < sum(gold) / len(gold) < 0.55
    assert sum(g >= 0.7 for g in gold) / len(gold) > 0.08


# --- tokenizer, model, formatting -----------------------------------------------------


def test_tokenizer_round_trips_and_has_distinct_specials(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    specials = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}
    assert len(specials) == 3 and None not in specials
    text = join_prompt_response(OCEAN, GOOD)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id not in ids  # no special tokens added implicitly
    # The prompt ends in a newline, so prompt and response tokenize independently.
    assert ids == tokenizer(OCEAN)["input_ids"] + tokenizer(GOOD)["input_ids"]


def test_tiny_lm_reloads_with_identical_logits_and_matching_ids(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    first = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    second = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.tensor([tokenizer(OCEAN + GOOD)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert first.config.vocab_size == len(tokenizer)
    assert first.config.pad_token_id == tokenizer.pad_token_id
    assert first.config.eos_token_id == tokenizer.eos_token_id


def test_encode_for_reward_ends_with_eos_and_truncates_the_prompt(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    full = encode_for_reward(tokenizer, OCEAN, GOOD, max_length=64)
    assert full[-1] == tokenizer.eos_token_id
    assert full[:-1] == tokenizer(OCEAN + GOOD)["input_ids"]
    short = encode_for_reward(tokenizer, OCEAN, GOOD, max_length=10)
    assert len(short) == 10 and short == full[-10:]


# --- SFT and reward model -------------------------------------------------------------


def test_sft_masks_prompt_tokens(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids, labels = encode_sft_example(tokenizer, OCEAN, GOOD, max_length=64)
    n_prompt = len(tokenizer(OCEAN)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tokenizer.eos_token_id


def test_sft_lowers_the_response_loss(lm_dir, tmp_path):
    examples = task.sft_examples(256, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    before = response_loss(AutoModelForCausalLM.from_pretrained(lm_dir), tokenizer, examples)
    stats = train_sft(lm_dir, examples, tmp_path, epochs=2, lr=5e-3, batch_size=16, seed=0,
                      progress=False)
    after = response_loss(AutoModelForCausalLM.from_pretrained(tmp_path), tokenizer, examples)
    assert stats["steps"] == 32
    assert after < before - 2.0


def test_reward_model_beats_chance_and_reloads_with_the_same_scores(lm_dir, tmp_path):
    pairs = task.preference_pairs(256, seed=0)
    stats = train_reward_model(lm_dir, pairs, tmp_path, epochs=4, lr=1e-3, batch_size=16,
                               seed=0, eval_pairs=pairs[:64], progress=False)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert pair_accuracy(model, tokenizer, pairs) > 0.65
    # Scores computed before saving (eval_accuracy) are reproduced after reloading.
    assert stats["eval_accuracy"] == pytest.approx(pair_accuracy(model, tokenizer, pairs[:64]))


def test_reward_score_is_read_at_the_eos_whatever_the_padding(lm_dir):
    model, tokenizer = load_reward_base(lm_dir)
    prompts = [OCEAN, "Explain the farm to a friend :\n", OCEAN]
    responses = [GOOD, "it is okay .", BLAND]
    batched = score_texts(model, tokenizer, prompts, responses)  # rows padded to the longest
    alone = torch.cat([score_texts(model, tokenizer, [p], [r]) for p, r in zip(prompts, responses)])
    assert batched.shape == (3,)
    assert torch.allclose(batched, alone, atol=1e-5)

"""The demo's synthetic task (prompts, gold function, datasets), its tiny model and tokenizer, and how
(prompt, response) pairs become tokens for SFT and the reward model."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.formatting import IGNORE_INDEX, encode_for_reward, encode_sft_example, join_prompt_response
from tests.support.training import BLAND, GOOD, OCEAN
from training import synthetic

# --- the task and its gold function ---------------------------------------------------


def test_gold_ranks_hand_written_responses_and_is_floored_at_zero():
    scores = {r: synthetic.gold_score(OCEAN, r) for r in (GOOD, BLAND)}
    assert synthetic.gold_score(OCEAN, "") == 0.0
    off_topic = "first , the forest has trees and moss because it also has deer ."
    assert synthetic.gold_score(OCEAN, off_topic) < synthetic.gold_score(OCEAN, GOOD) - 0.5  # the topic matters
    assert synthetic.gold_score(OCEAN, "trees moss deer cows barn hay .") == 0.0  # penalties cannot go below 0
    assert scores[GOOD] > 0.9
    assert scores[GOOD] > scores[BLAND] + 0.5
    assert synthetic.gold_score(OCEAN, "first , it has waves and coral .") > synthetic.gold_score(
        OCEAN, "first , it has things and stuff .")


def test_gold_depends_on_the_prompt_topic():
    forest = "Describe the forest for a child :\n"
    assert synthetic.gold_score(OCEAN, GOOD) - synthetic.gold_score(forest, GOOD) > 0.5


def test_repetition_scores_low():
    assert synthetic.gold_score(OCEAN, "waves waves waves waves waves waves .") < 0.05
    assert synthetic.gold_score(OCEAN, "first first first because because because .") < 0.1
    stuttered = GOOD.replace("coral", "coral coral")
    assert synthetic.gold_score(OCEAN, stuttered) < synthetic.gold_score(OCEAN, GOOD) - 0.3


def test_heldout_prompts_are_disjoint_from_train_prompts():
    train = set(synthetic.train_prompts(5000, seed=1))
    heldout = synthetic.heldout_prompts(64, seed=2)
    assert len(set(heldout)) == 64 and not train & set(heldout)
    assert synthetic.heldout_prompts(64, seed=2) == heldout  # deterministic by seed
    assert all(p.endswith("\n") and synthetic.topic_of(p) for p in heldout)


def test_pair_labels_agree_with_gold():
    pairs = synthetic.preference_pairs(300, seed=0)
    gaps = [synthetic.gold_score(p, c) - synthetic.gold_score(p, r) for p, c, r in pairs]
    assert len(pairs) == 300 and min(abs(g) for g in gaps) >= 0.05
    assert sum(g > 0 for g in gaps) / len(gaps) > 0.9  # a little annotator noise only
    noiseless = synthetic.preference_pairs(100, seed=0, label_temperature=1e-4)
    assert all(synthetic.gold_score(p, c) > synthetic.gold_score(p, r) for p, c, r in noiseless)


def test_sft_corpus_is_mediocre_but_contains_good_behaviour():
    gold = [synthetic.gold_score(p, r) for p, r in synthetic.sft_examples(2000, seed=0)]
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


def test_sft_masks_prompt_tokens(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids, labels = encode_sft_example(tokenizer, OCEAN, GOOD, max_length=64)
    n_prompt = len(tokenizer(OCEAN)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tokenizer.eos_token_id

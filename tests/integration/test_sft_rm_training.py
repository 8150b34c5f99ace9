"""`rlhf sft` and `rlhf train-rm` on the DeepSpeed loop: what they learn, what they save, and resuming.

Everything is built locally (a tiny GPT-2 and a tiny BERT with their own
tokenizers); nothing is downloaded. A few dozen optimizer steps each.
"""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    GPT2Config,
)

from services.config import ModelConfig
from services.inference import sequence_scores
from services.models import load_reward_model
from tests.support.training import build_tiny_bert, quiet, response_loss
from training import synthetic
from training.checkpoints import ResumeError
from training.rm_objective import RankingObjective, collate_groups, encode_groups, group_rewards, run_train_rm
from training.sft_objective import run_sft


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT-style encoder classifier and a word-level tokenizer with no eos token."""
    return build_tiny_bert(tmp_path_factory.mktemp("bert"))


def pair_accuracy(model, tokenizer, records) -> float:
    """Share of (prompt, chosen, rejected) records the saved reward model scores chosen above rejected."""
    groups = encode_groups(tokenizer, records, 64)
    return RankingObjective(tokenizer.pad_token_id, eval_groups=groups, eval_batch_size=64).evaluate(model)["eval/accuracy"]


# --- reward-model training: GPT-2 and BERT backbones --------------------------------------------


def test_gpt2_reward_model_beats_chance_and_reloads_with_the_same_scores(lm_dir, tmp_path):
    pairs = synthetic.preference_pairs(320, seed=0)
    train, heldout = pairs[:256], pairs[256:]
    summary = run_train_rm(lm_dir, train, tmp_path, quiet(lr=1e-3, batch_size=16, micro_batch_size=8, epochs=3,
                                                          eval_every=16), max_length=64, eval_records=heldout)
    assert [h["step"] for h in summary["history"]] == [16, 32, 48]  # every --eval-every steps and at the end
    assert summary["eval"]["eval/accuracy"] > 0.6 and summary["eval"]["eval/pairs"] == 64
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert pair_accuracy(model, tokenizer, train) > 0.65  # it learned the training preferences, well above chance
    # Scores computed before saving (the summary's eval accuracy) are reproduced after reloading.
    assert pair_accuracy(model, tokenizer, heldout) == pytest.approx(summary["eval"]["eval/accuracy"])
    # config.reward_mean / reward_std: the mean and std of its scores of the training responses.
    with torch.no_grad():
        scores = group_rewards(model, collate_groups(encode_groups(tokenizer, train, 64), tokenizer.pad_token_id))
    assert model.config.reward_mean == pytest.approx(float(scores.mean()), abs=1e-4)
    assert model.config.reward_std == pytest.approx(float(scores.std()), rel=1e-3)


def test_the_reward_service_scores_a_trained_model_as_training_did(lm_dir, tmp_path):
    pairs = synthetic.preference_pairs(64, seed=4)
    run_train_rm(lm_dir, pairs, tmp_path, quiet(lr=1e-3, batch_size=16, micro_batch_size=16), max_length=64)
    served = load_reward_model(ModelConfig(path=str(tmp_path)))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    groups = encode_groups(served.tokenizer, pairs[:8], 64)
    rows = [torch.tensor(seq) for group in groups for seq in group.sequences]
    with torch.no_grad():
        by_service = sequence_scores(served.model, rows, served.pad_id, served.device)
        by_training = group_rewards(model, collate_groups(groups, served.tokenizer.pad_token_id))
    assert served.pad_id == model.config.pad_token_id
    assert torch.allclose(by_service, by_training, atol=1e-5)


def test_bert_style_encoder_trains_as_a_reward_model(bert_dir, tmp_path):
    pairs = synthetic.preference_pairs(320, seed=1)
    out = tmp_path / "rm"
    summary = run_train_rm(bert_dir, pairs[:256], out, quiet(lr=1e-3, batch_size=16, micro_batch_size=16, epochs=2),
                           max_length=64, eval_records=pairs[256:])
    assert summary["train"]["loss"] < math.log(2) - 0.1  # learned beyond chance
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, BertForSequenceClassification) and model.config.num_labels == 1
    assert tokenizer.eos_token == "[SEP]"  # encode_for_reward ends every row with it, as the service will
    reloaded = RankingObjective(tokenizer.pad_token_id, eval_groups=encode_groups(tokenizer, pairs[256:], 64))
    assert reloaded.evaluate(model)["eval/accuracy"] == pytest.approx(summary["eval"]["eval/accuracy"])


# --- SFT --------------------------------------------------------------------------------------


def test_sft_lowers_the_response_loss_and_saves_a_loadable_model(lm_dir, tmp_path):
    examples = synthetic.sft_examples(288, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    before = response_loss(AutoModelForCausalLM.from_pretrained(lm_dir), tokenizer, examples[:256])
    summary = run_sft(lm_dir, examples[:256], tmp_path, quiet(lr=5e-3, batch_size=16, micro_batch_size=8, epochs=2),
                      max_length=64, eval_examples=examples[256:])
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    after = response_loss(model, tokenizer, examples[:256])
    assert summary["steps"] == 32 and after < before - 2.0
    assert summary["eval"]["eval/loss"] == pytest.approx(response_loss(model, tokenizer, examples[256:]), rel=1e-4)


def dropout_lm(lm_dir, path):
    """The tiny GPT-2 with dropout on, so that resuming must also restore the RNG."""
    config = GPT2Config.from_pretrained(lm_dir)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    AutoModelForCausalLM.from_pretrained(lm_dir, config=config).save_pretrained(path)
    AutoTokenizer.from_pretrained(lm_dir).save_pretrained(path)
    return path


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(lm_dir, tmp_path):
    base = dropout_lm(lm_dir, tmp_path / "base")
    examples = synthetic.sft_examples(44, seed=3)  # 6 batches of 8 per epoch, the last one short
    cfg = quiet(lr=3e-3, batch_size=8, micro_batch_size=4, epochs=2, save_every=3, seed=5)
    whole = run_sft(base, examples, tmp_path / "whole", cfg, max_length=48)
    assert whole["steps"] == 12 and (tmp_path / "whole" / "checkpoint-6").is_dir()
    final = load_file(tmp_path / "whole" / "model.safetensors")
    for step in (6, 9):  # at an epoch's end, and mid-epoch
        resumed_out = tmp_path / f"from-{step}"
        shutil.copytree(tmp_path / "whole" / f"checkpoint-{step}", resumed_out / f"checkpoint-{step}")
        resumed = run_sft(base, examples, resumed_out, cfg, max_length=48, resume=True)
        assert resumed["steps"] == 12 and resumed["tokens"] < whole["tokens"]  # only the remaining steps ran
        again = load_file(resumed_out / "model.safetensors")
        assert all(torch.equal(final[name], again[name]) for name in final), step
    # the checkpoint itself is a from_pretrained model, holding the weights of step 6
    at_6 = load_file(tmp_path / "whole" / "checkpoint-6" / "model.safetensors")
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-6").state_dict()
    assert all(torch.equal(state[name], at_6[name]) for name in at_6)
    assert not all(torch.equal(at_6[name], final[name]) for name in final)  # and training went on after it
    with pytest.raises(ResumeError, match="batch_size 8 -> 4"):
        run_sft(base, examples, tmp_path / "from-9", cfg.model_copy(update={"batch_size": 4}), resume=True)


def test_bf16_reward_model_resumes_exactly_and_saves_bf16_weights(lm_dir, tmp_path):
    pairs = synthetic.preference_pairs(96, seed=2)
    cfg = quiet(lr=1e-3, batch_size=16, micro_batch_size=8, save_every=4, dtype="bf16")
    whole = run_train_rm(lm_dir, pairs, tmp_path / "whole", cfg, max_length=64)
    assert whole["steps"] == 6
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    run_train_rm(lm_dir, pairs, tmp_path / "resumed", cfg, max_length=64, resume=True)
    final, again = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert all(torch.equal(final[name], again[name]) for name in final)
    assert final["score.weight"].dtype == torch.bfloat16
    assert not torch.equal(final["score.weight"], load_file(tmp_path / "whole" / "checkpoint-4" / "model.safetensors")["score.weight"])



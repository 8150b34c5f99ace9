"""`rlhf sft` and `rlhf train-rm`: the K-choose-2 loss, the DeepSpeed loop, checkpoints, resume, CLI errors.

Everything is built locally (a tiny GPT-2 and a tiny BERT with their own
tokenizers); nothing is downloaded.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, GPT2Config, PreTrainedTokenizerFast)
from typer.testing import CliRunner

from controller.cli import app
from demo import task
from training.checkpoints import ResumeError, load_reward_backbone, load_tokenizer
from training.datasets import load_pairs
from training.ds_trainer import TrainerConfig
from training.rm_objective import (RankingObjective, collate_groups, encode_groups, group_rewards, ranking_loss,
                                   run_train_rm)
from training.sft import encode_sft_example, response_loss
from training.sft_objective import SFTObjective, response_nll, run_sft

OCEAN = "Describe the ocean for a child :\n"
GOOD = "first , the ocean has waves and coral because it also has whales ."


@pytest.fixture(scope="module")
def lm_dir(tiny_dirs):
    """The session's tiny GPT-2 with the demo's tokenizer (random weights, no dropout; tests only read it)."""
    torch.set_num_threads(1)  # small models; one thread is robust on a busy machine
    return tiny_dirs["lm"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT-style encoder classifier and a word-level tokenizer with no eos token."""
    root = tmp_path_factory.mktemp("bert")
    words = sorted({w for text in task.corpus_texts(0) for w in text.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    BertForSequenceClassification(config).save_pretrained(root)  # a 2-label head: replaced by a scalar one
    tokenizer.save_pretrained(root)
    return root


def quiet(**overrides) -> TrainerConfig:
    """A CPU run without a progress bar."""
    return TrainerConfig(**{"device": "cpu", "progress": False, **overrides})


# --- the InstructGPT K-choose-2 loss ----------------------------------------------------------


def test_k3_ranking_loss_matches_the_three_pairs_computed_by_hand():
    # responses ranked best -> worst score [2, 0, 1]; pairs (0,1) (0,2) (1,2) have diffs 2, 1, -1
    rewards = torch.tensor([2.0, 0.0, 1.0])
    better, worse = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    # -log sigmoid(d) = log(1 + e^-d): 0.126928, 0.313262, 1.313262
    assert float(ranking_loss(rewards, better, worse)) == pytest.approx((0.126928 + 0.313262 + 1.313262) / 3, abs=1e-5)
    # margin 0.5 asks for a larger gap: diffs 1.5, 0.5, -1.5 -> 0.201413, 0.474077, 1.701413
    assert float(ranking_loss(rewards, better, worse, margin=0.5)) == pytest.approx(
        (0.201413 + 0.474077 + 1.701413) / 3, abs=1e-5)


def test_margin_raises_the_loss_and_its_pull_on_separated_pairs():
    rewards = torch.tensor([1.0, 0.0], requires_grad=True)
    better, worse = torch.tensor([0]), torch.tensor([1])
    plain = ranking_loss(rewards, better, worse)
    (grad_plain,) = torch.autograd.grad(plain, rewards)
    margined = ranking_loss(rewards, better, worse, margin=2.0)
    (grad_margin,) = torch.autograd.grad(margined, rewards)
    assert float(margined.detach()) > float(plain.detach()) + 0.5
    assert grad_margin[0] < grad_plain[0] < 0  # pushes the better score up harder
    assert float(ranking_loss(rewards, better, worse, margin=0.0).detach()) == pytest.approx(float(plain.detach()))


def ranked_file(tmp_path):
    """Two ranked prompts (K = 3 and K = 4) as a jsonl file."""
    rows = [{"prompt": OCEAN, "ranked_responses": [GOOD, "it is okay .", "well , it is nice ."]},
            {"prompt": "Explain the farm to a friend :\n", "responses": ["a", "b c", "d", "e f g"],
             "ranking": [2, 0, 3, 1]}]
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class CountingModel(torch.nn.Module):
    """Wraps a classifier to count forward calls and rows; looks like an engine (has .device)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        self.calls, self.rows = self.calls + 1, self.rows + len(input_ids)
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_each_response_is_forwarded_once_and_all_pairs_share_the_batch(lm_dir, tmp_path):
    records, _ = load_pairs(ranked_file(tmp_path))
    records.append(("Describe the forest for a child :\n", "trees and moss .", "stuff ."))  # a plain pair: K = 2
    tokenizer = load_tokenizer(lm_dir)
    groups = encode_groups(tokenizer, records, max_length=64)
    assert [len(g.sequences) for g in groups] == [3, 4, 2] and [len(g.pairs) for g in groups] == [3, 6, 1]
    model = CountingModel(load_reward_backbone(lm_dir, tokenizer).eval())
    objective = RankingObjective(tokenizer.pad_token_id)
    with torch.no_grad():
        loss, extra = objective.loss(model, groups, normaliser=10)
    assert (model.calls, model.rows) == (1, 9)  # sum K = 9 sequences for sum C(K,2) = 10 pairs
    # the same loss from a naive loop: score each response alone, then every pair of each prompt
    naive, correct = [], 0
    for group in groups:
        with torch.no_grad():
            scores = [float(model.model(input_ids=torch.tensor([seq])).logits[0, 0]) for seq in group.sequences]
        for b, w in group.pairs:
            naive.append(math.log1p(math.exp(-(scores[b] - scores[w]))))
            correct += scores[b] > scores[w]
    assert float(loss) == pytest.approx(sum(naive) / 10, abs=1e-5)
    assert extra["accuracy"] == correct


def test_reward_is_read_at_the_last_non_pad_token(lm_dir):
    tokenizer = load_tokenizer(lm_dir)
    model = load_reward_backbone(lm_dir, tokenizer).eval()
    groups = encode_groups(tokenizer, [(OCEAN, GOOD, "it is okay ."), (OCEAN, "short .", "a longer reply here .")], 64)
    batch = collate_groups(groups, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: some are padded
    with torch.no_grad():
        rewards = group_rewards(model, batch)  # (4,)
        hidden = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        last = batch["attention_mask"].sum(1) - 1  # index of the eos that encode_for_reward appends
        by_hand = model.score(hidden[torch.arange(len(last)), last])[:, 0]
        alone = torch.stack([group_rewards(model, collate_groups([g], tokenizer.pad_token_id)) for g in groups]).flatten()
    assert all(batch["input_ids"][i, last[i]] == tokenizer.eos_token_id for i in range(4))
    assert torch.allclose(rewards, by_hand, atol=1e-5)
    assert torch.allclose(rewards, alone, atol=1e-5)  # padding never moves a score


# --- reward-model training: GPT-2 and BERT backbones --------------------------------------------


def test_gpt2_reward_model_trains_reports_eval_accuracy_and_loads_in_the_reward_service(lm_dir, tmp_path):
    from services.config import ModelConfig
    from services.models import load_reward_model

    pairs = task.preference_pairs(320, seed=0)
    out = tmp_path / "rm"
    summary = run_train_rm(lm_dir, pairs[:256], out, quiet(lr=1e-3, batch_size=16, micro_batch_size=8, epochs=3,
                                                            eval_every=16), max_length=64, eval_records=pairs[256:])
    assert [h["step"] for h in summary["history"]] == [16, 32, 48]  # every --eval-every steps and at the end
    assert summary["eval"]["eval/accuracy"] > 0.6 and summary["eval"]["eval/pairs"] == 64
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    reloaded = RankingObjective(tokenizer.pad_token_id, eval_groups=encode_groups(tokenizer, pairs[256:], 64))
    assert reloaded.evaluate(model)["eval/accuracy"] == pytest.approx(summary["eval"]["eval/accuracy"])
    served = load_reward_model(ModelConfig(path=str(out)))
    assert served.pad_id == tokenizer.pad_token_id and isinstance(model.config.reward_std, float)


def test_bert_style_encoder_trains_as_a_reward_model(bert_dir, tmp_path):
    pairs = task.preference_pairs(320, seed=1)
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


def test_sft_loss_ignores_prompt_tokens(lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    ids, labels = encode_sft_example(tokenizer, OCEAN, GOOD, max_length=64)
    n_prompt = len(tokenizer(OCEAN)["input_ids"])
    labels_t, vocab = torch.tensor([labels]), len(tokenizer)
    logits = torch.randn(1, len(ids), vocab)
    nll, count = response_nll(logits, labels_t)
    assert count == len(ids) - n_prompt  # response tokens + eos
    by_hand = sum(-torch.log_softmax(logits[0, t - 1], -1)[ids[t]] for t in range(n_prompt, len(ids)))
    assert float(nll) == pytest.approx(float(by_hand), rel=1e-5)
    shuffled = logits.clone()
    shuffled[0, : n_prompt - 1] = torch.randn(n_prompt - 1, vocab)  # positions that predict prompt tokens
    assert float(response_nll(shuffled, labels_t)[0]) == pytest.approx(float(nll), rel=1e-6)
    assert SFTObjective(tokenizer.pad_token_id).weight((ids, labels)) == count


def test_sft_lowers_the_response_loss_and_saves_a_loadable_model(lm_dir, tmp_path):
    examples = task.sft_examples(288, seed=0)
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
    examples = task.sft_examples(44, seed=3)  # 6 batches of 8 per epoch, the last one short
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
    # the checkpoint itself is a from_pretrained model
    AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "checkpoint-6")
    with pytest.raises(ResumeError, match="batch_size 8 -> 4"):
        run_sft(base, examples, tmp_path / "from-9", cfg.model_copy(update={"batch_size": 4}), resume=True)


def test_bf16_reward_model_resumes_exactly_and_saves_bf16_weights(lm_dir, tmp_path):
    pairs = task.preference_pairs(96, seed=2)
    cfg = quiet(lr=1e-3, batch_size=16, micro_batch_size=8, save_every=4, dtype="bf16")
    whole = run_train_rm(lm_dir, pairs, tmp_path / "whole", cfg, max_length=64)
    assert whole["steps"] == 6
    shutil.copytree(tmp_path / "whole" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    run_train_rm(lm_dir, pairs, tmp_path / "resumed", cfg, max_length=64, resume=True)
    final, again = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert all(torch.equal(final[name], again[name]) for name in final)
    assert final["score.weight"].dtype == torch.bfloat16
    assert not torch.equal(final["score.weight"], load_file(tmp_path / "whole" / "checkpoint-4" / "model.safetensors")["score.weight"])


# --- the CLI: one-line errors ----------------------------------------------------------------


def run_cli(*args):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr.strip().splitlines()


def test_cli_errors_are_one_line(lm_dir, tmp_path):
    common = ["--model", str(lm_dir), "--out", str(tmp_path / "out")]
    code, lines = run_cli("sft", "--data", str(tmp_path / "missing.jsonl"), *common)
    assert code == 2 and lines[-1] == f"error: {tmp_path / 'missing.jsonl'}: no such file"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    code, lines = run_cli("sft", "--data", str(bad), *common)
    assert code == 2 and lines[-1].startswith(f"error: {bad}:2: field 'response': missing")
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    code, lines = run_cli("train-rm", "--data", str(bad), *common)
    assert code == 2 and lines[-1].startswith(f"error: {bad}:2: not valid JSON")
    code, lines = run_cli("train-rm", "--data", str(bad), *common, "--micro-batch-size", "0")
    assert code == 2 and lines[-1] == "error: --micro-batch-size: Input should be greater than or equal to 1"
    code, lines = run_cli("train-rm", "--data", str(bad), *common, "--resume")
    assert code == 2 and lines[-1].startswith("error: --resume: no checkpoint-STEP directory under")
    (tmp_path / "out" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    code, lines = run_cli("sft", "--data", str(bad), *common, "--device", "tpu")
    assert code == 2 and lines[-1] == "error: --device: Input should be 'auto', 'cpu' or 'cuda'"
    code, lines = run_cli("sft", "--data", str(bad), *common)
    assert code == 2 and lines[-1].endswith("already holds checkpoint-3; pass --resume to continue that run, "
                                            "or choose another --out")

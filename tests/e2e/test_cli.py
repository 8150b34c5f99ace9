"""The `rlhf` command end to end: `python -m cli` in a subprocess, against services on loopback or none.

Each test checks the exit code and the one-line error or the printed result a user would see.
"""

import json

import pytest

from controller.evaluation import expected_calibration_error
from services import codec
from tests.support.cli import run_cli
from tests.support.data import FIVE_PAIRS, write_pairs
from tests.support.rpc import compare_margins, score_texts
from training import synthetic


def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [not, a, mapping]\n")
    result = run_cli("serve", "policy", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "bad.yaml: model" in result.stderr


def test_cli_score_reports_unreachable_target():
    result = run_cli("score", "--target", "127.0.0.1:1", "--prompt", "p", "--response", "r", "--timeout", "2")
    assert result.returncode == 1 and "127.0.0.1:1: UNAVAILABLE" in result.stderr


def test_score_cli_prints_the_service_score(stubs, services):
    prompt, response = synthetic.train_prompts(1, seed=30)[0], "first , the ocean has waves ."
    expected = codec.tensor_from_pb(stubs["reward"].Score(score_texts([prompt], [response]), timeout=60).scores, "s")[0]
    result = run_cli("score", "--target", services["reward"].address, "--prompt", prompt, "--response", response)
    assert result.returncode == 0, result.stderr
    assert abs(float(result.stdout) - float(expected)) < 1e-5


def test_eval_rm_cli_reports_accuracy_calibration_examples_and_agreement(services, stubs, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", FIVE_PAIRS)
    out = tmp_path / "eval.json"
    address = services["reward"].address
    result = run_cli("eval-rm", "--target", address, "--data", str(data), "--json", str(out), "--against", address,
                     "--examples", "2", "--chunk", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    margins = compare_margins(stubs["reward"], FIVE_PAIRS)  # what the service itself says of the pairs
    assert report["pairs"] == 5 and report["accuracy"] == pytest.approx(float((margins > 0).float().mean()))
    assert report["mean_margin"] == pytest.approx(float(margins.mean()), abs=1e-5)
    assert report["ece"] == pytest.approx(expected_calibration_error(margins), abs=1e-5)
    assert len(report["examples"]) == 2
    assert report["against"]["agreement"] == 1.0 and report["against"]["spearman_scores"] == pytest.approx(1.0)
    assert "accuracy" in result.stdout and "good answer" in result.stdout and "bad answer" in result.stdout
    assert "agreement on the preferred response" in result.stdout


def test_eval_rm_cli_names_the_bad_row(services, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": null, "rejected": "b"}\n')
    result = run_cli("eval-rm", "--target", services["reward"].address, "--data", str(data))
    assert result.returncode == 1
    assert "bad.jsonl:2" in result.stderr and "chosen" in result.stderr
    skipped = run_cli("eval-rm", "--target", services["reward"].address, "--data", str(data), "--skip-bad-rows")
    assert skipped.returncode == 0 and "skipped 1 malformed rows" in skipped.stdout

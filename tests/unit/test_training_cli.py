"""`rlhf sft` and `rlhf train-rm` refuse bad input before training, each with a one-line error naming
the file, line, field or option (the CLI runs in this process; nothing trains)."""

import json

from typer.testing import CliRunner

from cli.main import app


def run_cli(*args):
    """Invoke `rlhf ARGS` in this process: (exit code, stderr lines)."""
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

"""`rlhf bench train-rm`: reward-model training throughput, our train-rm path vs TRL's RewardTrainer.

Both sides train the same model (a local 4-layer x 256 GPT-2 unless --model)
on the same (prompt, chosen, rejected) pairs from the demo task, with the same
batch size (pairs per optimizer step), max length, learning rate, AdamW betas
(0.9, 0.95), gradient clipping and cosine schedule, in one process on the same
machine. Runs alternate (ours, TRL, TRL, ours, ...) after one warm-up run per
side, so that machine noise hits both alike. The figure is pairs per second
over the optimizer steps (first step start to last step end, batching
included; model loading, tokenisation and saving excluded on both sides).
Both compute in fp32 by default (TRL's RewardConfig would autocast to bf16);
`--bf16` runs both in bf16: ours with DeepSpeed's bf16 engine (bf16 weights,
fp32 master weights), TRL with its bf16 autocast (fp32 weights).
"""

import json
import os
import pathlib
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

TRL_MISSING = ("the train-rm benchmark compares with TRL's RewardTrainer, which is not installed: "
               "pip install 'rlhf-mesh[bench]' (or pip install 'trl>=0.20')")


@dataclass
class RMBenchSettings:
    """What both sides train on and with (the same values for ours and for TRL)."""

    model: str | None = None  # directory or hub id; None: a local 4-layer x 256 GPT-2
    batch_size: int = 16  # pairs per optimizer step
    max_length: int = 128  # tokens per prompt + response
    steps: int = 30  # optimizer steps per timed run
    repeats: int = 3  # timed runs per side
    lr: float = 1e-4  # peak learning rate
    device: str = "auto"  # auto, cpu or cuda
    threads: int | None = None  # torch intra-op threads; None: torch's choice
    bf16: bool = False  # both in bf16: ours DeepSpeed bf16 (fp32 masters), TRL bf16 autocast (its default)


def trl_version() -> str | None:
    """The installed TRL version, or None."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def run_ours(model_dir, pairs, batch_size: int, max_length: int, lr: float, device: str, out,
             bf16: bool = False) -> dict:
    """One `run_train_rm` run (the code path of `rlhf train-rm`); pairs and training seconds."""
    from training.ds_trainer import TrainerConfig
    from training.rm_objective import run_train_rm

    cfg = TrainerConfig(lr=lr, batch_size=batch_size, micro_batch_size=batch_size, epochs=1, device=device,
                        progress=False, dtype="bf16" if bf16 else "fp32")
    summary = run_train_rm(model_dir, pairs, out, cfg, max_length=max_length)
    return {"pairs": summary["pairs"], "seconds": summary["train_seconds"]}


def _step_timer():
    """A TrainerCallback that records the start of the first step and the end of the last one."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first, self.last, self.steps = None, None, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self.first = self.first or time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.last, self.steps = time.perf_counter(), self.steps + 1

    return StepTimer()


def run_trl(model_dir, pairs, batch_size: int, max_length: int, lr: float, device: str, out,
            bf16: bool = False) -> dict:
    """One TRL RewardTrainer run with the same settings; pairs and training seconds.

    bf16=False turns off RewardConfig's default bf16 autocast, so that both sides compute in fp32.
    """
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    datasets.disable_progress_bars()

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=str(out), per_device_train_batch_size=batch_size, max_length=max_length, num_train_epochs=1,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0.05, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
        use_cpu=device == "cpu", seed=0, dataloader_num_workers=0, bf16=bf16)
    dataset = datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in pairs])
    timer = _step_timer()
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout (breaks --json)
    kept = len(trainer.train_dataset)  # TRL drops pairs longer than max_length instead of truncating
    trainer.train()
    return {"pairs": min(kept, timer.steps * batch_size), "seconds": timer.last - timer.first, "kept": kept}


def _one_round(sides: dict, order: list[str], runs: dict, work: pathlib.Path, round_index: int, threads: int,
               **kw) -> None:
    for name in order:
        torch.set_num_threads(threads)  # the same for both sides, whatever a library set before
        runs[name].append(sides[name](out=work / f"{name}-{round_index}", **kw))


def bench_train_rm(s: RMBenchSettings, as_json: bool) -> dict:
    """Print pairs/s of ours and of TRL and their ratio (one JSON object with --json)."""
    from bench.generate import bench_model
    from training import synthetic

    version = trl_version()
    if version is None:
        raise RuntimeError(TRL_MISSING)
    threads = s.threads or torch.get_num_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # else accelerate resets torch's thread count
    device = s.device if s.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    work = pathlib.Path(tempfile.mkdtemp(prefix="rlhf-bench-rm-"))
    model_dir = s.model or str(bench_model(work))
    pairs = [tuple(p) for p in synthetic.preference_pairs(s.batch_size * s.steps, seed=0)]
    kw = {"model_dir": model_dir, "batch_size": s.batch_size, "max_length": s.max_length, "lr": s.lr,
          "device": device, "threads": threads}
    sides = {"ours": lambda **a: run_ours(**a, bf16=s.bf16), "trl": lambda **a: run_trl(**a, bf16=s.bf16)}
    warm = {"ours": [], "trl": []}
    _one_round(sides, ["ours", "trl"], warm, work, -1, **kw, pairs=pairs[: s.batch_size * 3])
    runs = {"ours": [], "trl": []}
    for r in range(s.repeats):  # alternate the order so that drift hits both sides alike
        _one_round(sides, ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"], runs, work, r, **kw, pairs=pairs)
    rate = {name: sum(x["pairs"] for x in xs) / sum(x["seconds"] for x in xs) for name, xs in runs.items()}
    result = {"ours_pairs_per_s": rate["ours"], "trl_pairs_per_s": rate["trl"], "ratio": rate["ours"] / rate["trl"],
              "ours_runs": [x["pairs"] / x["seconds"] for x in runs["ours"]],
              "trl_runs": [x["pairs"] / x["seconds"] for x in runs["trl"]],
              "trl_kept_pairs": runs["trl"][0]["kept"], "pairs_per_run": len(pairs), "model_dir": model_dir,
              **asdict(s), "device": device, "threads": threads, "trl": version}
    _print(result, as_json)
    return result


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    ours, trl = ("bf16", "bf16 autocast") if result["bf16"] else ("fp32", "fp32")
    print(f"rlhf train-rm (DeepSpeed, {ours}): {result['ours_pairs_per_s']:10.1f} pairs/s")
    print(f"TRL {result['trl']} RewardTrainer ({trl}): {result['trl_pairs_per_s']:10.1f} pairs/s")
    print(f"ratio (ours / TRL): {result['ratio']:.3f} over {result['repeats']} alternating runs of "
          f"{result['steps']} steps x {result['batch_size']} pairs, {result['threads']} threads, {result['device']}")

"""The demo's outputs: report.json, curves.png and samples.md."""

import json
import pathlib
from dataclasses import asdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_report(out: pathlib.Path, paths: dict, ppo: dict, settings, wall_seconds: float) -> dict:
    """report.json with the headline numbers, plus samples.md with before/after responses."""
    before, after, heldout = ppo["before"], ppo["after"], ppo["heldout"]
    samples = [
        {"prompt": p, "sft": b, "ppo": a, "gold_sft": gb, "gold_ppo": ga}
        for p, b, a, gb, ga in zip(heldout, before["responses"], after["responses"], before["gold_each"], after["gold_each"])
    ][:6]
    report = {
        "algorithm": settings.algorithm,
        "gold_score_sft": before["gold"],
        "gold_score_ppo": after["gold"],
        "gold_improvement": after["gold"] - before["gold"],
        "rm_pair_accuracy": paths["rm_pair_accuracy"],
        "reward_sft": before["reward"],
        "reward_ppo": after["reward"],
        "kl_final": ppo["stats"].get("objective/kl"),
        "ppo_steps": len(ppo["curve"]),
        "policy_version": ppo["stats"].get("policy/version"),
        "wall_seconds": wall_seconds,
        "sft_loss": paths["sft_stats"]["loss"],
        "settings": asdict(settings),
        "samples": samples,
        "curve": ppo["curve"],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Greedy responses to held-out prompts, before and after PPO\n"]
    for s in samples:
        lines += [f"**Prompt:** {s['prompt']!r}", "",
                  f"- SFT (gold {s['gold_sft']:.2f}): {s['sft']!r}",
                  f"- PPO (gold {s['gold_ppo']:.2f}): {s['ppo']!r}", ""]
    (out / "samples.md").write_text("\n".join(lines))
    return report


def write_curves(path: pathlib.Path, curve: list[dict]) -> None:
    """Reward, KL and gold score over PPO steps."""
    steps = [c["step"] for c in curve]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("reward", "kl", "gold"),
                              ("RM reward (sampled)", "KL to SFT (nats/seq)", "gold score (sampled)")):
        ax.plot(steps, [c[key] for c in curve])
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

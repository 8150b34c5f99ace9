"""Reward-model comparison evaluations: accuracy, margins, calibration, agreement.

The reward service scores both responses of each held-out (prompt, chosen,
rejected) pair through RewardService.CompareStream; the statistics below
say how often it agrees with the human label and how well calibrated its
preference probability sigmoid(margin) is.
"""

import math
from dataclasses import dataclass

import grpc
import torch

from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services import codec
from services.channels import open_channel
from services.config import ClientSecurity


@dataclass(frozen=True)
class Pair:
    """One human comparison: `chosen` was preferred to `rejected`."""

    prompt: str
    chosen: str
    rejected: str


def _requests(pairs: list[Pair], chunk: int):
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        yield reward_pb2.CompareRequest(pairs=reward_pb2.ComparePairs(
            prompts=[p.prompt for p in part], chosen=[p.chosen for p in part], rejected=[p.rejected for p in part]))


def compare(target: str, pairs: list[Pair], chunk: int = 64, timeout: float = 600.0,
            security: ClientSecurity | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (chosen (N,), rejected (N,)) from the RewardService at `target`, streamed in chunks."""
    with open_channel(target, security, aio=False) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        chosen, rejected = [], []
        try:
            for reply in stub.CompareStream(_requests(pairs, chunk), timeout=timeout):
                chosen.append(codec.tensor_from_pb(reply.chosen_scores, "chosen_scores"))
                rejected.append(codec.tensor_from_pb(reply.rejected_scores, "rejected_scores"))
        except grpc.RpcError as error:
            raise RuntimeError(f"{target}: {error.code().name}: {error.details()}") from None
    return torch.cat(chosen).float(), torch.cat(rejected).float()


async def compare_async(clients, pairs: list[Pair], chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `compare` through ServiceClients: the chunks are spread over the reward replicas."""
    replies = await clients.spread("reward", lambda s: s.Compare, list(_requests(pairs, chunk)))
    chosen = [codec.tensor_from_pb(r.chosen_scores, "chosen_scores") for r in replies]
    rejected = [codec.tensor_from_pb(r.rejected_scores, "rejected_scores") for r in replies]
    return torch.cat(chosen).float(), torch.cat(rejected).float()


def expected_calibration_error(margins: torch.Tensor, n_bins: int = 10) -> float:
    """ECE of the preference probability p = sigmoid(margin) against the human label.

    Each pair is a binary prediction: the model picks the side it scores higher
    with confidence max(p, 1 - p) and is right when that side is `chosen`.
    ECE = sum over confidence bins of |bin| / N * |accuracy(bin) - confidence(bin)|.
    """
    p = torch.sigmoid(margins)
    confidence = torch.maximum(p, 1 - p)
    correct = (margins > 0).float()
    edges = torch.linspace(0.5, 1.0, n_bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high) if low > 0.5 else (confidence >= low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return ece


def distribution(scores: torch.Tensor) -> dict[str, float]:
    """Mean, std and quantiles of a set of scores."""
    q = torch.quantile(scores, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]))
    return {"mean": scores.mean().item(), "std": scores.std().item() if len(scores) > 1 else 0.0,
            "p05": q[0].item(), "p25": q[1].item(), "p50": q[2].item(), "p75": q[3].item(), "p95": q[4].item()}


def summarize(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """accuracy, mean_margin, ece and the two score distributions."""
    margins = chosen - rejected
    return {
        "pairs": len(margins),
        "accuracy": (margins > 0).float().mean().item(),
        "mean_margin": margins.mean().item(),
        "ece": expected_calibration_error(margins),
        "chosen_scores": distribution(chosen),
        "rejected_scores": distribution(rejected),
    }


def examples(pairs: list[Pair], chosen: torch.Tensor, rejected: torch.Tensor, n: int) -> list[dict]:
    """The first n pairs as prompt, good answer and score, bad answer and score."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "chosen_score": c.item(), "rejected": p.rejected,
             "rejected_score": r.item()} for p, c, r in zip(pairs[:n], chosen, rejected)]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank)."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def agreement(pairs: list[Pair], a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
              n_examples: int = 5) -> dict:
    """How two reward models compare on the same pairs."""
    margin_a, margin_b = a[0] - a[1], b[0] - b[1]
    agree = (margin_a > 0) == (margin_b > 0)
    disagree = [i for i in range(len(pairs)) if not agree[i]]
    disagree.sort(key=lambda i: -abs(float(margin_a[i] - margin_b[i])))
    return {
        "agreement": agree.float().mean().item(),
        "spearman_scores": spearman(torch.cat(a), torch.cat(b)),
        "spearman_margins": spearman(margin_a, margin_b),
        "disagreements": len(disagree),
        "disagreement_examples": [
            {"prompt": pairs[i].prompt, "chosen": pairs[i].chosen, "rejected": pairs[i].rejected,
             "margin_a": margin_a[i].item(), "margin_b": margin_b[i].item()} for i in disagree[:n_examples]
        ],
    }


def render(target: str, summary: dict, shown: list[dict]) -> str:
    """The text report of `rlhf eval-rm`."""
    c, r = summary["chosen_scores"], summary["rejected_scores"]
    lines = [
        f"reward model at {target}: {summary['pairs']} pairs",
        f"  accuracy     {summary['accuracy']:.4f}   (chosen scored above rejected)",
        f"  mean margin  {summary['mean_margin']:.4f}",
        f"  ECE          {summary['ece']:.4f}   (calibration of sigmoid(margin))",
        "  scores         mean     std     p05     p50     p95",
        f"    chosen   {c['mean']:7.3f} {c['std']:7.3f} {c['p05']:7.3f} {c['p50']:7.3f} {c['p95']:7.3f}",
        f"    rejected {r['mean']:7.3f} {r['std']:7.3f} {r['p05']:7.3f} {r['p50']:7.3f} {r['p95']:7.3f}",
    ]
    for e in shown:
        lines += ["", f"Prompt: {e['prompt'].strip()!r}",
                  f"  good answer ({e['chosen_score']:+.3f}): {e['chosen'].strip()!r}",
                  f"  bad answer  ({e['rejected_score']:+.3f}): {e['rejected'].strip()!r}"]
    return "\n".join(lines)


def render_agreement(a: str, b: str, result: dict) -> str:
    """The text report of `rlhf eval-rm --against`."""
    lines = [f"{a} vs {b}:",
             f"  agreement on the preferred response  {result['agreement']:.4f}",
             f"  Spearman correlation of scores      {result['spearman_scores']:.4f}",
             f"  Spearman correlation of margins     {result['spearman_margins']:.4f}",
             f"  pairs where they disagree            {result['disagreements']}"]
    for e in result["disagreement_examples"]:
        lines += [f"  - {e['prompt'].strip()!r}: margin {e['margin_a']:+.3f} vs {e['margin_b']:+.3f}",
                  f"      chosen {e['chosen'].strip()!r} / rejected {e['rejected'].strip()!r}"]
    return "\n".join(lines)


def eval_rm(target: str, data: str, against: str | None = None, n_examples: int = 3, chunk: int = 64,
            skip_bad_rows: bool = False, limit: int | None = None,
            security: ClientSecurity | None = None) -> tuple[dict, str]:
    """Run `rlhf eval-rm`: returns (JSON-ready result, text report)."""
    from training.datasets import load_pairs, to_pairs

    records, report = load_pairs(data, skip_bad_rows=skip_bad_rows)
    pairs = [Pair(p.prompt, p.chosen, p.rejected) for p in to_pairs(records)][:limit]
    if not pairs:
        raise ValueError(f"{data}: no preference pairs")
    scores = compare(target, pairs, chunk, security=security)
    summary = summarize(*scores)
    result = {"target": target, "data": data, "skipped_rows": report.skipped, **summary,
              "examples": examples(pairs, *scores, n_examples)}
    text = render(target, summary, result["examples"])
    if report.skipped:
        text = f"skipped {report.skipped} malformed rows of {report.total}\n" + text
    if against:
        other = compare(against, pairs, chunk, security=security)
        result["against"] = {"target": against, **summarize(*other), **agreement(pairs, scores, other)}
        text += "\n\n" + render(against, result["against"], []) + "\n\n" + render_agreement(target, against, result["against"])
    return result, text

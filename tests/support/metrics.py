"""Reading Prometheus expositions, and the inputs the metrics tests feed the exporters."""

import types
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value of a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict[tuple, float]:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return samples(reply.read().decode())


def value(scraped: dict, name: str, **labels) -> float:
    """The sample's value, 0 when it is absent (a counter not yet created)."""
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


PPO_STATS = {
    "reward/mean": 0.5, "reward/std": 0.2, "objective/kl": 1.5, "objective/kl_coef": 0.05, "policy/loss": -0.1,
    "value/loss": 0.3, "policy/clipfrac": 0.1, "value/clipfrac": 0.05, "policy/approx_kl": 0.01, "policy/entropy": 2.0,
    "value/explained_variance": 0.4, "response/length": 7.5, "advantages/mean": 0.0, "advantages/std": 1.0,
    "returns/mean": 0.2, "returns/std": 0.5, "time/generate": 0.4, "time/score": 0.2, "time/train": 1.2,
    "samples": 8, "step": 0, "policy/version": 4, "eval/rm_accuracy": 0.75,
}


def fake_cuda():
    """Stands in for torch.cuda on a machine without a GPU."""
    return types.SimpleNamespace(
        memory_allocated=lambda i: 1024, memory_reserved=lambda i: 2048, max_memory_allocated=lambda i: 4096,
        current_device=lambda: 0, get_device_properties=lambda i: types.SimpleNamespace(total_memory=8192))

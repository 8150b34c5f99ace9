"""The DeepSpeed engine: one optimizer step per request, independent of micro-batching."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.config import TrainingConfig
from services.engine import TrainEngine


def lm_loss(batch, normalizer):
    def fn(engine):
        logits = engine(input_ids=batch).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        return nll / normalizer

    return fn


def one_step(path, zero_stage, micro, data):
    # eps=1 makes the first Adam step ~lr * gradient, so it compares gradients
    # rather than amplifying float noise in near-zero ones to +-lr.
    model = AutoModelForCausalLM.from_pretrained(path)
    engine = TrainEngine(model, TrainingConfig(learning_rate=1.0, eps=1.0, zero_stage=zero_stage, grad_clip=0.0),
                         torch.float32, torch.device("cpu"))
    normalizer = data[:, 1:].numel()
    norm, applied = engine.step([lm_loss(data[i : i + micro], normalizer) for i in range(0, len(data), micro)])
    assert applied
    return engine, norm


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_micro_batching_does_not_change_the_step(tiny_dirs, zero_stage):
    torch.manual_seed(0)
    data = torch.randint(3, 200, (8, 12))
    whole, norm_whole = one_step(tiny_dirs["lm"], zero_stage, 8, data)
    split, norm_split = one_step(tiny_dirs["lm"], zero_stage, 2, data)
    assert whole.version == split.version == 1
    assert abs(norm_whole - norm_split) < 1e-3 * max(norm_whole, 1.0)
    initial = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"]).state_dict()
    moved = 0
    for (name, a), b in zip(whole.module.named_parameters(), split.module.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
        moved += not torch.allclose(a, initial[name])
    assert moved > 0


def test_a_lone_rank_skips_the_all_reduce_and_steps_adam_over_all_tensors_at_once_with_the_same_result(tiny_dirs):
    """Alone at ZeRO 0 the engine skips DeepSpeed's all-reduce and runs torch's foreach AdamW; the weights after
    three steps equal those of DeepSpeed's default path (all-reduce, one Adam op per tensor)."""
    torch.manual_seed(0)
    batches = [torch.randint(3, 200, (4, 12)) for _ in range(3)]
    engines = []
    for fast in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"])
        engine = TrainEngine(model, TrainingConfig(learning_rate=1e-3), torch.float32, torch.device("cpu"))
        assert engine.engine.enable_backward_allreduce is False
        assert all(group["foreach"] for group in engine.engine.optimizer.param_groups)
        if not fast:
            engine.engine.enable_backward_allreduce = True
            for group in engine.engine.optimizer.param_groups:
                group["foreach"] = False
        for batch in batches:
            assert engine.step([lm_loss(batch, batch[:, 1:].numel())])[1]
        engines.append(engine)
    for (name, a), b in zip(engines[0].module.named_parameters(), engines[1].module.parameters()):
        assert torch.equal(a, b), name

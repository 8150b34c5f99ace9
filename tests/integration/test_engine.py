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


def test_a_lone_rank_skips_the_all_reduce_and_steps_fused_adam_with_the_same_result(tiny_dirs):
    """Alone at ZeRO 0 on a CPU the engine skips DeepSpeed's all-reduce and steps torch's fused AdamW; the
    weights after three steps equal, to float rounding, those of DeepSpeed's default path (all-reduce, one
    Adam op per tensor), and they moved."""
    torch.manual_seed(0)
    batches = [torch.randint(3, 200, (4, 12)) for _ in range(3)]
    engines = []
    for fast in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"])
        engine = TrainEngine(model, TrainingConfig(learning_rate=1e-3), torch.float32, torch.device("cpu"))
        assert engine.engine.enable_backward_allreduce is False
        assert isinstance(engine.engine.optimizer, torch.optim.AdamW)
        assert all(group["fused"] for group in engine.engine.optimizer.param_groups)
        if not fast:
            engine.engine.enable_backward_allreduce = True
            for group in engine.engine.optimizer.param_groups:
                group["fused"], group["foreach"] = False, False
        for batch in batches:
            assert engine.step([lm_loss(batch, batch[:, 1:].numel())])[1]
        engines.append(engine)
    initial = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"]).state_dict()
    for (name, a), b in zip(engines[0].module.named_parameters(), engines[1].module.parameters()):
        # 1% of one step (lr): Adam turns float noise in gradients that are zero in exact arithmetic (attention's
        # key bias) into steps of up to lr, which the two kernels' rounding can tip apart
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5, msg=name)
        assert not torch.equal(a, initial[name]) or name.endswith("bias"), name


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_partitions_step_the_fused_optimizer_like_stage_0(tiny_dirs, zero_stage):
    """ZeRO wraps the same fused AdamW over its flat fp32 partitions: one step lands where stage 0's does."""
    torch.manual_seed(0)
    batch = torch.randint(3, 200, (4, 12))
    after = []
    for stage in (0, zero_stage):
        model = AutoModelForCausalLM.from_pretrained(tiny_dirs["lm"])
        engine = TrainEngine(model, TrainingConfig(learning_rate=1e-3, zero_stage=stage), torch.float32,
                             torch.device("cpu"))
        assert engine.step([lm_loss(batch, batch[:, 1:].numel())])[1]
        after.append({n: p.detach().clone() for n, p in engine.module.named_parameters()})
    for name, a in after[0].items():
        torch.testing.assert_close(after[1][name], a, rtol=1e-5, atol=1e-6, msg=name)

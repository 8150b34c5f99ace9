"""Every role's loader runs GPT-2's tanh GELU as torch's fused kernel: the same function, fewer passes.

The loaded model must compute what the checkpoint's own modules compute (to
float rounding, forward and backward), `model.fused_activations: false` must
keep the model's own modules, and a model without such activations is left
alone.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.activations import FastGELUActivation, NewGELUActivation

from services.config import ModelConfig
from services.models import LOADERS, TokenValueModel, fuse_activations

ORIGINAL = (NewGELUActivation, FastGELUActivation)


def activations(model: torch.nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if isinstance(m, (*ORIGINAL, torch.nn.GELU))]


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = logits.logsumexp(-1).mean()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("function", ["gelu_new", "gelu_fast"])
def test_fused_gelu_computes_what_the_model_computes(function):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=3, n_head=2, activation_function=function)
    model = GPT2LMHeadModel(cfg).eval()
    fused = copy.deepcopy(model)
    assert fuse_activations(fused) == 3
    assert activations(fused) == [torch.nn.GELU] * 3 and all(m.approximate == "tanh" for m in fused.modules()
                                                              if isinstance(m, torch.nn.GELU))
    ids = torch.randint(0, 101, (4, 20))
    logits, grads = loss_and_grads(model, ids)
    fused_logits, fused_grads = loss_and_grads(fused, ids)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_without_tanh_gelu_are_left_alone():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                       activation_function="relu"))
    before = [type(m) for m in model.modules()]
    assert fuse_activations(model) == 0
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize("role", ["policy", "reference", "reward", "value"])
def test_every_role_loads_fused_unless_told_not_to(role, tiny_dirs):
    path = str(tiny_dirs["lm" if role in ("policy", "reference") else "rm"])
    fused = LOADERS[role](ModelConfig(path=path)).model
    kept = LOADERS[role](ModelConfig(path=path, fused_activations=False)).model
    n_layer = fused.config.n_layer
    assert activations(fused) == [torch.nn.GELU] * n_layer
    assert activations(kept) == [NewGELUActivation] * n_layer
    ids = torch.randint(3, fused.config.vocab_size, (2, 12))
    with torch.no_grad():
        if isinstance(fused, TokenValueModel):
            a, b = fused(ids, torch.ones_like(ids)), kept(ids, torch.ones_like(ids))
        else:
            a, b = fused(input_ids=ids).logits, kept(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_checkpoint_written_is_the_models_own(tiny_dirs, tmp_path):
    """Fusing changes modules, not weights or config: a saved policy loads back into plain transformers."""
    model = LOADERS["policy"](ModelConfig(path=str(tiny_dirs["lm"]))).model
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.activation_function == "gelu_new"
    assert activations(again) == [NewGELUActivation] * again.config.n_layer
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name

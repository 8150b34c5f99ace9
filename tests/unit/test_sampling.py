"""RowSampler: per-row sampling streams draw from the warped distribution."""

import torch

from services.inference import RowSampler, Sampling, sampling_processors


def test_row_sampler_frequencies_match_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0]])
    probs = torch.softmax(logits, -1)[0]
    n = 20000
    uniforms = torch.rand(n, 1, dtype=torch.float64)
    sampler = RowSampler(uniforms, prompt_width=0)
    picks = sampler(torch.zeros(n, 0, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
    freq = torch.bincount(picks, minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)


def test_filtered_tokens_are_never_sampled():
    s = Sampling(temperature=1.0, max_new_tokens=1, top_k=2, seed=3)
    processors = sampling_processors(s, list(range(500)), prompt_width=4)
    logits = torch.tensor([[0.1, 3.0, 0.2, 2.5, 0.0]]).expand(500, -1)
    picked = processors(torch.zeros(500, 4, dtype=torch.long), logits.clone()).argmax(-1)
    assert set(picked.tolist()) == {1, 3}


def test_streams_depend_on_seed_and_row_index_only():
    s = Sampling(temperature=1.0, max_new_tokens=3, seed=42)
    a = sampling_processors(s, [0, 1, 2, 3], prompt_width=0)[-1].uniforms
    b = sampling_processors(s, [2, 3], prompt_width=0)[-1].uniforms
    assert torch.equal(a[2:], b)
    c = sampling_processors(Sampling(1.0, 3, seed=43), [2, 3], prompt_width=0)[-1].uniforms
    assert not torch.equal(b, c)

"""response_logits projects only the response positions, and agrees with projecting every position."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.batch import Sequences
from services.inference import response_logits


class WithoutPositions(torch.nn.Module):
    """The same model behind a forward that does not take logits_to_keep: every position is projected."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def test_projected_positions_equal_the_full_projection():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    rows = [torch.randint(2, 97, (n,)) for n in (9, 5, 12)]
    seqs = Sequences(rows, prompt_lengths=[3, 4, 2])
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        picked, labels, mask = response_logits(model, seqs, pad_id=0, device="cpu")
        full, full_labels, full_mask = response_logits(WithoutPositions(model), seqs, pad_id=0, device="cpu")
    assert "logits_to_keep" in calls[0] and "logits_to_keep" not in calls[1]
    assert calls[0]["use_cache"] is False and "use_cache" not in calls[1]  # no KV cache: this pass does not generate
    assert picked.shape == full.shape == (3, 10, 97)
    assert torch.equal(labels, full_labels) and torch.equal(mask, full_mask)
    keep = mask.bool()
    assert torch.allclose(picked[keep], full[keep], atol=1e-5)
    for i, (row, p) in enumerate(zip(rows, seqs.prompt_lengths)):  # labels are the response tokens
        assert torch.equal(labels[i, : row.numel() - p], row[p:])


def test_values_and_scores_build_no_kv_cache():
    """The value head's backbone and the reward model are asked for no cache; their outputs do not change."""
    from transformers import GPT2ForSequenceClassification

    from services.inference import response_values, sequence_scores
    from services.models import TokenValueModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, num_labels=1, pad_token_id=0)
    classifier = GPT2ForSequenceClassification(cfg).eval()
    calls = []
    classifier.transformer.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs.get("use_cache")),
                                                 with_kwargs=True)
    rows = [torch.randint(2, 97, (n,)) for n in (9, 5)]
    with torch.no_grad():
        values = response_values(TokenValueModel(classifier), Sequences(rows, prompt_lengths=[3, 2]), 0, "cpu")
        scores = sequence_scores(classifier, rows, 0, "cpu")
        cached = classifier(input_ids=rows[0][None], use_cache=True).logits[0, 0]
    assert calls == [False, False, True]
    assert [v.shape for v in values] == [(6,), (3,)]
    assert torch.allclose(scores[0], cached, atol=1e-6)

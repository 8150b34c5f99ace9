"""Reward-model comparison statistics against hand-computed values."""

import math

import pytest
import torch

from controller.evaluation import (
    Pair,
    agreement,
    expected_calibration_error,
    spearman,
    summarize,
)


def test_accuracy_margin_and_distributions():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, -1.0, 0.0])
    s = summarize(chosen, rejected)
    assert s["pairs"] == 4 and s["accuracy"] == 0.75
    assert s["mean_margin"] == pytest.approx((1 - 1 + 1 + 3) / 4)
    assert s["chosen_scores"]["mean"] == pytest.approx(1.5) and s["rejected_scores"]["p50"] == pytest.approx(0.5)


def test_ece_by_hand():
    # margin 0 -> p 0.5 (conf 0.5, wrong since not > 0); +m -> p 0.78 (right); -m -> conf 0.78 (wrong)
    m = math.log(0.78 / 0.22)
    margins = torch.tensor([0.0, m, -m])
    # bin [0.5, 0.55]: one pair, acc 0, conf 0.5 -> 1/3 * 0.5
    # bin (0.75, 0.8]: two pairs, acc 0.5, conf 0.78 -> 2/3 * 0.28
    assert expected_calibration_error(margins) == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 0.28, abs=1e-5)
    # a calibrated, confident, always-right model has ECE near 1 - confidence
    assert expected_calibration_error(torch.full((10,), 20.0)) == pytest.approx(0.0, abs=1e-6)


def test_spearman_by_hand():
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # ranks a = [1,2,3,4], b = [2,1,4,3]: 1 - 6 * sum d^2 / (n (n^2-1)) = 1 - 6*4/60 = 0.6
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.6)


def test_agreement_lists_the_disagreements():
    pairs = [Pair("p", "c", "r")] * 3
    a = (torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 1.0]))
    b = (torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0]))
    result = agreement(pairs, a, b)
    assert result["agreement"] == pytest.approx(2 / 3) and result["disagreements"] == 1
    assert result["disagreement_examples"][0]["margin_a"] == -1.0 and result["disagreement_examples"][0]["margin_b"] == 1.0

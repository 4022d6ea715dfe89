import math

import pytest
import torch

from graphopt import Tolerance, compare


def test_identical_outputs_are_exact():
    x = torch.randn(3, 10)
    m = compare([x], [x.clone()])
    assert m.max_abs == 0 and m.max_rel == 0 and m.cosine == 1.0 and math.isinf(m.sqnr_db) and m.top1 == 1.0
    assert m.as_dict()["sqnr_db"] is None


def test_values_match_their_definitions():
    ref = torch.tensor([[1.0, -2.0, 4.0]])
    act = torch.tensor([[1.0, -2.0, 3.0]])
    m = compare([ref], [act])
    assert m.max_abs == pytest.approx(1.0)
    assert m.max_rel == pytest.approx(0.25)                       # 1 / max|ref|
    assert m.cosine == pytest.approx((1 + 4 + 12) / (math.sqrt(21) * math.sqrt(14)))
    assert m.sqnr_db == pytest.approx(10 * math.log10(21 / 1))
    assert m.top1 == 1.0


def test_top1_agreement_and_worst_output_wins():
    ref = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    act = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    m = compare([ref, torch.ones(3)], [act, torch.ones(3)])
    assert m.top1 == 0.75
    assert m.cosine < 1.0


def test_non_finite_and_mismatched_outputs():
    m = compare([torch.ones(4)], [torch.tensor([1.0, float("inf"), 1.0, 1.0])])
    assert math.isinf(m.max_abs) and m.cosine == -1.0
    assert Tolerance(max_rel=1.0).violations(m)
    with pytest.raises(ValueError, match="shape"):
        compare([torch.ones(4)], [torch.ones(5)])
    with pytest.raises(ValueError, match="2 outputs, the reference has 1"):
        compare([torch.ones(1)], [torch.ones(1), torch.ones(1)])


def test_tolerance_violations_say_what_failed():
    m = compare([torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])])
    problems = Tolerance(max_rel=1e-5, min_cosine=0.99, min_sqnr_db=20).violations(m)
    assert len(problems) == 3 and problems[1].startswith("cosine 0.000000 < 0.99")
    assert Tolerance().violations(m) == []
    with pytest.raises(ValueError, match="unknown tolerance keys"):
        Tolerance.from_dict({"max_relative": 1})

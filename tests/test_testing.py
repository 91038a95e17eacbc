"""The one tolerance rule (lorun_fast.testing) that kernel tests and benchmarks share."""
import pytest
import torch

from lorun_fast.testing import (BASELINE_FACTOR, BENCH_TOLERANCE, KERNEL_TOLERANCE, assert_close_to_reference,
                                bench_tolerance)


def test_float32_rule_is_rtol_times_scale_plus_atol():
    ref = torch.tensor([2.0, -4.0], dtype=torch.float64)
    tol = KERNEL_TOLERANCE["ieee"]
    bound = tol["rtol"] * 4.0 + tol["atol"]
    assert_close_to_reference("y", ref + 0.99 * bound, ref, "ieee")
    with pytest.raises(AssertionError, match="y: max error"):
        assert_close_to_reference("y", ref + 1.01 * bound, ref, "ieee")
    # A reduction judged against the magnitude of its terms, not its value.
    assert_close_to_reference("drho", ref + 1e-3, ref, "ieee", scale=1e3)


def test_sixteen_bit_rule_is_relative_to_torch():
    ref = torch.zeros(3, dtype=torch.float64)
    torch_same = torch.full((3,), 0.01, dtype=torch.float64)
    assert_close_to_reference("y", torch.full((3,), 0.02, dtype=torch.float64), ref, torch.bfloat16,
                              torch_same=torch_same, scale=1.0)
    over = 2 * 0.01 + KERNEL_TOLERANCE[torch.bfloat16]["atol"] + 1e-3
    with pytest.raises(AssertionError, match="vs torch"):
        assert_close_to_reference("y", torch.full((3,), over, dtype=torch.float64), ref, torch.bfloat16,
                                  torch_same=torch_same, scale=1.0)
    with pytest.raises(ValueError, match="torch_same"):
        assert_close_to_reference("y", ref, ref, torch.float16)


def test_non_finite_or_misshaped_results_fail():
    ref = torch.ones(4, dtype=torch.float64)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_reference("z", torch.tensor([1.0, float("nan"), 1.0, 1.0]), ref, "tf32")
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference("z", torch.ones(3), ref, "tf32")
    with pytest.raises(ValueError, match="mode"):
        assert_close_to_reference("z", ref, ref, "bf16")


def test_bench_tolerance_follows_the_baseline():
    assert bench_tolerance(BENCH_TOLERANCE["tf32"]) == 5e-3
    assert bench_tolerance(BENCH_TOLERANCE["tf32"], 1e-4) == 5e-3
    assert bench_tolerance(BENCH_TOLERANCE["fp32"], 1e-3) == pytest.approx(BASELINE_FACTOR * 1e-3 + 1e-6)

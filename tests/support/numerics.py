"""Float comparisons for model outputs that hold on any CPU and BLAS kernel.

Logits computed two ways in float32 (a cached session against a fresh forward, a batched row
against the same request alone, a pruned head against the full one) differ by rounding, and how
much depends on the kernels: which GEMM a shape selects, AVX2 or AVX-512, how it blocks its sums.
A fixed absolute tolerance does not survive that: a difference of 1.41e-4 failed ``atol=1e-4`` on
an AMD EPYC (AVX-512) where this machine saw less.  What is kernel-independent is the *size* of
float32 rounding relative to the values involved, so tolerances here scale with the largest
magnitude of the reference (``rel * max|expected| + floor``).

Calibration (tiny random Llamas of ``tests.support.models``, ``initializer_range=1.0``, whose
large weights amplify rounding): the largest float32-vs-float64 difference of a full forward was
1.9e-5 × max|logits|, and between two float32 computations 5.6e-6 × max|logits| (max|logits|
≈ 30, so about 1.7e-4 absolute — the EPYC's 1.41e-4 is the same effect).  :data:`REL` = 1e-4
leaves a margin of ~5× over the float32 error itself and ~18× over the observed float32
differences, while any real bug (a wrong cache row, position or mask) moves logits by O(1).
"""

from __future__ import annotations

import torch

__all__ = ["REL", "FLOOR", "tolerance", "assert_scaled_close", "assert_logits_close",
           "assert_argmax_equal"]

REL = 1e-4  # × max|expected|: see the module docstring for the calibration
FLOOR = 1e-6  # absolute, so that an all-zero reference does not demand bit equality


def tolerance(expected: torch.Tensor, rel: float = REL, floor: float = FLOOR) -> float:
    """``rel * max|expected| + floor`` over the finite entries of ``expected``."""
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    return rel * scale + floor


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = REL,
                        floor: float = FLOOR, what: str = "values") -> float:
    """Same shape, the same non-finite entries, and every finite entry within
    :func:`tolerance` of ``expected``.  Returns the largest absolute difference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    fa, fe = torch.isfinite(a), torch.isfinite(e)
    assert torch.equal(fa, fe) and torch.equal(a[~fa], e[~fe]), f"{what}: non-finite entries differ"
    tol = tolerance(e, rel, floor)
    diff = (a[fe] - e[fe]).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst > tol:
        idx = torch.nonzero(fe)[int(diff.argmax())].tolist()
        raise AssertionError(
            f"{what} differ: largest absolute difference {worst:.3g} at {idx} "
            f"(got {float(a[tuple(idx)]):.7g}, want {float(e[tuple(idx)]):.7g}) > tolerance "
            f"{tol:.3g} = {rel:g} * max|expected| {float(e[fe].abs().max()):.4g} + {floor:g}")
    return worst


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = REL,
                        floor: float = FLOOR) -> float:
    """:func:`assert_scaled_close` for logits (``-inf`` entries must match exactly)."""
    return assert_scaled_close(actual, expected, rel=rel, floor=floor, what="logits")


def assert_argmax_equal(actual: torch.Tensor, expected: torch.Tensor, *, rel: float = REL,
                        floor: float = FLOOR, min_checked: float = 0.8) -> int:
    """Row-wise argmax of ``actual`` equals that of ``expected`` wherever it is decided.

    A row whose top-2 gap in ``expected`` is within twice the tolerance is a float near-tie
    (either order is within rounding) and is skipped; at least ``min_checked`` of the rows must
    be checked, so that the assertion can still fail.  Returns the number of rows checked.
    """
    a = actual.detach().double().cpu().reshape(-1, actual.shape[-1])
    e = expected.detach().double().cpu().reshape(-1, expected.shape[-1])
    assert a.shape == e.shape
    tol = tolerance(e, rel, floor)
    top2 = e.topk(min(2, e.shape[-1]), dim=-1).values
    gap = top2[:, 0] - top2[:, -1] if e.shape[-1] > 1 else torch.full((e.shape[0],), float("inf"))
    decided = gap > 2 * tol
    checked = int(decided.sum())
    assert checked >= min_checked * e.shape[0], (
        f"only {checked} of {e.shape[0]} rows have a top-2 gap above {2 * tol:.3g}: "
        f"the argmax check would check too little")
    got, want = a.argmax(-1), e.argmax(-1)
    bad = torch.nonzero(decided & (got != want)).flatten().tolist()
    assert not bad, (f"argmax differs at rows {bad}: got {got[bad].tolist()}, "
                     f"want {want[bad].tolist()} (top-2 gaps {gap[bad].tolist()})")
    return checked

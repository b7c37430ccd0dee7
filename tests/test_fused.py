"""The compiled one-pass statistics (capture/_fused.c) against torch, on each kernel the machine has."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autograd_magic.capture import preview as preview_mod

fused = pytest.importorskip("autograd_magic.capture._fused")
if not fused.kernels():
    pytest.skip("no kernel of the compiled statistics runs on this CPU (numpy's path is tested in test_preview)",
                allow_module_level=True)


@pytest.fixture(params=fused.kernels())
def kernel(request):
    was = fused.use(request.param)
    yield request.param
    fused.use(was)


def test_the_extension_is_built_and_used():
    # `make setup` compiles it; a silent fallback to numpy would hide a broken build
    assert preview_mod._fused_stats is fused.stats
    best = fused.kernels()[-1]
    was = fused.use(best)  # the one import picked: the best this CPU runs
    assert was == best


# around each kernel's vector widths (4, 8, 16 lanes) and their tails
SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 1000, 65_536, 131_075]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", SIZES)
def test_stats_match_torch(kernel, dtype, n):
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g, dtype=dtype) * 3 + 0.5
    lo, hi, total, squares = fused.stats(t.numpy())
    assert lo == t.min().item() and hi == t.max().item()  # exact: a comparison, no rounding
    as64 = t.double()
    assert total == pytest.approx(as64.sum().item(), rel=1e-12, abs=1e-9)
    assert math.sqrt(squares) == pytest.approx(torch.linalg.vector_norm(as64).item(), rel=1e-12)
    # and what torch itself shows in the tensor's dtype
    assert total / n == pytest.approx(t.mean().item(), rel=1e-5, abs=1e-6)
    assert math.sqrt(squares) == pytest.approx(torch.linalg.vector_norm(t).item(), rel=1e-5)


@pytest.mark.parametrize("where", [0, 5, 16, 999])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_inf_anywhere_hands_over_to_numpy(kernel, where, bad):
    t = torch.randn(1000)
    t[where] = bad
    assert fused.stats(t.numpy()) is None


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e19), (torch.float64, 1e151)])
def test_squares_near_the_dtypes_overflow_hand_over_to_numpy(kernel, dtype, big):
    # torch's own norm overflows here in float32 (inf): the numpy path reproduces that, so it takes these
    t = torch.full((100,), big, dtype=dtype)
    assert fused.stats(t.numpy()) is None


def test_other_formats_and_empty_blocks_are_none(kernel):
    for a in (np.arange(10, dtype=np.int32), np.ones(10, dtype=np.float16), np.zeros(0, np.float32),
              np.ones(10, dtype=np.complex64), b"abcd"):
        assert fused.stats(a) is None


def test_a_strided_view_is_refused_not_misread():
    a = np.arange(20, dtype=np.float32)[::2]
    with pytest.raises((BufferError, ValueError, TypeError)):
        fused.stats(a)


def test_an_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="no kernel"):
        fused.use("avx9000")

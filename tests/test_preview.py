"""Previews against torch itself: the values torch prints and exact statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autograd_magic.capture import preview as pv
from autograd_magic.capture.preview import EDGE, FULL_LIMIT, preview


@pytest.fixture(autouse=True)
def _both_paths(stats_path):
    """Every test here on both paths (conftest's `stats_path`)."""
    return stats_path


def _edges(t: torch.Tensor) -> torch.Tensor:
    # what torch's printer shows of a summarized tensor: first/last EDGE along each long dim
    for dim, size in enumerate(t.shape):
        if size > 2 * EDGE:
            t = torch.cat([t.narrow(dim, 0, EDGE), t.narrow(dim, size - EDGE, EDGE)], dim)
    return t


def _cases():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 256, generator=g)
    yield "contiguous", base
    yield "transposed", base.t()
    yield "sliced", base[::3, 5:200:2]
    yield "expanded", torch.randn(1, 256, generator=g).expand(64, 256)
    yield "vector", torch.randn(300, generator=g)
    yield "small", torch.randn(4, 4, generator=g)
    yield "scalar", torch.tensor(3.5)
    yield "float64", torch.randn(40, 50, generator=g, dtype=torch.float64)
    yield "3-d", torch.randn(7, 8, 9, generator=g)
    yield "5-d", torch.randn(7, 7, 7, 7, 7, generator=g)
    yield "permuted", torch.randn(8, 32, 4, 16, generator=g).permute(0, 2, 1, 3)  # attention's heads
    yield "permuted, a size-1 dim", torch.randn(1, 32, 3, 64, generator=g).permute(2, 0, 1, 3)
    yield "parameter", torch.nn.Parameter(torch.randn(32, 32, generator=g))
    yield "requires grad", torch.randn(20, 20, generator=g, requires_grad=True) * 2
    yield "int", torch.arange(1000).reshape(10, 100)
    yield "bool", torch.rand(30, 30, generator=g) > 0.5
    yield "float16", torch.randn(30, 30, generator=g).half()
    yield "large values", torch.full((100, 100), 3e4) + torch.arange(10_000).reshape(100, 100)


CASES = list(_cases())


@pytest.mark.parametrize("label,t", CASES, ids=[c[0] for c in CASES])
def test_preview_matches_torch(label, t):
    p = preview(t)
    plain = t.detach()
    assert p.shape == tuple(plain.shape) and p.dtype == str(plain.dtype)
    n = plain.numel()
    if n <= FULL_LIMIT:
        expected = plain
    elif p.flat_head:
        expected = plain.reshape(-1)[:FULL_LIMIT]
    else:
        assert p.summarized
        expected = _edges(plain)
    assert p.values.shape == tuple(expected.shape)
    np.testing.assert_array_equal(p.values, expected.to(torch.float64).numpy() if plain.dtype == torch.float16 else expected.numpy())
    as64 = plain.to(torch.float64)
    assert p.min == pytest.approx(float(as64.min())) and p.max == pytest.approx(float(as64.max()))
    assert p.mean == pytest.approx(float(as64.mean()), rel=1e-5, abs=1e-6)
    assert p.norm == pytest.approx(float(torch.linalg.vector_norm(as64)), rel=1e-5)


def test_preview_is_a_copy_not_a_view():
    t = torch.randn(64, 256)
    p = preview(t)
    before = p.values.copy()
    t.mul_(2)
    np.testing.assert_array_equal(p.values, before)


def test_non_finite_values_give_stats_and_no_warning():
    import warnings

    signaling = torch.from_numpy(np.array([0x7FA00000] * 3, dtype=np.uint32).view(np.float32))  # a signaling NaN
    for t in (torch.tensor([1.0, float("inf"), -float("inf")]), torch.tensor([float("nan")] * 100), signaling):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = preview(t)
        assert math.isnan(p.mean) or math.isinf(p.max)


def test_empty_and_meta_tensors():
    assert preview(torch.empty(0, 5)).min is None
    assert "meta" in preview(torch.empty(3, device="meta")).note


def test_the_run_cache_never_mixes_up_tensors_sharing_memory():
    from autograd_magic.capture.preview import PreviewCache

    cache = PreviewCache()
    z = torch.randn(40, 40, dtype=torch.complex64)
    w = torch.randn(40, 40)
    heads = torch.randn(4, 10, 2, 8)
    views = [w, w.t(), w.view(1600), w[:20], torch._neg_view(w), z.imag, z.conj().imag,
             heads, heads.permute(0, 2, 1, 3), heads.permute(0, 2, 1, 3)[:, :, 1:], heads.transpose(1, 3)[..., :5]]
    for v in views + views[::-1]:  # every order: a cached entry must only ever serve equal values
        p = cache.get(v)
        plain = v.detach().clone().to(torch.float64)
        assert p.min == pytest.approx(float(plain.min())) and p.max == pytest.approx(float(plain.max()))
        assert p.mean == pytest.approx(float(plain.mean()), rel=1e-5, abs=1e-6)
    w.mul_(2)  # in place: every view's version moves on, nothing stale is served
    for v in (w, w.t()):
        assert cache.get(v).max == pytest.approx(float(v.max()))


def test_a_permuted_tensor_shows_its_base_statistics_read_once():
    """A permuted view (attention's heads) holds its base's elements: the run's cache hands it
    the base's statistics (only its edge values are read), the same ones a fresh preview gives."""
    from autograd_magic.capture import preview as pv

    base = torch.randn(8, 32, 4, 16)
    view = base.permute(0, 2, 1, 3)
    cache = pv.PreviewCache()
    first = cache.get(base)
    reads = []
    real = pv._large_stats
    pv._large_stats = lambda *a: (reads.append(a), real(*a))[1]
    try:
        shown = cache.get(view)
    finally:
        pv._large_stats = real
    assert reads == []  # no second pass over the elements
    assert (shown.min, shown.max, shown.mean, shown.norm) == (first.min, first.max, first.mean, first.norm)
    fresh = preview(view)
    assert (fresh.min, fresh.max, fresh.mean, fresh.norm) == (first.min, first.max, first.mean, first.norm)
    np.testing.assert_array_equal(shown.values, fresh.values)  # its own values, as torch orders them


def test_float64_values_whose_squares_overflow_give_torchs_norm_and_no_warning():
    import warnings

    from autograd_magic.capture.preview import preview

    t = torch.tensor([1e200, -3e199, 2.0], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from numpy would reach the user's cell
        p = preview(t)
    assert p.note is None
    assert p.norm == torch.linalg.vector_norm(t).item() == math.inf
    assert p.min == t.min().item() and p.max == t.max().item() and p.mean == pytest.approx(t.mean().item())


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e36), (torch.float32, 3e19), (torch.float64, 1e306), (torch.float64, 1e155)])
def test_an_expanded_tensor_whose_sums_overflow_shows_what_torch_shows(dtype, big):
    """An expanded tensor's statistics come from its base (stride 0): where the sums over all of
    its elements overflow the dtype, torch's mean or norm is inf, and so is the preview's."""
    import warnings

    for t in (torch.full((1, 3), big, dtype=dtype).expand(1000, 3), torch.full((1,), -big, dtype=dtype).expand(5000)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            p = preview(t)
        assert p.mean == pytest.approx(t.mean().item())
        assert p.norm == pytest.approx(torch.linalg.vector_norm(t).item())
        assert p.min == t.min().item() and p.max == t.max().item()


def _fields(p):
    if p is None:
        return None
    values = None if p.values is None else (p.values.dtype.str, p.values.shape, p.values.tobytes())
    return (p.shape, p.dtype, p.device, p.layout, values, p.summarized, p.flat_head, p.min, p.max, p.mean, p.norm, p.note)


@pytest.mark.skipif(pv._cache_get is pv._cached_preview, reason="capture/_fused.c is not built here")
def test_the_compiled_run_cache_answers_as_the_python_one():
    """`PreviewCache.get` compiled (capture/_fused.c's cache_get) against `_cached_preview`, call by
    call over one sequence: the same previews, the same hits (one object for a repeat), the same
    entries in both dicts, also across in-place changes, transposes, odd dtypes and NaNs."""
    w = torch.randn(70, 90)
    g = torch.randn(64, 256)
    nan = torch.randn(30, 30)
    nan[3, 4] = float("nan")
    leaf = torch.nn.Parameter(torch.randn(80, 80))
    seq = [w, w.t(), w, g, g.t(), torch.randn(()), torch.randn(5), torch.randn(50, 50, dtype=torch.float64),
           torch.randn(50, 50, dtype=torch.float16), nan, torch._neg_view(w), w[:, :30], leaf,
           torch.randint(0, 5, (40, 40)), torch.zeros(0, 3), "not a tensor", None, torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2)]
    with torch.inference_mode():
        seq.append(torch.randn(100, 100))
    compiled = pv.PreviewCache()
    seen, dense = {}, {}
    got, want = [], []
    for step in range(3):
        for t in seq:
            got.append(compiled.get(t))
            want.append(pv._cached_preview(seen, dense, t))
        w.mul_(2)  # a new version: nothing stale is served
        g.add_(1)
    assert [repr(_fields(p)) for p in got] == [repr(_fields(p)) for p in want]  # repr: NaN == NaN
    # hits: a repeat within a version is the very object the first call made, in both
    assert [i for i, p in enumerate(got) if any(p is q for q in got[:i] if p is not None)] == \
           [i for i, p in enumerate(want) if any(p is q for q in want[:i] if p is not None)]
    assert sorted(compiled._seen) == sorted(seen)
    assert repr({k: (v[1], v[2]) for k, v in compiled._dense.items()}) == repr({k: (v[1], v[2]) for k, v in dense.items()})

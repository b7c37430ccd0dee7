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


# ---- the compiled whole preview (`preview`) against preview.py's numpy path and torch ----

def _numpy_path(t, with_stats=True):
    fast = preview_mod._fused_preview
    preview_mod._fused_preview = None
    try:
        return preview_mod.preview_quiet(t, with_stats)
    finally:
        preview_mod._fused_preview = fast


# the axis orders a dense block comes in: as made, transposed (a weight's gradient as TBackward
# sends it), and permuted (attention's heads); each is one block of memory, read in place
LAYOUTS = {
    "contiguous": lambda t: t,
    "transposed": lambda t: t.mT if t.dim() >= 2 else t,
    "permuted": lambda t: t.permute(*range(t.dim() - 1, -1, -1)) if t.dim() >= 3 else t.mT if t.dim() == 2 else t,
}


SHAPES = [(), (1,), (5,), (64,), (65,), (7, 7), (8, 8), (6, 7), (3, 4, 5), (64, 256), (2, 3, 300), (1, 1, 100), (100, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["tensor", "parameter", "requires_grad"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_compiled_preview_is_the_numpy_paths_and_torchs(kernel, dtype, shape, kind, layout):
    t = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(len(shape)))
    if kind == "parameter":
        t = torch.nn.Parameter(LAYOUTS[layout](t.detach()))
    elif kind == "requires_grad":
        t = LAYOUTS[layout]((t * 2).requires_grad_())
    else:
        t = LAYOUTS[layout](t)
    fast = fused.preview(t, True)
    assert fast is not None, "a dense CPU float tensor takes the compiled path"
    slow = _numpy_path(t)
    assert type(fast.shape) is tuple and fast.shape == tuple(t.shape) == slow.shape
    assert (fast.dtype, fast.device, fast.layout, fast.summarized, fast.flat_head, fast.note) == (
        slow.dtype, slow.device, slow.layout, slow.summarized, slow.flat_head, slow.note)
    assert fast.values.dtype == slow.values.dtype and np.array_equal(fast.values, slow.values)
    # against torch itself: every element when small, else the edge block torch prints
    d = t.detach()
    if t.numel() <= preview_mod.FULL_LIMIT:
        assert not fast.summarized and np.array_equal(fast.values, d.numpy())
    else:
        assert fast.summarized and np.array_equal(fast.values, preview_mod._edge_block(d).numpy())
    assert fast.min == d.min().item() and fast.max == d.max().item()
    assert fast.mean == pytest.approx(d.double().mean().item(), rel=1e-12, abs=1e-12)
    assert fast.norm == pytest.approx(torch.linalg.vector_norm(d.double()).item(), rel=1e-12)
    for field in ("min", "max", "mean", "norm"):
        assert getattr(fast, field) == pytest.approx(getattr(slow, field), rel=1e-12, abs=1e-12)
    # the values are a copy: changing the tensor afterwards leaves the preview as it was
    before = fast.values.copy()
    with torch.no_grad():
        t.add_(1)
    assert np.array_equal(fast.values, before)
    assert fast.values.flags.c_contiguous


def test_the_compiled_preview_without_statistics_has_none(kernel):
    t = torch.randn(10, 10)
    p = fused.preview(t, False)
    assert p.min is p.max is p.mean is p.norm is None
    assert np.array_equal(p.values, preview_mod._edge_block(t).numpy())


@pytest.mark.parametrize("make", [
    lambda: torch.randn(10, 10)[:, ::2],  # strided with gaps: not one block
    lambda: torch.randn(1, 5).expand(4, 5),  # every row the same memory
    lambda: torch.randn(6, 6).as_strided((3, 3), (1, 1)),  # overlapping windows
    lambda: torch.tensor([1.0, math.nan, 2.0]),  # a NaN: numpy's exact path
    lambda: torch.tensor([[1.0, math.nan], [2.0, 3.0]]).T,  # a NaN in a transposed block
    lambda: torch.tensor([1.0, math.inf]),
    lambda: torch.full((10,), 1e19),  # squares past float32's range
    lambda: torch.zeros(0),  # no elements
    lambda: torch.arange(5),  # not a float dtype
    lambda: torch.ones(4, dtype=torch.float16),
    lambda: torch._neg_view(torch.randn(4)),  # the same memory, the other sign
    lambda: torch._efficientzerotensor(3),  # no memory at all
    lambda: torch.randn(2, 3, 4, 5, 6),  # an edge block past PREVIEW_EDGE_BLOCK: a flat head
], ids=["gaps", "expanded", "overlapping", "nan", "nan_transposed", "inf", "overflow", "empty", "int", "half", "neg_view", "zerotensor", "large_block"])
def test_what_the_compiled_preview_leaves_to_numpys_path(kernel, make):
    t = make()
    assert fused.preview(t, True) is None
    p = preview_mod.preview_quiet(t)  # and the preview still comes, from that path
    assert p.shape == tuple(t.shape)


def test_a_subclass_is_left_to_numpys_path(kernel):
    class Mine(torch.Tensor):
        pass

    assert fused.preview(torch.randn(3).as_subclass(Mine), True) is None


def test_preview_quiet_takes_the_compiled_path_where_it_is_built():
    assert preview_mod._fused_preview is fused.preview


# ---- a pass's gradient norm past --limit: `squares`, what finite.py's LeafNorms.add_all calls ----

def _grads_of_every_kind():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(64, 32, generator=g)
    nan = torch.randn(5, generator=g)
    nan[2] = math.nan
    return {
        "contiguous": dense,
        "transposed": torch.randn(32, 64, generator=g).t(),  # a weight's gradient as TBackward sends it
        "parameter": torch.nn.Parameter(torch.randn(7, generator=g)),
        "float64": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "scalar": torch.tensor(2.5),
        "big": torch.randn(131_075, generator=g),
        "nan": nan,
        "inf": torch.tensor([1.0, math.inf]),
        "near_overflow": torch.full((4,), 1e30),
        "float16": torch.randn(4, generator=g).half(),
        "int": torch.arange(6),
        "strided": dense[:, ::2],
        "empty": torch.zeros(0),
        "negative_view": torch.randn(3, generator=g)._neg_view(),
    }


def test_squares_sums_what_it_reads_in_place_and_hands_back_the_rest(kernel):
    grads = _grads_of_every_kind()
    taken = ["contiguous", "transposed", "parameter", "float64", "scalar", "big"]
    total, count, rest = fused.squares(list(grads.values()))
    expected = sum(grads[k].detach().double().square().sum().item() for k in taken)
    assert count == len(taken)
    assert total == pytest.approx(expected, rel=1e-12)
    # the rest, each the very object, in order: finite.py's exact paths take them
    assert [id(t) for t in rest] == [id(t) for k, t in grads.items() if k not in taken]


def test_squares_of_nothing_and_of_what_is_no_tensor(kernel):
    assert fused.squares([]) == (0.0, 0, [])
    assert fused.squares([None, 3]) == (0.0, 0, [None, 3])
    with pytest.raises(TypeError):
        fused.squares(5)


@pytest.mark.parametrize("compiled", [True, False])
def test_a_passs_gradient_norm_is_torchs_on_either_path(kernel, compiled, monkeypatch):
    from autograd_magic.capture.finite import LeafNorms

    if not compiled:
        monkeypatch.setattr(preview_mod, "_fused_squares", None)
    # every gradient torch can make (an integer tensor has none)
    grads = [t for k, t in _grads_of_every_kind().items() if k != "int"]
    norms = LeafNorms()
    norms.add_all([*grads, None])
    seen = []
    norms.norm(None, seen.append)
    assert norms.count == len(grads)
    assert math.isnan(seen[0])  # the NaN gradient makes the total NaN, as torch's norm does
    finite = [t for t in grads if bool(torch.isfinite(t.detach().resolve_neg().double()).all())]
    norms = LeafNorms()
    norms.add_all(finite)
    norms.norm(None, seen.append)
    expected = torch.linalg.vector_norm(torch.cat([t.detach().resolve_neg().double().reshape(-1) for t in finite]))
    assert seen[1] == pytest.approx(expected.item(), rel=1e-9)

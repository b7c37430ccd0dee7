"""The name index walks each module tree once: what it lists must be what torch's own
`named_modules`, `named_parameters` and `named_buffers` list, in order, duplicates removed."""

import pytest
import torch
from torch import nn

from autograd_magic.capture import names as N


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(3, 3)
        self.a, self.b = shared, shared  # one module under two names
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight  # one parameter under two names
        self.register_buffer("buf", torch.zeros(2))
        self.register_buffer("none_buf", None)
        self.register_parameter("nothing", None)
        self.lst = nn.ModuleList([nn.BatchNorm1d(3), nn.Identity()])
        self.d = nn.ModuleDict({"x": nn.LSTM(2, 3)})


class _OwnListing(nn.Module):
    """A module that lists its parameters its own way (as wrappers such as FSDP do)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(2, 2)

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        for name, p in self.inner.named_parameters():
            yield (f"{prefix}.{name}" if prefix else name), p


MODELS = {
    "tied": _Tied,
    "sequential": lambda: nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 1))),
    "transformer": lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False),
    "scripted": lambda: torch.jit.script(nn.Linear(2, 2)),
    "batchnorm": lambda: nn.BatchNorm2d(4),
}


def _ids(pairs):
    return [(name, id(t)) for name, t in pairs]


@pytest.mark.parametrize("kind", MODELS)
def test_one_walk_lists_what_torch_lists(kind):
    m = MODELS[kind]()
    got = N._module_tree(m, "model")
    assert got is not None
    subs, params, buffers = got
    assert _ids(subs) == _ids(m.named_modules(prefix="model"))
    assert _ids(params) == _ids(m.named_parameters(prefix="model"))
    assert _ids(buffers) == _ids(m.named_buffers(prefix="model"))


def test_a_module_with_its_own_listing_is_asked():
    m = _OwnListing()
    assert N._module_tree(m, "m") is None
    index = N.NameIndex({"m": m})
    assert index.tensor_name(m.inner.weight) == "m.weight"  # its own listing's name, not the tree's


@pytest.mark.parametrize("kind", MODELS)
def test_index_names_every_parameter_and_buffer_by_its_first_path(kind):
    m = MODELS[kind]()
    x = torch.randn(2)
    index = N.NameIndex({"model": m, "x": x, "_hidden": torch.randn(1)})
    expected = {}
    for name, t in [*m.named_parameters(prefix="model"), *m.named_buffers(prefix="model")]:
        expected.setdefault(id(t), (t, name))
    for t, name in expected.values():
        assert index.tensor_name(t) == name
    assert index.tensor_name(x) == "x"
    for path, sub in m.named_modules(prefix="model"):
        assert index.module_name(sub) == path


def test_a_compiled_modules_parameters_are_named_as_the_cell_writes_them(shell):
    """`m = torch.compile(nn.Linear(2, 1))`: the cell writes `m.weight` (the wrapper forwards it),
    torch lists `m._orig_mod.weight`; the rows use the name the cell uses."""
    shell.run_cell("import torch\ntorch.manual_seed(0)\nm = torch.compile(torch.nn.Linear(2, 1))\nx = torch.ones(3, 2)")
    m = shell.user_ns["m"]
    assert [n for n, _ in m.named_parameters()] == ["_orig_mod.weight", "_orig_mod.bias"] and m.weight is m._orig_mod.weight
    shell.run_cell("%%autograd --quiet -o _t\nloss = m(x).sum()\nloss.backward()")
    t = shell.user_ns["_t"]
    assert {"m.weight", "m.bias"} <= {r.label for r in t.records}
    assert not any("_orig_mod" in (r.label or "") or "_orig_mod" in (r.module or "") for r in t.records)
    assert next(r for r in t.records if r.label == "m.weight").attr_grad.values.tolist() == m.weight.grad.tolist()

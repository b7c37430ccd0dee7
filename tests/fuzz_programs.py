"""Random notebook cells for differential fuzzing, and the plain-vs-traced harness.

`programs()` is a hypothesis strategy of small cells over a broad op set:
arithmetic, pow, matmul, reductions, views and indexing, in-place ops,
detach, no_grad blocks, `requires_grad_`, backward with and without a
gradient, `torch.autograd.grad`, loops, functions defined in the cell,
`nn.Linear`, user hooks, several-output ops bound by tuple unpacking,
stack/cat/iteration, optimizer steps (foreach in-place updates),
inference_mode / enable_grad / set_grad_enabled blocks, `.item()`,
`.tolist()`, `.data`, `del`, prints and a displayed last expression. Shapes are
tracked so most statements are valid; some still raise, which is compared
too. `run` runs a cell plain or under `%%autograd --quiet` in one shell
with the same namespace and RNG seed and returns what each run left behind.
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from hypothesis import strategies as st

Shape = Optional[tuple]  # None: data-dependent (boolean mask)

SHAPES: list[tuple] = [(), (3,), (2, 3), (3, 3)]


def _broadcast(a: Shape, b: Shape) -> Shape:
    if a is None or b is None:
        return None if (a or ()) != () and (b or ()) != () else (a if b == () else b)
    out = []
    for x, y in zip(reversed((1,) * (len(b) - len(a)) + a), reversed((1,) * (len(a) - len(b)) + b)):
        if x != y and 1 not in (x, y):
            return None
        out.append(max(x, y))
    return tuple(reversed(out))


@dataclass
class _Var:
    shape: Shape
    grad: bool  # requires grad (best guess)
    leaf: bool


@dataclass
class _Cell:
    draw: Any
    lines: list = field(default_factory=list)
    vars: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)  # name -> (in, out)
    functions: list = field(default_factory=list)
    counter: int = 0
    indent: str = ""
    no_grad: bool = False

    # ---- helpers ----
    def pick(self, options):
        return self.draw(st.sampled_from(list(options)))

    def flag(self, p_true: float = 0.5) -> bool:
        return self.draw(st.integers(0, 99)) < int(p_true * 100)

    def emit(self, text: str) -> None:
        for line in text.split("\n"):
            self.lines.append(self.indent + line)

    def new_name(self) -> str:
        # Sometimes rebind an existing name, as notebooks do (`z = z.mean()`).
        if self.vars and self.flag(0.2):
            return self.pick(sorted(self.vars))
        self.counter += 1
        return f"t{self.counter}"

    def var(self, pred=lambda v: True) -> Optional[str]:
        names = sorted(n for n, v in self.vars.items() if pred(v))
        return self.pick(names) if names else None

    def assign(self, name: str, expr: str, shape: Shape, grad: bool, leaf: bool = False) -> None:
        self.emit(f"{name} = {expr}")
        self.vars[name] = _Var(shape, grad and not self.no_grad, leaf or not (grad and not self.no_grad))

    # ---- expressions: (text, shape, requires_grad) ----
    def leaf_expr(self) -> tuple:
        shape = self.pick(SHAPES)
        grad = self.flag(0.6)
        rg = ", requires_grad=True" if grad else ""
        kind = self.pick(["randn", "tensor", "ones", "arange"])
        if kind == "tensor":
            n = 1
            for s in shape:
                n *= s
            vals = [round(self.draw(st.floats(-3, 3, allow_nan=False)), 2) for _ in range(n)]
            body = _nest(vals, shape)
            return f"torch.tensor({body}{rg})", shape, grad
        if kind == "arange" and len(shape) == 1:
            return f"torch.arange({shape[0]}, dtype=torch.float32{rg})", shape, grad
        return f"torch.{'randn' if kind != 'ones' else 'ones'}({shape}{rg})", shape, grad

    def expr(self, depth: int = 0) -> tuple:
        if not self.vars or (depth < 2 and self.flag(0.1)):
            return self.leaf_expr()
        kinds = ["unary", "binary", "scalar", "pow", "reduce", "view", "index", "matmul", "call", "linear"]
        kind = self.pick(kinds if depth < 2 else ["unary", "scalar", "pow"])
        return getattr(self, "_" + kind)(depth)

    def operand(self, depth: int) -> tuple:
        if depth < 2 and self.flag(0.3):
            text, shape, grad = self.expr(depth + 1)
            return f"({text})", shape, grad
        name = self.var()
        v = self.vars[name]
        return name, v.shape, v.grad

    def _unary(self, depth):
        a, shape, grad = self.operand(depth)
        form = self.pick(["{}.exp()", "torch.tanh({})", "{}.sigmoid()", "{}.relu()", "-{}", "abs({})",
                          "{}.sin()", "torch.sqrt({}.abs() + 1)", "{}.clamp(min=-1.0)", "torch.where({0} > 0, {0}, {0} * 0.1)",
                          "torch.nn.functional.relu({})", "{}.log()", "{}.detach()", "{}.float()"])
        return form.format(a), shape, grad and "detach" not in form

    def _binary(self, depth):
        a, sa, ga = self.operand(depth)
        b, sb, gb = self.operand(depth)
        shape = _broadcast(sa, sb)
        op = self.pick(["+", "-", "*", "/"]) if self.flag(0.8) else self.pick(["torch.maximum", "torch.mul", "torch.add"])
        text = f"{a} {op} {b}" if len(op) == 1 else f"{op}({a}, {b})"
        return text, shape, ga or gb

    def _scalar(self, depth):
        a, shape, grad = self.operand(depth)
        c = self.pick(["2", "0.5", "3", "1e-3", "-1.5"])
        form = self.pick(["{c}*{a}", "{a} + {c}", "{a} - {c}", "{c} - {a}", "{a} / {c}", "{c} / ({a}.abs() + 1)"])
        return form.format(a=a, c=c), shape, grad

    def _pow(self, depth):
        a, shape, grad = self.operand(depth)
        k = self.pick(["2", "3", "4", "0.5", "-1", "1.5"])
        return (f"{a}**{k}" if self.flag(0.8) else f"torch.pow({a}, {k})"), shape, grad

    def _reduce(self, depth):
        a, shape, grad = self.operand(depth)
        forms = [("{}.sum()", ()), ("{}.mean()", ()), ("{}.norm()", ()), ("{}.max()", ()), ("{}.prod()", ())]
        if shape:
            forms += [("{}.sum(0)", shape[1:]), ("{}.amax(dim=-1)", shape[:-1]), ("torch.logsumexp({}, 0)", shape[1:])]
        form, out = self.pick(forms)
        return form.format(a), out, grad

    def _view(self, depth):
        name = self.var(lambda v: v.shape is not None)
        if name is None:
            return self._unary(depth)
        shape = self.vars[name].shape
        forms = [("{}.reshape(-1)", (_numel(shape),)), ("{}.unsqueeze(0)", (1,) + shape), ("{}.clone()", shape)]
        if len(shape) == 2:
            forms += [("{}.t()", shape[::-1]), ("{}.T", shape[::-1]), ("{}.transpose(0, 1)", shape[::-1]),
                      ("{}.view(-1)", (_numel(shape),))]
        if len(shape) == 1:
            forms += [("{}.expand(2, 3)", (2, 3)), ("{}.view(3, 1)", (3, 1))]
        form, out = self.pick(forms)
        return form.format(name), out, self.vars[name].grad

    def _index(self, depth):
        name = self.var(lambda v: bool(v.shape))
        if name is None:
            return self._unary(depth)
        shape = self.vars[name].shape
        forms = [("{}[0]", shape[1:]), ("{}[1:]", (shape[0] - 1,) + shape[1:]), ("{0}[{0} > 0]", None),
                 ("{}[-1]", shape[1:])]
        if len(shape) == 2:
            forms += [("{}[:, 1]", (shape[0],)), ("{}[0, 1:]", (shape[1] - 1,))]
        form, out = self.pick(forms)
        return form.format(name), out, self.vars[name].grad

    def _matmul(self, depth):
        a = self.var(lambda v: v.shape is not None and len(v.shape) >= 1 and v.shape[-1] == 3)
        b = self.var(lambda v: v.shape is not None and len(v.shape) >= 1 and v.shape[0] == 3)
        if a is None or b is None:
            return self._binary(depth)
        sa, sb = self.vars[a].shape, self.vars[b].shape
        if len(sb) == 1:
            out = sa[:-1]
        else:
            out = sa[:-1] + sb[1:]
        form = self.pick(["{} @ {}", "torch.matmul({}, {})"])
        return form.format(a, b), out, self.vars[a].grad or self.vars[b].grad

    def _call(self, depth):
        if not self.functions:
            return self._binary(depth)
        fname = self.pick(self.functions)
        a, sa, ga = self.operand(depth)
        b, sb, gb = self.operand(depth)
        return f"{fname}({a}, {b})", _broadcast(sa, sb), ga or gb

    def _linear(self, depth):
        mod = self.pick(sorted(self.modules)) if self.modules else None
        if mod is None:
            return self._binary(depth)
        name = self.var(lambda v: v.shape is not None and len(v.shape) >= 1 and v.shape[-1] == self.modules[mod][0])
        if name is None:
            return self._unary(depth)
        return f"{mod}({name})", self.vars[name].shape[:-1] + (self.modules[mod][1],), True


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nest(vals: list, shape: tuple):
    if not shape:
        return repr(vals[0])
    step = len(vals) // shape[0]
    return "[" + ", ".join(_nest(vals[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


# ---- statements ----
def _st_assign(c: _Cell) -> None:
    text, shape, grad = c.expr()
    c.assign(c.new_name(), text, shape, grad)


def _st_inplace(c: _Cell) -> None:
    name = c.var()
    if name is None:
        return _st_assign(c)
    v = c.vars[name]
    forms = ["{}.add_(1.5)", "{}.mul_(0.5)", "{}.clamp_(min=-1.0)", "{}.sigmoid_()", "{}.zero_()"]
    if v.shape:
        forms += ["{}[0] = 1.0"]
    other = c.var(lambda o: o.shape is not None and _broadcast(v.shape, o.shape) == v.shape)
    if other is not None:
        forms += ["{} += " + other, "{} -= 0.1 * " + other]
    stmt = c.pick(forms).format(name)
    if v.leaf and v.grad and c.flag(0.8):
        # An update of a leaf, as an optimizer step does it.
        c.emit(f"with torch.no_grad():\n    {stmt}")
    else:
        c.emit(stmt)


def _st_detach(c: _Cell) -> None:
    name = c.var()
    if name is None:
        return _st_assign(c)
    if c.flag(0.8):
        c.assign(c.new_name(), f"{name}.detach()", c.vars[name].shape, False, leaf=True)
    else:
        c.emit(f"{name}.detach_()")
        c.vars[name].grad = False


def _st_no_grad(c: _Cell) -> None:
    c.emit("with torch.no_grad():")
    c.indent, c.no_grad = c.indent + "    ", True
    for _ in range(c.draw(st.integers(1, 2))):
        _st_assign(c)
    if c.flag(0.3):
        name = c.var()
        c.emit(f"print({name}.requires_grad)")
    c.indent, c.no_grad = c.indent[:-4], False


def _st_requires_grad(c: _Cell) -> None:
    name = c.var(lambda v: not v.grad)
    if name is None:
        return _st_assign(c)
    c.emit(f"{name}.requires_grad_()")
    c.vars[name].grad = True


def _root(c: _Cell) -> Optional[str]:
    return c.var(lambda v: v.grad and v.shape is not None)


def _st_backward(c: _Cell) -> None:
    name = _root(c)
    if name is None:
        return _st_assign(c)
    shape = c.vars[name].shape
    retain = ", retain_graph=True" if c.flag(0.7) else ""
    form = c.pick(["sum", "gradient", "autograd"]) if shape else c.pick(["plain", "autograd"])
    if form == "plain":
        c.emit(f"{name}.backward({retain[2:]})")
    elif form == "sum":
        c.emit(f"{name}.sum().backward({retain[2:]})")
    elif form == "gradient":
        c.emit(f"{name}.backward(torch.ones_like({name}){retain})")
    else:
        root = name if not shape else f"{name}.sum()"
        c.emit(f"torch.autograd.backward([{root}]{retain})")
    leaf = c.var(lambda v: v.leaf)
    if leaf is not None and c.flag(0.6):
        c.emit(f"print({leaf}.grad)")


def _st_grad(c: _Cell) -> None:
    name = _root(c)
    leaves = sorted(n for n, v in c.vars.items() if v.leaf and v.grad)
    if name is None or not leaves:
        return _st_assign(c)
    root = name if not c.vars[name].shape else f"{name}.sum()"
    wrt = c.pick(leaves)
    create = ", create_graph=True" if c.flag(0.2) else ""
    g = c.new_name()
    c.emit(f"{g}, = torch.autograd.grad({root}, [{wrt}], retain_graph=True, allow_unused=True{create})")
    c.vars[g] = _Var(c.vars[wrt].shape, bool(create), not create)
    if c.flag(0.5):
        c.emit(f"print({g})")


def _st_loop(c: _Cell) -> None:
    name = c.var(lambda v: v.shape is not None)
    if name is None:
        return _st_assign(c)
    n = c.draw(st.integers(1, 5))
    other = c.var(lambda o: o.shape is not None and _broadcast(c.vars[name].shape, o.shape) == c.vars[name].shape)
    body = c.pick([f"{name} = {name} * 0.5 + {other}", f"{name} = torch.tanh({name}) * i", f"{name} = {name} + i"])
    c.emit(f"for i in range({n}):\n    {body}")
    if other:
        c.vars[name].grad = c.vars[name].grad or c.vars[other].grad
    c.vars[name].leaf = False


def _st_function(c: _Cell) -> None:
    fname = f"f{len(c.functions)}"
    body = c.pick(["c = a * b\n    return c.sin() + a", "return (a - b) ** 2", "return torch.tanh(a) * b.exp()",
                   "d = a + b\n    d = d * d\n    return d.mean() + a"])
    c.emit(f"def {fname}(a, b):\n    {body}")
    c.functions.append(fname)
    _st_assign(c)


def _st_linear(c: _Cell) -> None:
    name = f"lin{len(c.modules)}"
    out = c.pick([1, 2, 3])
    c.emit(f"{name} = torch.nn.Linear(3, {out})")
    c.modules[name] = (3, out)
    x = c.var(lambda v: v.shape is not None and len(v.shape) >= 1 and v.shape[-1] == 3)
    if x is not None:
        c.assign(c.new_name(), f"{name}({x})", c.vars[x].shape[:-1] + (out,), True)


def _st_hook(c: _Cell) -> None:
    name = c.var(lambda v: v.grad)
    if name is None:
        return _st_assign(c)
    form = c.pick(["{}.register_hook(lambda g: g * 2)", "{}.retain_grad()", "{}.register_hook(lambda g: print('hook', g.shape))"])
    h = c.new_name()
    if "register_hook" in form:
        # torch 2.13 segfaults hooking a view whose base changed in place under no_grad
        # before the view's grad_fn was read (plain PyTorch, no tracer involved): read it first.
        c.emit(f"{name}.grad_fn")
        c.emit(f"{h} = " + form.format(name))
        c.vars.pop(h, None)
    else:
        c.emit(form.format(name))


def _st_print(c: _Cell) -> None:
    name = c.var()
    if name is None:
        return _st_assign(c)
    form = c.pick(["print({0})", "print({0}.requires_grad, {0}.is_leaf)", "print(type({0}.grad_fn).__name__)",
                   "print({0}.shape, {0}.dtype)", "print({0}.grad if {0}.is_leaf else None)", "print(float({0}.sum()))"])
    c.emit(form.format(name))


def _st_tuple_outputs(c: _Cell) -> None:
    """Ops with several outputs, bound by tuple unpacking (a namedtuple too)."""
    name = c.var(lambda v: v.shape is not None and len(v.shape) >= 1)
    if name is None:
        return _st_assign(c)
    v = c.vars[name]
    a, b = c.new_name(), c.new_name()
    if a == b:
        b = a + "b"
    form = c.pick(["max", "sort", "chunk", "unbind", "split"]) if v.shape[0] >= 2 else c.pick(["max", "sort"])
    if form == "max":
        c.emit(f"{a}, {b} = {name}.max(dim=0)")
        c.vars[a], c.vars[b] = _Var(v.shape[1:], v.grad, False), _Var(v.shape[1:], False, True)
    elif form == "sort":
        c.emit(f"{a}, {b} = torch.sort({name}, dim=-1)")
        c.vars[a], c.vars[b] = _Var(v.shape, v.grad, False), _Var(v.shape, False, True)
    else:
        call = {"chunk": f"{name}.chunk(2)", "unbind": f"{name}[:2].unbind(0)", "split": f"{name}.split([1, {v.shape[0] - 1}])"}[form]
        c.emit(f"{a}, {b} = {call}")
        first = v.shape[1:] if form == "unbind" else (v.shape[0] - v.shape[0] // 2,) + v.shape[1:] if form == "chunk" else (1,) + v.shape[1:]
        c.vars[a] = _Var(first, v.grad, False)
        c.vars[b] = _Var(None, v.grad, False)


def _st_join(c: _Cell) -> None:
    name = c.var(lambda v: v.shape is not None)
    if name is None:
        return _st_assign(c)
    v = c.vars[name]
    kind = c.pick(["stack", "cat", "sum-list", "comprehension"])
    if kind == "stack":
        c.assign(c.new_name(), f"torch.stack([{name}, {name} * 2])", (2,) + v.shape, v.grad)
    elif kind == "cat" and v.shape:
        c.assign(c.new_name(), f"torch.cat([{name}, {name}.sin()], dim=0)", (2 * v.shape[0],) + v.shape[1:], v.grad)
    elif kind == "sum-list" and v.shape:
        c.assign(c.new_name(), f"sum(row * 2 for row in {name})", v.shape[1:], v.grad)
    else:
        c.emit(f"vals = [float(e) for e in {name}.reshape(-1)]\nprint(len(vals))")


def _st_misc(c: _Cell) -> None:
    name = c.var()
    if name is None:
        return _st_assign(c)
    v = c.vars[name]
    form = c.pick([
        "print({0}.sum().item())", "print({0}.tolist())", "{0}.numpy()", "print({0}.data.sum())",
        "{1} = {0}.to('cpu')", "{1} = {0}.contiguous()", "{1} = {0}.double()", "{1} = {0}.float()",
        "{1} = torch.einsum('...,...->...', {0}, {0})", "{1} = torch.softmax({0}.reshape(-1), 0)",
        "{1} = torch.nn.functional.mse_loss({0}, torch.zeros_like({0}))", "{0} += 1", "del {0}",
        "{0}.requires_grad = True", "print({0}.grad_fn is None)",
    ])
    new = c.new_name() if "{1}" in form else None
    c.emit(form.format(name, new))
    if new:
        shape = (_numel(v.shape),) if "reshape" in form and v.shape is not None else v.shape
        if "mse_loss" in form:
            shape = ()
        c.vars[new] = _Var(shape, v.grad, False)
    if form.startswith("del"):
        c.vars.pop(name)
    if "requires_grad = True" in form:
        v.grad = True


def _st_grad_mode(c: _Cell) -> None:
    """inference_mode, enable_grad inside no_grad, set_grad_enabled as a context."""
    block = c.pick(["with torch.inference_mode():", "with torch.no_grad():\n    with torch.enable_grad():",
                    "with torch.set_grad_enabled(False):"])
    c.emit(block)
    depth = block.count("with")
    c.indent += "    " * depth
    c.no_grad = "enable_grad" not in block
    _st_assign(c)
    c.indent, c.no_grad = c.indent[: -4 * depth], False


def _st_optim(c: _Cell) -> None:
    """An optimizer step: foreach in-place updates of leaves under no_grad."""
    leaves = sorted(n for n, v in c.vars.items() if v.leaf and v.grad)
    root = _root(c)
    if not leaves or root is None:
        return _st_backward(c)
    opt = c.pick(["SGD({}, lr=0.1)", "SGD({}, lr=0.1, momentum=0.9)", "Adam({}, lr=0.01)"])
    params = "[" + ", ".join(leaves[:2]) + "]"
    c.emit(f"opt = torch.optim.{opt.format(params)}\nopt.zero_grad()")
    r = root if not c.vars[root].shape else f"{root}.sum()"
    c.emit(f"{r}.backward(retain_graph=True)\nopt.step()")
    if c.flag(0.5):
        c.emit(f"print({leaves[0]})")


_STATEMENTS = [
    (_st_assign, 8), (_st_inplace, 2), (_st_detach, 1), (_st_no_grad, 1), (_st_requires_grad, 1),
    (_st_backward, 2), (_st_grad, 1), (_st_loop, 1), (_st_function, 1), (_st_linear, 1), (_st_hook, 1),
    (_st_print, 2), (_st_tuple_outputs, 1), (_st_join, 1), (_st_misc, 2), (_st_grad_mode, 1), (_st_optim, 1),
]
_WEIGHTED = [f for f, w in _STATEMENTS for _ in range(w)]


@st.composite
def programs(draw, max_statements: int = 8) -> str:
    c = _Cell(draw)
    for _ in range(draw(st.integers(1, 2))):
        text, shape, grad = c.leaf_expr()
        c.assign(c.new_name(), text, shape, grad, leaf=True)
    for _ in range(draw(st.integers(1, max_statements))):
        draw(st.sampled_from(_WEIGHTED))(c)
    if c.vars and draw(st.booleans()):
        c.emit(c.pick(sorted(c.vars)))  # the displayed last expression
    return "\n".join(c.lines)


# ---- running a cell plain and traced ----
# IPython's own names, and Python's warning bookkeeping (C++ warn-once warnings
# make it appear in whichever run warned first).
_IPY_KEYS = re.compile(
    r"^(_+|_i+|_\d+|_i\d+|_ih|_oh|_dh|In|Out|get_ipython|exit|quit|open|__warningregistry__"
    r"|__builtins?__|__name__|__doc__|__package__|__loader__|__spec__)$"
)


@dataclass
class Outcome:
    stdout: str
    error: Optional[tuple]
    namespace: dict
    warnings: list

    @property
    def shown(self) -> str:
        """The output as the user reads it, line numbers aside.

        Under `%%autograd` the cell's lines count from 2 (line 1 is the magic),
        so gutter numbers and "line N" are dropped; the text must agree.
        """
        text = _ANSI.sub("", self.stdout)
        text = re.sub(r"Cell In\[\d+\], line \d+", "Cell", text)
        text = re.sub(r"(?m)^(-*>)?\s*\d+ ?", "", text)
        return "\n".join(_fold_call_impl([line for line in text.split("\n") if line.strip()]))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _fold_call_impl(lines: list) -> list:
    """Torch's `Module._call_impl` frame, without its body.

    With global module hooks registered (the tracer's), `_call_impl` takes its
    slow path, so that frame shows other lines of torch's own source and an
    extra frame for its `inner()` closure.
    """
    out, skipping = [], False
    for i, line in enumerate(lines):
        if line.startswith(("File ", "Cell ")):
            skipping = "Module._call_impl" in line
            if skipping:
                line = "File torch/nn/modules/module.py, in Module._call_impl"
                if out and out[-1] == line:  # the slow path's inner() closure
                    continue
        elif skipping and i < len(lines) - 1:
            continue
        out.append(line)
    return out


def fresh_shell():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    if "autograd" not in shell.magics_manager.magics["cell"]:
        shell.run_cell("%load_ext autograd_magic", store_history=False)
    return shell


def reset_namespace(shell, keep: dict) -> None:
    ns = shell.user_ns
    for key in list(ns):
        if key not in keep and not _IPY_KEYS.match(str(key)):
            del ns[key]
    ns.update(keep)


def run(shell, cell: str, traced: bool, seed: int = 0, keep: Optional[dict] = None,
        magic: str = "%%autograd --quiet") -> Outcome:
    import torch

    keep = keep if keep is not None else {"torch": torch}
    reset_namespace(shell, keep)
    torch.manual_seed(seed)
    random.seed(seed)
    text = magic + "\n" + cell if traced else cell
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        result = shell.run_cell(text, store_history=False, silent=False)
    err = result.error_in_exec or result.error_before_exec
    error = (type(err).__name__, _observe(lambda: str(err))) if err is not None else None
    names = {str(k): v for k, v in shell.user_ns.items() if not _IPY_KEYS.match(str(k)) and k not in keep}
    return Outcome(
        stdout=out.getvalue(),
        error=error,
        namespace=fingerprint_namespace(names),
        warnings=sorted((w.category.__name__, str(w.message)) for w in caught if not _once(str(w.message))),
    )


# C++ warnings torch gives once per process: whichever run comes first shows them.
_WARN_ONCE = ("Converting a tensor with requires_grad=True to a scalar",)


def _once(message: str) -> bool:
    return message.startswith(_WARN_ONCE)


def fingerprint_namespace(names: dict) -> dict:
    first_of: dict[int, str] = {}
    out = {}
    for key in sorted(names):
        value = names[key]
        first_of.setdefault(id(value), key)
        out[key] = (first_of[id(value)], _observe(lambda: fingerprint(value)))
    return out


def fingerprint(value: Any, depth: int = 0) -> Any:
    """Everything a user can observe about a value, as comparable plain data."""
    import torch

    if isinstance(value, torch.Tensor):
        return _tensor_fingerprint(value, depth)
    if isinstance(value, torch.nn.Module):
        return ("module", repr(value), [(n, _tensor_fingerprint(p, depth)) for n, p in value.named_parameters()])
    if isinstance(value, (tuple, list)) and depth < 3:
        return (type(value).__name__, [fingerprint(v, depth + 1) for v in value])
    if isinstance(value, (int, float, str, bool, type(None))):
        return (type(value).__name__, repr(value))
    return (type(value).__name__,)


def _tensor_fingerprint(t, depth: int) -> tuple:
    def grad():
        if not (t.is_leaf or t.retains_grad):
            return None
        g = t.grad
        return _tensor_fingerprint(g, depth + 1) if g is not None and depth < 2 else g is not None

    return tuple(
        _observe(read)
        for read in (
            lambda: type(t).__name__,
            lambda: str(t.dtype),
            lambda: tuple(t.shape),
            lambda: t.requires_grad,
            lambda: t.is_leaf,
            lambda: type(t.grad_fn).__name__ if t.grad_fn is not None else None,
            lambda: t._version,
            lambda: t.retains_grad,
            lambda: _bits(t.detach()),
            grad,
            lambda: len(t._backward_hooks or {}),  # None before any hook, {} after one was removed: same to users
        )
    )


def _observe(read) -> Any:
    """What reading one property shows: its value, or the error it raises."""
    try:
        return read()
    except Exception as exc:
        return ("raises", type(exc).__name__, str(exc))


def _bits(t) -> tuple:
    """Exact values, NaN- and signed-zero-aware: the raw bytes."""
    import torch

    t = t.contiguous().reshape(-1)
    if t.dtype.is_floating_point:
        t = t.view(torch.int32 if t.element_size() == 4 else torch.int64)
    return tuple(t.tolist())

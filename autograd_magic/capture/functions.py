"""A custom `torch.autograd.Function`'s outputs: recorded as made by its `apply()`.

`C.apply(x)` never goes through `__torch_function__`: the mode sees only the ops of
`C.forward`, which autograd runs under no_grad, and the tensor forward returns becomes
apply's output once autograd has set its grad_fn (`CBackward`) on it. Its record would then
say "leaf, made under no_grad" of a tensor that requires grad. So while a tracer runs,
`Function.apply` is wrapped: after the call, its outputs get a record of their own, an op
`C.apply` on the line that called it, read from the tensors' inputs (as any op's). The same
covers `torch.utils.checkpoint(use_reentrant=True)` (its `CheckpointFunction`).

The wrapper is installed while any tracer runs and put back after the last one, as the
lifted `zero_grad()`s are (`steps.py`); a subclass's own `apply` (rare) runs as it is.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Callable

import torch

from . import torch_compat as compat

_FUNCTION = torch.autograd.Function
#: torch's own `Function.apply` (a classmethod), as at import
_ORIGINAL = _FUNCTION.__dict__["apply"]
#: id(mode) -> mode of the running tracers
_tracing: dict[int, object] = {}
_lock = threading.RLock()  # tracers start and stop in any thread; a finalizer may stop one inside
_installed: list[object] = []  # our classmethod, while it is in place


class _ApplyOp:
    """What `on_op` records as the op: named `C.apply`, as `ops.op_name` reads it."""

    __slots__ = ("__name__",)

    def __init__(self, cls: type):
        self.__name__ = f"{cls.__name__}.apply"


_OPS: dict[type, _ApplyOp] = {}  # one per Function class (a record holds its op's name only)


def running_top(registry: dict):
    """The mode on top of torch's stack when `registry` (id -> mode) holds it and its tracer is
    running and not busy with its own work, else None."""
    n = compat.mode_stack_len()
    if n == 0:
        return None
    top = compat.mode_at(n - 1)
    if registry.get(id(top)) is not top or top.stale:
        return None
    tracer = top.tracer
    return None if tracer is None or tracer.busy else top


def _tracer_on_top():
    top = running_top(_tracing)
    return top.tracer if top is not None else None


def _apply(cls, *args, **kwargs):
    out = _ORIGINAL.__func__(cls, *args, **kwargs)
    tracer = _tracer_on_top()
    if tracer is None:
        return out
    op = _OPS.get(cls)
    if op is None:
        op = _OPS[cls] = _ApplyOp(cls)
    try:
        with compat.no_torch_function():  # our mode is on the stack here: our reads are not the user's ops
            outs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)] \
                if isinstance(out, (tuple, list)) else []
            before = [(t, tracer.record_of(t)) for t in outs]  # forward's own return: the same tensor
            result = tracer.on_op(op, op.__name__, args, kwargs, out)
            tracer.superseded([(t, rid) for t, rid in before if rid is not None])
            return result
    except Exception as exc:  # the tracer must never break the user's code
        tracer.op_failed(op, exc)
        return out


_WRAPPER: Callable = classmethod(_apply)


# ---- the fused inference paths of nn.MultiheadAttention and the Transformer layers ----
#: torch's own, as at import. Those modules call it as `torch.overrides.has_torch_function(...)`:
#: any mode on the stack turns their fused path off, so a traced cell would compute an eval-mode
#: Transformer another way (a padded position's values where the plain run has zeros).
_OVERRIDES = torch.overrides
_HAS_TORCH_FUNCTION = _OVERRIDES.__dict__["has_torch_function"]


#: the modules whose fast-path check asks it (torch/nn/modules/transformer.py and activation.py)
_FAST_PATHS = tuple(os.path.join("nn", "modules", f"{name}.py") for name in ("transformer", "activation"))


def _has_torch_function(args) -> bool:
    """torch's `has_torch_function`; for the fast-path checks of the Transformer layers and of
    MultiheadAttention, a running tracer's mode alone is not counted: the fused op
    (`torch._transformer_encoder_layer_fwd`, `torch._native_multi_head_attention`) goes through
    that mode as one op, recorded as any op. A user's mode or a tensor subclass still counts, and
    torch's other callers (`torch._assert`, higher-order ops) get torch's own answer."""
    if not _HAS_TORCH_FUNCTION(args):
        return False
    if compat.mode_stack_len() != 1 or running_top(_tracing) is None:
        return True
    if not sys._getframe(1).f_code.co_filename.endswith(_FAST_PATHS):
        return True
    mode = compat.pop_mode()
    try:
        return _HAS_TORCH_FUNCTION(args)
    finally:
        compat.push_mode(mode)


def install(mode) -> None:
    with _lock:
        _tracing[id(mode)] = mode
        if _installed or _FUNCTION.__dict__.get("apply") is not _ORIGINAL:
            return  # in place already, or replaced by someone: theirs runs as it is
        _installed.append(_WRAPPER)
        _FUNCTION.apply = _WRAPPER
        if _OVERRIDES.__dict__.get("has_torch_function") is _HAS_TORCH_FUNCTION:
            _OVERRIDES.has_torch_function = _has_torch_function


def uninstall(mode) -> None:
    with _lock:
        if _tracing.get(id(mode)) is mode:
            del _tracing[id(mode)]
        if _tracing or not _installed:
            return
        if _FUNCTION.__dict__.get("apply") is _WRAPPER:
            _FUNCTION.apply = _ORIGINAL  # one the user's code put there since stays
        if _OVERRIDES.__dict__.get("has_torch_function") is _has_torch_function:
            _OVERRIDES.has_torch_function = _HAS_TORCH_FUNCTION
        _installed.clear()

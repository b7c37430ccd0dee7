"""Every private torch call the package makes, in one place.

torch's public API has no way to read the torch-function mode stack, to set
grad mode without a context manager (an interrupt inside `no_grad().__enter__`
leaves it disabled), to match an autograd node across hooks, or to put back a
tensor's version counter. These wrappers are the only code that touches those
internals, so a torch upgrade that moves one is fixed here. Each says what it
falls back to when the internal is missing.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

# ---- the torch-function mode stack -------------------------------------------------------
mode_stack_len = torch._C._len_torch_function_stack
mode_at = torch._C._get_function_stack_at
pop_mode = torch._C._pop_torch_function_stack
push_mode = torch._C._push_on_torch_function_stack
#: a context manager: torch functions called inside it skip every mode (our own reads)
no_torch_function = torch._C.DisableTorchFunction


# ---- grad mode, set directly ---------------------------------------------------------------
def set_grad_enabled(enabled: bool) -> None:
    """Grad mode on or off now, with no context manager whose `__exit__` an interrupt could skip."""
    torch._C._set_grad_enabled(enabled)


# ---- tensors and autograd nodes -----------------------------------------------------------
def version_of(t: torch.Tensor) -> Optional[int]:
    """A tensor's version counter (bumped by every in-place change), None for inference tensors."""
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def versions_of(tensors) -> list:
    """`version_of` of each tensor, in one try (the loop's hot path)."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:
        return [version_of(t) for t in tensors]


def foreach_norms(tensors: list) -> Optional[list[float]]:
    """The 2-norm of each tensor (same device and dtype), in one call: torch's `_foreach_norm`,
    in the tensors' own dtype (so an overflow reads inf). None where torch has no such call."""
    fn = getattr(torch, "_foreach_norm", None)
    if fn is None:
        return None
    return torch.stack(fn(tensors)).tolist()


def set_version(t: torch.Tensor, version: int) -> None:
    """Give `t` back a version counter value (graphs saved it at that version). No-op if torch can't."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None:
        return
    try:
        setter((t,), (version,))
    except TypeError:  # older torch takes one tensor
        setter(t, version)


def node_key(node: Any) -> tuple[int, str]:
    """An autograd node's identity that survives its Python wrapper: (sequence number, type)."""
    return (node._sequence_nr(), type(node).__name__)


# ---- torch.compile's stance --------------------------------------------------------------
def compile_stance() -> Any:
    """The torch.compile stance in force (None where torch has no stances)."""
    try:
        torch.compiler.set_stance  # torch < 2.6 has no stances
        from torch._dynamo import eval_frame

        return eval_frame._stance
    except Exception:
        return None


def force_eager() -> None:
    """Compiled code runs eagerly from now on (so the mode sees its ops)."""
    try:
        torch.compiler.set_stance("force_eager")  # applies now
    except Exception:
        pass


#: the tracers running with compiled code forced eager (ids), and the stance in force before the first:
#: the stance is the process's, tracers in several threads start and stop in any order (A, B, A's stop,
#: B's stop), so the last to stop puts back what the first found, never what another tracer set
_eager_holders: set = set()
_eager_prior: Any = None
_eager_lock = threading.Lock()


def hold_eager(holder: object) -> None:
    """Compiled code runs eagerly until `holder` and every other holder have released it. Where torch
    has no stances, nothing changes. Holding twice is holding once."""
    global _eager_prior
    prior = compile_stance()
    if prior is None:
        return
    with _eager_lock:
        if id(holder) in _eager_holders:
            return
        if not _eager_holders:
            _eager_prior = prior
        _eager_holders.add(id(holder))  # first: an interrupt in the next call is undone by the release
        force_eager()


def release_eager(holder: object) -> None:
    """`holder` no longer needs compiled code eager; the last holder puts back the stance the first
    found. Safe to call again, or for a holder that never held it."""
    global _eager_prior
    with _eager_lock:
        if id(holder) not in _eager_holders:
            return
        if len(_eager_holders) == 1:
            restore_stance(_eager_prior)  # before the holder leaves: an interrupted release can run again
            _eager_prior = None
        _eager_holders.discard(id(holder))


def restore_stance(prior: Any) -> None:
    """Put back a stance read by `compile_stance`; safe to call again if interrupted."""
    try:
        from torch._dynamo import eval_frame

        eval_frame._set_stance(prior)
    except Exception:
        pass

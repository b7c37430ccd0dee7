"""What the tracer needs to know of a torch call and its tensors.

Names of Python operator methods as torch's ops, calls that make no new
tensor, and defensive reads of `grad_fn` / `is_leaf` (torch raises on some).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from ..data.trace import DATA_SET, GRAD_SET, REQUIRES_GRAD_SET

_OP_NAMES = {
    "__add__": "add", "__radd__": "add", "__iadd__": "add_",
    "__sub__": "sub", "__rsub__": "rsub", "__isub__": "sub_",
    "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul_",
    "__truediv__": "div", "__rtruediv__": "rdiv", "__itruediv__": "div_",
    "__floordiv__": "floor_divide", "__rfloordiv__": "floor_divide", "__mod__": "remainder",
    "__pow__": "pow", "__rpow__": "pow", "__ipow__": "pow_",
    "__matmul__": "matmul", "__rmatmul__": "matmul", "__neg__": "neg", "__abs__": "abs",
    "__getitem__": "getitem", "__setitem__": "setitem",
    "__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor", "__invert__": "bitwise_not",
    "__lt__": "lt", "__le__": "le", "__gt__": "gt", "__ge__": "ge", "__eq__": "eq", "__ne__": "ne",
}
NOT_OPS = {"__set__", "__repr__", "__format__", "__str__", "__len__", "__bool__", "__index__",
            "__int__", "__float__", "__hash__", "__reduce_ex__", "__deepcopy__", "register_hook",
            "retain_grad", "__contains__", "__array__", "tolist", "item", "numpy", "data_ptr", "__dir__"}


def op_name(func: Callable) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a property such as .T or .real
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "attribute")
    if name == "__set__":
        owner = getattr(getattr(func, "__self__", None), "__name__", None)
        if owner == "data":
            return DATA_SET
        if owner == "requires_grad":
            return REQUIRES_GRAD_SET
        if owner == "grad":
            return GRAD_SET
    return _OP_NAMES.get(name, name)


def is_inplace(func_name: str, op: str) -> bool:
    return func_name == "__setitem__" or (func_name.startswith("__i") and func_name.endswith("__")) or (
        op.endswith("_") and not op.endswith("__")
    )


def writes_out(kwargs: Optional[dict]) -> bool:
    """The call writes its result into tensors it was given (`torch.add(a, b, out=c)`): an in-place
    change of `c`, which torch's version counter sees, though no `_` names it."""
    return bool(kwargs) and kwargs.get("out") is not None


def grad_fn_name(t: torch.Tensor) -> Optional[str]:
    # Reading grad_fn itself can raise (a no_grad view whose base changed in
    # place); the user's own code raises it when it reads it, not ours.
    try:
        fn = t.grad_fn
    except RuntimeError:
        return None
    return type(fn).__name__ if fn is not None else None


def is_leaf(t: torch.Tensor) -> bool:
    try:
        return t.is_leaf
    except RuntimeError:  # same case as above: torch cannot tell
        return False


def tensors_in(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 2 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item, depth + 1)

"""Running a test's cell as a user would: under `%%autograd -o t --quiet`, or plainly."""

from __future__ import annotations

import torch
from IPython.utils.capture import capture_output


def traced(shell, cell: str):
    """`cell` through the magic in `shell` (torch imported there first): the Trace it made."""
    shell.run_cell("import torch")
    with capture_output(display=True):
        result = shell.run_cell("%%autograd -o t --quiet\n" + cell)
    assert result.success, result.error_in_exec
    return shell.user_ns["t"]


def plain(cell: str) -> dict:
    """`cell` run by plain Python with torch: its namespace afterwards."""
    ns: dict = {"torch": torch}
    exec(cell, ns)
    return ns


def backward_order(root: torch.Tensor) -> list:
    """Plain torch: `root.backward()` with a post-hook on every node of its graph; each node as the
    engine ran it, in that order: [(node, grads it sent, grads it received)]."""
    seen, stack, order = set(), [root.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_hook(lambda sent, received, node=node: order.append((node, sent, received)))
        stack.extend(n for n, _ in node.next_functions)
    root.backward()
    return order

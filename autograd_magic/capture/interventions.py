"""What a variant may change in a run, as the recorder sees it.

The real run passes no intervention: then the recorder only reads. A variant
(`variants/interventions.py`) passes objects of this shape, and the recorder
consults them at three points: an op's output (replace it, e.g. cast or nudge
it, or flip its requires_grad), whether a tensor is cut from the graph (by
the name it is bound to or by the source span that made it), and whether
backward() must keep its graph (a re-run shares graphs with the real run and
must never free them); and what a backward call differentiates (the
explorer's batched run differentiates a batched root's sum).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..data.trace import Record


class Intervention:
    """One change to a run. Every method's default changes nothing."""

    #: run the code with grad mode off (`torch.no_grad()` around the whole run)
    disables_grad: bool = False
    #: backward() keeps every graph (`retain_graph=True`)
    keeps_graphs: bool = False

    def cuts_expression(self, span: Optional[tuple], expr_key: str) -> bool:
        """Detach the output of the op at `span` whose source text, without spaces, is `expr_key`."""
        return False

    def cuts_name(self, name: str) -> bool:
        """Detach the tensor the cell binds to `name`."""
        return False

    def replace_output(self, record: Record, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """A tensor to use instead of the op's output (its record is `record`), or None to keep it."""
        return None

    def backward_roots(self, roots: tuple, gradient) -> Optional[tuple]:
        """Tensors to differentiate instead of `roots`, with no gradient argument, or None to keep the
        call as it is. The explorer's batched run differentiates the sum of a batched root: every
        point's own backward at once (an explicit gradient of ones would do the same, but makes torch
        import its symbolic-shapes machinery, about a second, on first use)."""
        return None

    def sees_backward(self, roots: tuple, gradient) -> None:
        """Told of each backward()/autograd.grad() call: its roots and the gradient it was given."""
        return None

    @property
    def cuts(self) -> bool:
        """Whether this intervention detaches anything (the recorder asks only then)."""
        return type(self).cuts_expression is not Intervention.cuts_expression or type(self).cuts_name is not Intervention.cuts_name

    @property
    def replaces(self) -> bool:
        return type(self).replace_output is not Intervention.replace_output

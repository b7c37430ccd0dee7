"""Backward passes: which nodes the engine ran, in order, and what flowed.

The tracer routes `Tensor.backward`, `torch.autograd.backward` and
`torch.autograd.grad` here. Before the call, every node reachable from the
roots gets a pre-hook (the gradient it receives) and a hook (the gradients
it sends on); tensor hooks on recorded tensors tell which records a node
produced, because the engine runs a node's tensor hooks just before its
pre-hooks. All node hooks are removed when the call returns or raises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from ._preview import PreviewCache, preview, quietly
from ._records import BackwardPass, BackwardStep

if TYPE_CHECKING:
    from ._tracer import Tracer

MAX_NODES = 2000  # beyond this a pass keeps its result but not its steps


def node_name(node) -> str:
    return node.name().split("::")[-1]


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


class BackwardRecorder:
    def __init__(self, tracer: "Tracer"):
        self.tracer = tracer
        self.current: Optional[BackwardPass] = None
        self.pending: list[int] = []  # records whose tensor hooks fired for the next node
        self._site_counts: dict = {}
        self.previews = PreviewCache()  # replaced per pass: no user code runs between its hooks
        self.skipping = False  # inside a loop's later, unrecorded pass

    # ---- tensor hooks: the gradient each recorded tensor received ----
    def tensor_hook(self, rid: int):
        def hook(grad):
            tracer = self.tracer
            busy, tracer.busy = tracer.busy, True
            try:
                if self.skipping and self.current is None:
                    return  # an unrecorded pass must not pose as a pass of its own
                if self.current is not None:
                    p, shown = self.current, self.previews(grad)
                else:  # a pass we did not see start: no cache spans it
                    p, shown = self._implicit_pass(), preview(grad)
                tracer.trace.records[rid].grads[p.index] = shown
                self.pending.append(rid)
            finally:
                tracer.busy = busy

        return hook

    def _implicit_pass(self) -> BackwardPass:
        # A backward the tracer did not see start (e.g. from C++ code).
        passes = self.tracer.trace.passes
        if not passes or passes[-1].kind != "implicit":
            passes.append(BackwardPass(index=len(passes), kind="implicit"))
        return passes[-1]

    # ---- the call itself ----
    def run(self, func, args, kwargs):
        tracer = self.tracer
        span, _ = tracer.site(getattr(func, "__name__", ""))
        count = self._site_counts.get(span, 0)
        self._site_counts[span] = count + 1
        if count >= tracer.detail_limit and span is not None:
            # a loop's later passes: run, not kept (their grads still add into leaves' .grad)
            if count == tracer.detail_limit:
                tracer.note(f"backward on line {span[0]} ran more than {tracer.detail_limit} times: later passes were not recorded")
            skipping, self.skipping = self.skipping, True
            try:
                return func(*args, **kwargs)
            finally:
                self.skipping = skipping
        kind = "grad" if func is torch.autograd.grad else "backward"
        roots, inputs, gradient, retain = self._arguments(func, args, kwargs)
        p = BackwardPass(
            index=len(tracer.trace.passes),
            kind=kind,
            line=span[0] if span else None,
            expr=tracer.source_map.text(span),
            gradient_given=gradient is not None,
            retain_graph=bool(retain),
        )
        tracer.trace.passes.append(p)
        p.roots = [tracer.record_for(t) for t in roots]
        p.inputs = [tracer.record_for(t) for t in inputs]
        if tracer.force_retain_graph and func is not torch.autograd.grad:
            kwargs = {**kwargs, "retain_graph": True}  # sandbox: never free a graph the real run still owns
            if func is torch.Tensor.backward and len(args) > 2:
                args = args[:2]
        handles, nodes = self._hook_nodes(p, roots)
        self._hook_named_tensors(nodes)
        outer, self.current, self.pending = self.current, p, []
        outer_previews, self.previews = self.previews, PreviewCache()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            p.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self.current = outer
            for h in handles:
                h.remove()
            # Dropped with the pass: after it, the user's code may change a gradient
            # in ways no version counter sees (`x.grad.data.zero_()`, a numpy view).
            pass_previews, self.previews = self.previews, outer_previews
        if kind == "grad":
            p.results = pass_previews.many(result)
        return result

    @staticmethod
    def _arguments(func, args, kwargs):
        def arg(i, name, default=None):
            if len(args) > i:
                return args[i]
            return kwargs.get(name, default)

        if func is torch.Tensor.backward:
            roots = _as_tuple(arg(0, "self"))
            return roots, (), arg(1, "gradient"), arg(2, "retain_graph")
        if func is torch.autograd.grad:
            return _as_tuple(arg(0, "outputs")), _as_tuple(arg(1, "inputs")), arg(2, "grad_outputs"), arg(3, "retain_graph")
        return _as_tuple(arg(0, "tensors")), _as_tuple(kwargs.get("inputs")), arg(1, "grad_tensors"), arg(2, "retain_graph")

    @quietly
    def _hook_nodes(self, p: BackwardPass, roots) -> list:
        nodes: list = []
        index: dict[int, int] = {}
        stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        for t in roots:
            if isinstance(t, torch.Tensor) and t.grad_fn is None and t.requires_grad:
                self.tracer.note("backward from a leaf: its AccumulateGrad is the whole graph")
        while stack and len(nodes) < MAX_NODES:
            node = stack.pop()
            if node is None or id(node) in index:
                continue
            index[id(node)] = len(nodes)
            nodes.append(node)
            for nxt, _ in node.next_functions:
                if nxt is not None and id(nxt) not in index:
                    stack.append(nxt)
        if len(nodes) >= MAX_NODES:
            self.tracer.note(f"a backward pass had over {MAX_NODES} nodes: its steps were not recorded")
            return [], nodes
        p.nodes = [node_name(node) for node in nodes]
        for nid, node in enumerate(nodes):
            for nxt, _ in node.next_functions:
                if nxt is not None and id(nxt) in index:
                    p.edges.append((nid, index[id(nxt)]))
        handles = []
        for nid, node in enumerate(nodes):
            nexts = [index.get(id(n)) if n is not None else None for n, _ in node.next_functions]
            try:
                handles.append(node.register_prehook(self._pre(p, nid, node, nexts)))
                handles.append(node.register_hook(self._post(p, nid)))
            except Exception:
                continue
        return handles, nodes

    @quietly
    def _hook_named_tensors(self, nodes: list) -> None:
        """Record the user's named tensors this pass reaches (a backward-only cell still shows x.grad)."""
        in_graph = {id(n) for n in nodes}
        leaves = {id(getattr(n, "variable", None)) for n in nodes if hasattr(n, "variable")}
        for name, t in self.tracer.names.requires_grad_tensors():
            try:
                reached = id(t) in leaves or (t.grad_fn is not None and id(t.grad_fn) in in_graph)
            except RuntimeError:  # e.g. a no_grad view whose base changed in place: reading grad_fn raises
                continue
            if reached:
                self.tracer.record_for(t, name=name)

    def _pre(self, p: BackwardPass, nid: int, node, nexts):
        name = node_name(node)
        variable = getattr(node, "variable", None) if name == "AccumulateGrad" else None

        def pre(grad_outputs):
            records, self.pending = self.pending, []
            if variable is not None:
                rid = self.tracer.record_of(variable)
                if rid is not None and rid not in records:
                    records.append(rid)
            p.steps.append(
                BackwardStep(
                    index=len(p.steps),
                    node=name,
                    node_id=nid,
                    records=records,
                    grad_in=self.previews.many(grad_outputs),
                    next_ids=nexts,
                )
            )

        return pre

    def _post(self, p: BackwardPass, nid: int):
        def post(grad_inputs, grad_outputs):
            for step in reversed(p.steps):
                if step.node_id == nid:
                    step.grad_out = self.previews.many(grad_inputs)
                    break

        return post

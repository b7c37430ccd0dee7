"""Backward passes: which nodes the engine ran, in order, and what flowed.

The tracer routes `Tensor.backward`, `torch.autograd.backward` and
`torch.autograd.grad` here. Before the call, every node reachable from the
roots gets a pre-hook (the gradient it receives) and a hook (the gradients
it sends on). Records are matched to the node that made them as they are
recorded (`note_record`), so a node's pre-hook hands each record its
gradient: no hook on any tensor, which cost a registration per record and a
Python call per record per pass. A gradient sent along an edge nothing else
feeds is read once, by its receiver. All node hooks are removed when the
call returns or raises.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Optional, Protocol

import torch

from .finite import DeferredScalars, LeafNorms, loss_value
from .preview import PreviewCache, quietly
from .torch_compat import no_torch_function, node_key, version_of
from ..data.debug import IterationScalars
from ..data.trace import BackwardPass, BackwardStep, Trace
from .. import limits


class Tracer(Protocol):
    """What the recorder needs of the tracer that owns it (`capture/tracer.py`)."""

    trace: Trace
    calls: int
    backward_calls: int
    detail_limit: int
    keeps_graphs: bool
    earlier: Any
    names: Any
    source_map: Any

    def note(self, text: str) -> None: ...
    def before_backward(self, roots, loss: Optional[float] = None) -> None: ...
    def site(self, func_name: str) -> tuple: ...
    def record_of(self, t: torch.Tensor) -> Optional[int]: ...
    def record_for(self, t: torch.Tensor, name: Optional[str] = None, from_earlier: bool = False) -> int: ...
    def bring_in_node(self, key: tuple) -> None: ...

MAX_NODES = limits.PASS_NODES
MAX_WALK = limits.PASS_WALK


_NODE_NAMES: dict[type, str] = {}  # node type -> its name, where the name is the type's own (read per node per pass)


def node_name(node) -> str:
    kind = type(node)
    name = _NODE_NAMES.get(kind)
    if name is None:
        name = node.name().rpartition("::")[2]
        # a type shared by nodes of several names (none of torch's today) is asked each time
        if name == kind.__name__ and len(_NODE_NAMES) < 4096:
            _NODE_NAMES[kind] = name
    return name


# a custom autograd.Function's node: its ctx may hold any attribute, `variable` too
_PY_NODE = torch.autograd.function.BackwardCFunction


# Backward nodes whose gradients out are views of (or are) the gradient they received: their
# post-hook previews those while the received one is alive, so the statistics are copied, not recomputed.
_VIEW_GRADS = ("View", "Transpose", "Permute", "TBackward", "Expand", "Squeeze", "Alias", "Reshape",
               "Select", "Slice", "Split", "Unbind", "Diagonal", "AsStrided", "Unfold", "Narrow")


_SENDS_VIEWS: dict[str, bool] = {}  # node name -> whether it sends views (read per node per pass)


def _sends_views(name: str) -> bool:
    hit = _SENDS_VIEWS.get(name)
    if hit is None:
        hit = any(part in name for part in _VIEW_GRADS)
        if len(_SENDS_VIEWS) < 4096:
            _SENDS_VIEWS[name] = hit
    return hit


def _key_or_none(node) -> Optional[tuple]:
    try:
        return node_key(node)
    except Exception:
        return None


def _as_tuple(x: Any) -> tuple:
    if x is None:
        return ()
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(x)


def _plan_py(start: list, max_walk: int, all_run: bool) -> tuple:
    """What a pass hooks, from a depth-first walk of the graph from `start` (the roots' nodes):
    (nodes, names, variables, keys, edges_of, all_edges, handoffs, posts, fed).

    - `names`, `variables`, `keys`: each node's name, leaf (AccumulateGrad's, a custom
      Function's `variable` if it has one, else None) and key (`node_key`, None if unreadable).
    - `edges_of`: per node, (index of the node it sends to, or None, input slot) per edge;
      `all_edges`: (sender, receiver) for every edge between walked nodes.
    - `handoffs`: per node and edge, whether that edge is the only one into its slot.
    - `posts`: whether the node gets a post-hook. With `all_run` (a plain backward: every
      node reached runs), a node whose every edge is a hand-off needs none: what it sends is
      exactly what each receiver gets. AccumulateGrad sends nothing (whether its leaf's
      `.grad` is what it received is read once the pass is over, from what its pre-hook saw).
      An edge to nothing carries no gradient (a first layer's input, when it needs none): a
      built-in node sends nothing along it, so it asks for no post-hook either; a custom
      Function's backward may still return one there, which its post-hook shows. Nodes that
      send views of what they received keep theirs (their statistics are copied while it lives).
    - `fed`: receiver -> [(its slot, sender without a post-hook, sender's edge)].

    capture/_graph.c's `plan` gives the same answer, compiled; each read here is once per node
    (an unrolled RNN's pass has hundreds)."""
    nodes: list = []
    nexts_of: list = []  # per node: its next_functions, read once (each read builds tuples)
    index: dict[int, int] = {}
    stack = list(start)
    while stack and len(nodes) < max_walk:
        node = stack.pop()
        if node is None or id(node) in index:
            continue
        index[id(node)] = len(nodes)
        nodes.append(node)
        nf = node.next_functions
        nexts_of.append(nf)
        for nxt, _ in nf:
            if nxt is not None and id(nxt) not in index:
                stack.append(nxt)
    names = [node_name(node) for node in nodes]
    variables = [getattr(node, "variable", None) if name == "AccumulateGrad" or isinstance(node, _PY_NODE) else None
                 for node, name in zip(nodes, names)]
    keys = [_key_or_none(node) for node in nodes]
    fan_in: dict[tuple, int] = {}  # (node id, input slot) -> edges into it
    edges_of = []
    all_edges = []
    get = index.get
    for nid, nf in enumerate(nexts_of):
        edges = []
        for nxt, slot in nf:
            target = get(id(nxt)) if nxt is not None else None
            edges.append((target, slot))
            if target is not None:
                all_edges.append((nid, target))
                fan_in[(target, slot)] = fan_in.get((target, slot), 0) + 1
        edges_of.append(edges)
    handoffs = [[t is not None and fan_in[(t, slot)] == 1 for t, slot in edges] for edges in edges_of]
    posts = [names[nid] != "AccumulateGrad" and not (
                 all_run and variables[nid] is None and edges_of[nid]
                 and all(h or (nxt is None and not isinstance(nodes[nid], _PY_NODE))
                         for h, (nxt, _) in zip(handoffs[nid], nexts_of[nid]))
                 and not _sends_views(names[nid])) for nid in range(len(nodes))]
    fed: dict[int, list] = {}
    for nid, edges in enumerate(edges_of):
        if not posts[nid]:
            for i, (target, slot) in enumerate(edges):
                if target is not None:
                    fed.setdefault(target, []).append((slot, nid, i))
    return nodes, names, variables, keys, edges_of, all_edges, handoffs, posts, fed


try:  # the same plan, compiled (capture/_graph.c); optional
    from . import _graph

    def _plan_c(start: list, max_walk: int, all_run: bool) -> tuple:
        return _graph.plan(start, max_walk, all_run, _NODE_NAMES, node_name, _sends_views, _PY_NODE)

    _plan = _plan_c
except ImportError:
    _plan_c = None
    _plan = _plan_py


class BackwardRecorder:
    def __init__(self, tracer: Tracer):
        self.tracer = tracer
        self._site_counts: dict = {}
        self.previews = PreviewCache()  # replaced per pass: no user code runs between its hooks
        # Which records each autograd node produces, filled as records are made:
        # (node's sequence number, node type) -> [(output_nr, record id)], and
        # id(leaf) -> (leaf ref, [record ids]) for leaves (their AccumulateGrad).
        # A node's pre-hook then sees each record's gradient: no per-tensor hooks.
        self.node_records: dict[tuple, list[tuple[int, int]]] = {}
        self.leaf_records: dict[int, tuple] = {}
        # leaves' new `.grad`s of the last pass: id(leaf) -> (data_ptr, version, preview)
        self._new_grads: dict[int, tuple] = {}
        # this pass's AccumulateGrad pre-hooks: (leaf, received grad's data_ptr, shape, version, preview)
        self._accumulated: list[tuple] = []
        # id(leaf) -> (leaf, its .grad, that grad's version), weakly, as the last recorded pass left them
        self._grad_after: dict[int, tuple] = {}
        self._pass_leaves: list = []  # the leaves the running pass accumulates into
        self._last_calls = -1  # tracer.calls when the last pass ended
        self._held: dict[tuple, tuple] = {}  # (receiver node id, slot) -> (gradient sent, sender's step, index)
        self.deferred = DeferredScalars()  # device scalars of passes past the limit, read once at the end
        self.last_span: Optional[tuple] = None
        # id -> (weak ref, site) of what autograd.grad calls returned: first seen later (bound to a
        # name, used by an op), each is shown as made on its call's line, not as from outside the cell
        self.grad_results: dict[int, tuple] = {}

    # ---- the call itself ----
    def run(self, func, args, kwargs):
        tracer = self.tracer
        tracer.backward_calls += 1
        span, _ = tracer.site(getattr(func, "__name__", ""))
        roots, inputs, gradient, retain = self._arguments(func, args, kwargs)
        count = self._site_counts.get(span, 0)
        self._site_counts[span] = count + 1
        self.last_span = span  # the latest backward call's: what made the gradients a lifted step reads
        if count >= tracer.detail_limit and span is not None:
            # a loop's later passes: run, not kept (their grads still add into leaves' .grad)
            if count == tracer.detail_limit:
                tracer.note(f"backward on line {span[0]} ran more than {tracer.detail_limit} times: later passes were not recorded")
            entry = self._iteration(span, None)
            if entry is None:
                tracer.before_backward(roots)
                return func(*args, **kwargs)
            return self._run_unrecorded(func, args, kwargs, roots, entry)
        tracer.before_backward(roots)
        kind = "grad" if func is torch.autograd.grad else "backward"
        p = BackwardPass(
            index=len(tracer.trace.passes),
            kind=kind,
            line=span[0] if span else None,
            expr=tracer.source_map.text(span),
            gradient_given=gradient is not None,
            retain_graph=bool(retain),
        )
        tracer.trace.passes.append(p)
        self._iteration(span, p.index)  # its scalars are read off the pass's data when the run ends
        if tracer.keeps_graphs and func is not torch.autograd.grad:
            kwargs = {**kwargs, "retain_graph": True}  # sandbox: never free a graph the real run still owns
            if func is torch.Tensor.backward and len(args) > 2:
                args = args[:2]
        for iv in tracer.interventions:
            iv.sees_backward(roots, gradient)
            swap = iv.backward_roots(roots, gradient)
            if swap is not None:  # a variant's own roots (the explorer's batched run); the pass still says what the cell gave
                args, kwargs = _with_roots(func, args, kwargs, tuple(swap))
        # This pass's own cache and hand-offs, made before the hooks that use them.
        outer_previews, self.previews = self.previews, PreviewCache()
        outer_held, self._held = self._held, {}
        self._new_grads = {}
        outer_accumulated, self._accumulated = self._accumulated, []
        outer_leaves, self._pass_leaves = self._pass_leaves, []  # a user's hook may run a pass of its own
        handles: list = []
        try:
            try:
                p.roots = [tracer.record_for(t, from_earlier=True) for t in roots]
                p.inputs = [tracer.record_for(t, from_earlier=True) for t in inputs]
                self._hook_nodes(p, roots, handles)  # fills `handles` as it goes: a Ctrl-C leaves none behind
            except Exception as exc:  # our bookkeeping failed: the user's backward runs untraced, never fails for it
                for h in handles:
                    h.remove()
                handles.clear()
                tracer.note(f"a backward pass was not recorded: {type(exc).__name__}: {exc}")
            result = func(*args, **kwargs)
        except BaseException as exc:
            p.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                for h in handles:
                    h.remove()
                self._note_grads_after()
                self._pass_leaves = outer_leaves
                try:
                    self._flush_held()
                except Exception as exc:
                    tracer.note(f"part of a backward pass was not recorded: {type(exc).__name__}: {exc}")
                self._note_new_grads()
            finally:
                self._accumulated = outer_accumulated
                # Dropped with the pass: after it, the user's code may change a gradient
                # in ways no version counter sees (`x.grad.data.zero_()`, a numpy view).
                pass_previews, self.previews = self.previews, outer_previews
                self._held = outer_held
                self._last_calls = tracer.calls
        if kind == "grad":
            try:
                for g in result:
                    if isinstance(g, torch.Tensor):
                        self.grad_results[id(g)] = (weakref.ref(g), span)
            except Exception:  # weakref of an odd tensor: it is shown as from outside the cell then
                pass
            try:
                p.results = pass_previews.many(result)
                for rid, shown in zip(p.inputs, p.results):
                    # an input's own node need not run (autograd.grad only captures there)
                    if shown is not None:
                        tracer.trace.records[rid].grads.setdefault(p.index, shown)
            except Exception as exc:
                tracer.note(f"the results of autograd.grad were not recorded: {type(exc).__name__}: {exc}")
        return result

    # ---- a training loop's scalars, recorded or not (issue 16) ----
    def _iteration(self, span, pass_index: Optional[int]) -> Optional[IterationScalars]:
        """A new entry of `trace.iterations`, None past limits.TRAIN_ITERATIONS (then counted)."""
        trace = self.tracer.trace
        index = len(trace.iterations) + trace.iterations_left_out
        if len(trace.iterations) >= limits.TRAIN_ITERATIONS:
            if not trace.iterations_left_out:
                self.tracer.note(f"over {limits.TRAIN_ITERATIONS} backward calls: the loss and gradient norm of the later ones were not kept")
            trace.iterations_left_out += 1
            return None
        entry = IterationScalars(index=index, line=span[0] if span else None, pass_index=pass_index)
        trace.iterations.append(entry)
        return entry

    def _run_unrecorded(self, func, args, kwargs, roots: tuple, entry: IterationScalars):
        """A pass past the limit: run as called; the loss is the root's value, and the gradient
        norm is over what the leaves received. After `zero_grad()` (every known leaf's `.grad`
        None) that is each leaf's `.grad` afterwards, read with no hook at all; otherwise
        (gradients accumulating) pre-hooks on the pass's AccumulateGrad nodes read it as it
        arrives. Measured on the loop benchmark: a walk and four hooks cost about half a plain
        backward of its MLP, the reads after it a tenth. Our reads run with torch-function
        dispatch off, in one block before the call and one after (a user's mode below ours
        must not see them)."""
        handles: list = []
        norms = LeafNorms()
        grad_call = func is torch.autograd.grad
        after: list = []
        tracer = self.tracer
        with no_torch_function():
            try:
                # the loss, read once: the NaN search past the limit asks whether it is finite
                self._loss(roots, entry)
            finally:
                tracer.before_backward_quiet(roots, entry.loss)  # already quiet in here
            try:
                after = [] if grad_call else self._leaves_without_grad()
                if not grad_call and not after:
                    self._hooks(roots, norms, handles)
            except Exception as exc:  # bookkeeping only: the pass runs the same without it
                for h in handles:
                    h.remove()
                handles.clear()
                after = []
                tracer.note(f"the loss or gradient norm of a pass past the limit was not kept: {type(exc).__name__}: {exc}")
        try:
            result = func(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        with no_torch_function():
            try:
                norms.add_all([*_as_tuple(result), *(t.grad for t in after)] if grad_call else [t.grad for t in after])
                norms.norm(self.deferred, lambda v: setattr(entry, "grad_norm", v))
            except Exception as exc:
                tracer.note(f"the gradient norm of a pass past the limit was not kept: {type(exc).__name__}: {exc}")
        return result

    def _leaf_norms(self, rest: list, total: float, count: int, entry: IterationScalars) -> None:
        """The gradient norm of a pass past the limit that capture/_walk.c ran: `total`, the sum of the
        squares of `count` gradients it read, with those it left (`rest`) taken by finite.py's exact
        paths, as `_run_unrecorded` takes them. An error is the caller's to note."""
        with no_torch_function():
            norms = LeafNorms()
            norms.host, norms.count = total, count
            norms.add_all(rest)
            norms.norm(self.deferred, lambda v: setattr(entry, "grad_norm", v))

    def _leaves_without_grad(self) -> list:
        """The recorded leaves (a loop's parameters), when none holds a `.grad` now; else []."""
        leaves = []
        for ref, _ in self.leaf_records.values():
            t = ref()
            if t is not None:
                if t.grad is not None:
                    return []
                leaves.append(t)
        return leaves

    def _loss(self, roots, entry: IterationScalars) -> None:
        try:
            loss_value(roots, self.deferred, lambda v: setattr(entry, "loss", v))
        except Exception as exc:  # bookkeeping only: the pass runs the same without it
            self.tracer.note(f"the loss of a pass past the limit was not kept: {type(exc).__name__}: {exc}")

    def _hooks(self, roots, norms: LeafNorms, handles: list) -> None:
        hook = self._leaf_norm(norms)
        seen: set[int] = set()
        stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while stack and len(seen) < MAX_WALK:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nf = node.next_functions
            if nf:
                stack.extend(n for n, _ in nf)
            elif type(node).__name__ == "AccumulateGrad":
                handles.append(node.register_prehook(hook))

    def _leaf_norm(self, norms: LeafNorms):
        """The pre-hook of each AccumulateGrad node of a pass past the limit: one Python call, never raises."""
        add = norms.add

        def pre(grad_outputs):
            try:
                with no_torch_function():
                    add(grad_outputs[0])
            except Exception as exc:
                self.tracer.note(f"the gradient norm of a pass past the limit was not kept: {type(exc).__name__}: {exc}")

        return pre

    def finish_iterations(self) -> None:
        """At the end of the run: read the device scalars back, and give each recorded pass's
        entry its loss and gradient norm from what the pass recorded."""
        try:
            self.deferred.read()
        except Exception as exc:
            self.tracer.note(f"the loss and gradient norms on the device were not read back: {type(exc).__name__}: {exc}")
        trace = self.tracer.trace
        try:
            for entry in trace.iterations:
                if entry.pass_index is not None and 0 <= entry.pass_index < len(trace.passes):
                    entry.loss, entry.grad_norm = pass_scalars(trace, trace.passes[entry.pass_index])
        except Exception as exc:  # the chart is a bonus: the trace stays as it is
            self.tracer.note(f"the loss and gradient norms of the recorded passes were not read: {type(exc).__name__}: {exc}")

    # ---- which records a node produces ----
    def note_record(self, rid: int, t: torch.Tensor) -> None:
        """Called for each new record of a tensor that requires grad."""
        try:
            fn = t.grad_fn
            if fn is None:
                ref, rids = self.leaf_records.get(id(t), (None, None))
                if ref is None or ref() is not t:
                    self.leaf_records[id(t)] = (weakref.ref(t), [rid])
                else:
                    rids.append(rid)
                return
            key = node_key(fn)
            self.node_records.setdefault(key, []).append((t.output_nr, rid))
        except Exception:  # e.g. reading grad_fn of a no_grad view changed in place raises
            pass

    def _records_of(self, key, name: str, variable) -> list[tuple[int, int]]:
        """[(output index, record id)] whose gradient the node (`key`, `name`, its leaf if any) receives."""
        if name == "AccumulateGrad":
            ref, rids = self.leaf_records.get(id(variable), (None, ()))
            if ref is not None and ref() is variable:
                return [(0, rid) for rid in rids]
            # a leaf that came to require grad after it was recorded (`requires_grad_()`, a sandbox flip)
            rid = self.tracer.record_of(variable) if variable is not None else None
            return [(0, rid)] if rid is not None else []
        return self.node_records.get(key, []) if key is not None else []

    def grad_seen(self, leaf: torch.Tensor, g: torch.Tensor):
        """The preview of `leaf.grad` taken in the last pass, if it is still that
        tensor, unchanged: no torch call ran since (only a call could have changed
        it behind its version counter: `.data`, `.numpy()`, `.grad = ...`)."""
        if self._last_calls != self.tracer.calls:
            return None
        hit = self._new_grads.get(id(leaf))
        if hit is None or hit[0] != g.data_ptr() or hit[1] is None or hit[1] != version_of(g):
            return None
        return hit[2]

    @staticmethod
    def _arguments(func, args, kwargs):
        """(roots, inputs, gradient, retain_graph) of the call, positional or by keyword (once per
        backward call: a loop's thousands of them read them with no helper function)."""
        n = len(args)
        if func is torch.Tensor.backward:  # (self, gradient, retain_graph, create_graph, inputs)
            return (_as_tuple(args[0] if n > 0 else kwargs.get("self")), _as_tuple(args[4] if n > 4 else kwargs.get("inputs")),
                    args[1] if n > 1 else kwargs.get("gradient"), args[2] if n > 2 else kwargs.get("retain_graph"))
        if func is torch.autograd.grad:
            return (_as_tuple(args[0] if n > 0 else kwargs.get("outputs")),
                    _as_tuple(args[1] if n > 1 else kwargs.get("inputs")),
                    args[2] if n > 2 else kwargs.get("grad_outputs"), args[3] if n > 3 else kwargs.get("retain_graph"))
        # torch.autograd.backward(tensors, grad_tensors, retain_graph, create_graph, grad_variables, inputs)
        return (_as_tuple(args[0] if n > 0 else kwargs.get("tensors")), _as_tuple(args[5] if n > 5 else kwargs.get("inputs")),
                args[1] if n > 1 else kwargs.get("grad_tensors"), args[2] if n > 2 else kwargs.get("retain_graph"))

    @quietly
    def _hook_nodes(self, p: BackwardPass, roots, handles: list) -> None:
        start = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        for t in roots:
            if isinstance(t, torch.Tensor) and t.grad_fn is None and t.requires_grad:
                self.tracer.note("backward from a leaf: its AccumulateGrad is the whole graph")
        # Every node a plain backward() reaches runs, so what a node sends along edges nothing
        # else feeds is exactly what each receiver's pre-hook gets (see `_plan_py`). autograd.grad
        # and backward(inputs=...) stop early: there a post-hook holds what was sent.
        all_run = p.kind == "backward" and not p.inputs
        nodes, names, variables, keys, edges_of, all_edges, handoffs, posts, fed = _plan(start, MAX_WALK, all_run)
        self._hook_named_tensors(nodes, variables)  # first: their records are among the nodes' below
        if self.tracer.earlier is not None:
            self._bring_in_earlier(keys, variables)
        if len(nodes) >= MAX_NODES:
            # Too many steps to keep, but each record still gets its gradient.
            self.tracer.note(f"a backward pass had over {MAX_NODES} nodes: its steps were not recorded")
            for node, name, key, variable in zip(nodes, names, keys, variables):
                outs = self._records_of(key, name, variable)
                if outs:
                    handles.append(node.register_prehook(self._guarded(self._grads_only(p, outs))))
            return
        p.nodes = names
        p.edges.extend(all_edges)
        self._note_grads_before(p, names, variables)
        by_node: dict[int, BackwardStep] = {}
        shared = _PassHooks(self, p, by_node)  # what every pre-hook of the pass shares (held by its hooks only)
        add = handles.append
        for nid, node in enumerate(nodes):
            edges = edges_of[nid]
            name, variable = names[nid], variables[nid]
            outs = self._records_of(keys[nid], name, variable)
            try:
                add(node.register_prehook(_pre_hook(shared, nid, name, outs, [target for target, _ in edges],
                                                    fed.get(nid, ()), not posts[nid],
                                                    variable if name == "AccumulateGrad" else None)))
                if posts[nid]:
                    # an edge into a slot nothing else feeds: the receiver's own pre-hook previews what it sends
                    add(node.register_hook(self._post(nid, by_node, variable, edges, handoffs[nid])))
            except Exception:
                continue

    def _note_grads_before(self, p: BackwardPass, names: list, variables: list) -> None:
        """`p.grad_before`: each leaf's `.grad` as the pass starts, against what the last recorded
        pass left (a cell that resets it, `w.grad = None` or `zero_grad()`, does not accumulate)."""
        before, leaves = p.grad_before, []
        for name, v in zip(names, variables):
            if name != "AccumulateGrad" or v is None:
                continue
            rids = [rid for _, rid in self._records_of(None, name, v)]
            if not rids:
                continue
            g = v.grad
            state = "none" if g is None else self.grad_since_last_pass(v, g) or "kept"  # kept: from before this cell
            assigned = self.tracer.grad_assigned(v)
            if assigned is not None and g is not None:  # `v.grad = ...` in the cell since: it starts from that
                state = "assigned"
                if assigned[0] is not None:
                    p.grad_assigned.update((rid, assigned[0]) for rid in rids)
            for rid in rids:
                before[rid] = state
            leaves.append(v)
        self._pass_leaves = leaves

    def grad_since_last_pass(self, leaf, g) -> Optional[str]:
        """`leaf.grad` (`g`) against what the last recorded pass into it left: "same", "none" (reset
        since), "changed" (in place, replaced, or by passes past the limit); None if unknown."""
        last = self._grad_after.get(id(leaf))
        if last is None or last[0]() is not leaf:
            return None
        if g is None:
            return "same" if last[1] is None else "none"
        return "same" if last[1] is not None and last[1]() is g and last[2] == version_of(g) else "changed"

    @quietly
    def _note_grads_after(self) -> None:
        leaves, self._pass_leaves = self._pass_leaves, []
        for v in leaves:
            try:
                g = v.grad
                self._grad_after[id(v)] = (weakref.ref(v), weakref.ref(g) if g is not None else None,
                                           version_of(g) if g is not None else None)
            except Exception:  # an odd leaf (no weak reference): its next pass says "kept"
                self._grad_after.pop(id(v), None)

    def _bring_in_earlier(self, keys: list, variables: list) -> None:
        """Nodes made by earlier traced cells (a backward-only cell): their records join this trace."""
        node_records, find = self.node_records, self.tracer.earlier.find
        records = self.tracer.trace.records
        for key, variable in zip(keys, variables):
            try:
                # most nodes are none of theirs: looked up here, brought in only when found
                if key is None or variable is not None:
                    continue
                mine = node_records.get(key)
                if mine is None:
                    if find(key) is not None:
                        self.tracer.bring_in_node(key)
                elif all(records[r].external and records[r].cell is None and not records[r].inputs for _, r in mine):
                    # only this run's external inputs have it (`y.sum().backward()`, y from an earlier
                    # cell): they are that cell's tensors, shown with its record's history
                    if find(key) is not None:
                        self.tracer.stand_in_node(key)
            except Exception as exc:  # bookkeeping: the pass runs the same without it
                self.tracer.note(f"could not bring in records of an earlier cell: {type(exc).__name__}: {exc}")
                return

    @quietly
    def _hook_named_tensors(self, nodes: list, variables: list) -> None:
        """Record the user's named tensors this pass reaches (a backward-only cell still shows x.grad)."""
        in_graph = {id(n) for n in nodes}
        leaves = {id(v) for v in variables if v is not None}
        # A module's parameters are leaves: walking every module of the namespace matters only
        # when a leaf this pass reaches has no record yet (`record_for` of a recorded one is a no-op).
        record_of = self.tracer.record_of
        unrecorded = any(v is not None and record_of(v) is None for v in variables)
        for name, t in self.tracer.names.requires_grad_tensors(modules=unrecorded):
            try:
                reached = id(t) in leaves or (t.grad_fn is not None and id(t.grad_fn) in in_graph)
            except RuntimeError:  # e.g. a no_grad view whose base changed in place: reading grad_fn raises
                continue
            if reached:
                self.tracer.record_for(t, name=name, from_earlier=True)

    def _store(self, p: BackwardPass, outs, grad_in: list) -> list[int]:
        """Each record's gradient, out of the previews of a node's incoming grads; their ids."""
        records = self.tracer.trace.records
        got = []
        for out_nr, rid in outs:
            shown = grad_in[out_nr] if out_nr < len(grad_in) else None
            if shown is not None:
                records[rid].grads[p.index] = shown
                got.append(rid)
        return got

    def _guarded(self, hook):
        """A hook that runs inside torch's engine: an error of ours is noted, never raised into backward()."""
        return _Guarded(self, hook)

    def _grads_only(self, p: BackwardPass, outs):
        def pre(grad_outputs):
            with no_torch_function():
                self._store(p, outs, [self.previews.get(g) for g in grad_outputs])

        return pre

    def _missed(self, exc: Exception) -> None:
        self.tracer.note(f"part of a backward pass was not recorded: {type(exc).__name__}: {exc}")

    def _post(self, nid: int, by_node: dict, variable, edges, handoff):
        """The node's post-hook (`_PostHook`, guarded as `_guarded`'s hooks): what it sends along each edge."""
        return _PostHook(self, self._held, self.previews.get, nid, by_node, edges, handoff)

    def _flush_held(self) -> None:
        """Gradients sent to nodes that did not run (autograd.grad stops at its inputs)."""
        held, self._held = self._held, {}
        for g, sender, i in held.values():
            if i < len(sender.grad_out) and sender.grad_out[i] is None:
                sender.grad_out[i] = self.previews(g)

    @quietly
    def _note_new_grads(self) -> None:
        accumulated, self._accumulated = self._accumulated, []
        for leaf, ptr, shape, version, shown in accumulated:
            try:
                self._note_new_grad(leaf, ptr, shape, version, shown)
            except Exception:
                pass

    def _note_new_grad(self, variable, ptr: int, shape, version, shown) -> None:
        """AccumulateGrad has run: when the leaf's `.grad` is the very gradient it
        received (torch hands it over rather than copying), remember its preview."""
        g = variable.grad
        if g is not None and g.data_ptr() == ptr and g.shape == shape:
            # the version it had when previewed: a post-accumulate-grad hook may have changed it since
            self._new_grads[id(variable)] = (ptr, version, shown)


class _PassHooks:
    """What every pre-hook of one pass shares (one object, not a closure's cells per node)."""

    __slots__ = ("recorder", "p", "by_node", "held", "get", "steps", "accumulated", "version_seen")

    def __init__(self, recorder: BackwardRecorder, p: BackwardPass, by_node: dict):
        self.recorder, self.p, self.by_node = recorder, p, by_node
        self.held, self.get = recorder._held, recorder.previews.get  # this pass's
        self.steps = p.steps
        self.accumulated, self.version_seen = recorder._accumulated, recorder.previews.version_seen


class _PreHook:
    """A node's pre-hook. Guarded like `_guarded`'s hooks (inlined: one Python call per node
    fewer); its state in slots, since a pass holds one per node while it runs. capture/_graph.c's
    `PreHook` is the same, compiled (`_pre_hook` is whichever runs); a change here goes there too."""

    __slots__ = ("shared", "nid", "name", "outs", "nexts", "fed", "no_post", "leaf")

    def __init__(self, shared: _PassHooks, nid: int, name: str, outs, nexts: list, fed, no_post: bool, leaf):
        self.shared, self.nid, self.name, self.outs, self.nexts = shared, nid, name, outs, nexts
        self.fed, self.no_post, self.leaf = fed, no_post, leaf

    def __call__(self, grad_outputs):
        shared = self.shared
        try:
            with no_torch_function():  # our reads are not the user's ops
                get, by_node, held, nid = shared.get, shared.by_node, shared.held, self.nid
                grad_in = [get(g) for g in grad_outputs]
                for slot, sender_id, i in self.fed:
                    sender = by_node.get(sender_id)
                    if sender is not None and slot < len(grad_in) and sender.grad_out[i] is None:
                        sender.grad_out[i] = grad_in[slot]
                if held:
                    for slot in range(len(grad_outputs)):
                        sent = held.pop((nid, slot), None)  # released before the node runs: AccumulateGrad may take it over
                        if sent is not None:
                            g, sender, i = sent
                            if i < len(sender.grad_out) and sender.grad_out[i] is None:
                                sender.grad_out[i] = grad_in[slot] if g is grad_outputs[slot] else get(g)
                outs, nexts, steps = self.outs, self.nexts, shared.steps
                step = BackwardStep(len(steps), self.name, nid, shared.recorder._store(shared.p, outs, grad_in) if outs else [],
                                    grad_in, [None] * len(nexts) if self.no_post else [], nexts)
                steps.append(step)
                by_node[nid] = step
                leaf = self.leaf
                if leaf is not None and grad_in:
                    g = grad_outputs[0]
                    if g is not None and g.layout == torch.strided:  # no reference kept: the leaf may take it over
                        # (a sparse gradient has no data pointer: its .grad is previewed afresh at the end)
                        shared.accumulated.append((leaf, g.data_ptr(), g.shape, shared.version_seen(g), grad_in[0]))
        except Exception as exc:
            shared.recorder._missed(exc)
        return None  # never replaces a gradient


class _Guarded:
    """`BackwardRecorder._guarded`'s hook (slots: a pass holds one per hooked node)."""

    __slots__ = ("recorder", "hook")

    def __init__(self, recorder: BackwardRecorder, hook):
        self.recorder, self.hook = recorder, hook

    def __call__(self, *args):
        try:
            self.hook(*args)
        except Exception as exc:
            self.recorder._missed(exc)
        return None  # never replaces a gradient


class _PostHook:
    """A node's post-hook: previews what it sends, or holds it for the receiver's pre-hook.
    Guarded like `_guarded`'s hooks (inlined, as `_PreHook`'s: one Python call per node fewer)."""

    __slots__ = ("recorder", "held", "get", "nid", "by_node", "edges", "handoff")

    def __init__(self, recorder: BackwardRecorder, held: dict, get, nid: int, by_node: dict, edges, handoff):
        self.recorder, self.held, self.get, self.nid = recorder, held, get, nid
        self.by_node, self.edges, self.handoff = by_node, edges, handoff

    def __call__(self, grad_inputs, grad_outputs):
        try:
            step = self.by_node.get(self.nid)
            if step is None:
                return None
            get, held, edges, handoff = self.get, self.held, self.edges, self.handoff
            with no_torch_function():
                sent = step.grad_out = [None] * len(grad_inputs)  # complete before any hand-off refers to it
                received = None
                for i, g in enumerate(grad_inputs):
                    if g is None:
                        continue
                    if i >= len(handoff) or not handoff[i]:
                        sent[i] = get(g)
                        continue
                    # Read once, by the receiver's pre-hook; held until then, which the
                    # engine does too (a slot fed once is never summed in place).
                    held[edges[i]] = (g, step, i)
                    try:
                        if received is None:
                            received = {r.data_ptr() for r in grad_outputs if r is not None}
                        if g.data_ptr() in received:
                            # a view of what it received (TBackward): cheap now, while that one is alive
                            sent[i] = get(g)
                    except Exception:  # no storage to point at (functorch, sparse): read by the receiver
                        received = set()
        except Exception as exc:
            self.recorder._missed(exc)
        return None  # never replaces a gradient


# the pre-hook each node gets: `_PreHook`, or the same compiled (capture/_graph.c), where built
_pre_hook = _PreHook
if _plan_c is not None and hasattr(_graph, "PreHook"):
    _graph.configure(BackwardStep, no_torch_function, torch.strided)
    _pre_hook = _graph.PreHook


def pass_scalars(trace: Trace, p: BackwardPass) -> tuple[Optional[float], Optional[float]]:
    """(loss, total gradient norm) of a recorded pass, from its previews: the same scalars a pass
    past the limit gives (`_run_unrecorded`). The norm is over what each AccumulateGrad step
    received (each leaf once), or when the pass was too large to keep steps, over the leaves'
    records' gradients; for autograd.grad, over its results."""
    loss = None
    if len(p.roots) == 1 and 0 <= p.roots[0] < len(trace.records):
        shown = trace.records[p.roots[0]].preview
        if shown is not None and shown.numel == 1 and shown.values is not None and shown.values.dtype.kind in "fiub":
            loss = float(shown.values.reshape(-1)[0])
    if p.kind == "grad":
        grads = list(p.results)
    elif p.nodes:
        grads = [s.grad_in[0] if s.grad_in else None for s in p.steps if s.node == "AccumulateGrad"]
    else:
        grads = _leaf_grads(trace, p.index)
    norms = [g.norm for g in grads if g is not None]
    if not norms or any(n is None for n in norms):
        return loss, None
    return loss, math.hypot(*norms)


def _leaf_grads(trace: Trace, index: int) -> list:
    """Each leaf's gradient in pass `index`, once per tensor (an in-place op's record names the
    record it changed: the chain is one tensor)."""
    out: dict[int, Any] = {}
    records = trace.records
    for r in records:
        if r.is_leaf and r.requires_grad and index in r.grads:
            root, hops = r, 0
            while root.mutates is not None and 0 <= root.mutates < len(records) and hops < len(records):
                root, hops = records[root.mutates], hops + 1
            out.setdefault(root.id, r.grads[index])
    return list(out.values())


def _with_roots(func, args: tuple, kwargs: dict, roots: tuple) -> tuple[tuple, dict]:
    """The call's arguments differentiating `roots` instead, with no gradient argument."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("gradient", "grad_tensors", "grad_outputs", "tensors", "outputs")}
    if func is torch.Tensor.backward:
        return (roots[0], None) + args[2:], kwargs
    if func is torch.autograd.grad:
        rest = args[1:]
        if len(rest) >= 2:
            rest = (rest[0], None) + rest[2:]
        return (roots,) + rest, kwargs
    rest = args[1:]
    if rest:
        rest = (None,) + rest[1:]
    return (roots,) + rest, kwargs

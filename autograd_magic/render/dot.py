"""The autograd graph as Graphviz DOT text, read from a Trace alone.

Tensors are micrograd-style records `name | data | grad`; each `grad_fn` is an
op node between its inputs and its output; leaves that require grad feed an
`AccumulateGrad` node, where `.grad` is filled. Arrows follow the data
(forward); gradients flow back against them. DOT node names are what the
widget maps clicks with: `r<id>` for a record, `op<id>` for its op,
`acc<id>` for its AccumulateGrad node, `more` for the folded remainder.

Every user-derived string (names, source text, value previews) goes into
HTML-like labels through `_text`, which escapes it, so neither DOT nor the
SVG Graphviz writes can be broken or injected into.
"""

from __future__ import annotations

import html
import re
from typing import Iterable, Optional

from ..data.identity import changed_fields, match_records
from ..explain.fold import Folded, Unit, fold, has_op_node
from ..explain.format import format_short, format_shape
from ..data.trace import Record, Trace
from ..explain import wording
from ..explain.wording import FLAG_WORDS, flags, gradient_cell, hides_value, record_label
from .. import limits

FONT = "Helvetica"
LEGEND = "→ data flows forward · gradients flow back against the arrows · ✂ detached: no gradient crosses"

# fill, border
_RG = ("#fff3e0", "#e08a00")  # requires_grad
_PLAIN = ("#f7f7f7", "#9e9e9e")
_NO_GRAD = ("#eeeeee", "#bdbdbd")
_CALL = ("#ede7f6", "#5e35b1")
_CHANGED_FILL = "#fff59d"
_SELECTED = ("#fce4ec", "#c2185b")
_CUT = "#d32f2f"
_GREY_TEXT = "#757575"


def render_dot(
    trace: Trace,
    variant: Optional[Trace] = None,
    selected: Optional[int] = None,
    unfold: Iterable = (),
    max_nodes: int = limits.GRAPH_NODES,
) -> str:
    """DOT for `trace`, or for `variant` with what it changed against `trace` highlighted."""
    shown, original = (variant, trace) if variant is not None else (trace, trace.variant_of)
    changed = changed_records(original, shown) if original is not None else set()
    folded = fold(shown, unfold=unfold, max_nodes=max_nodes)
    out = [
        "digraph autograd {",
        f'  graph [rankdir=LR, nodesep=0.2, ranksep=0.3, fontname="{FONT}", fontsize=9,'
        f' fontcolor="{_GREY_TEXT}", labeljust=l, labelloc=b, label=<{_text(LEGEND)}>];',
        f'  node [fontname="{FONT}", fontsize=10, shape=plaintext, margin=0];',
        f'  edge [color="#616161", arrowsize=0.6, fontname="{FONT}", fontsize=9];',
    ]
    records = shown.records
    if not folded.units:
        out[1] = out[1].replace(f"label=<{_text(LEGEND)}>", "label=<No tensor operations were recorded in this cell.>")
    nodes = [line for u in folded.units for line in _unit_lines(shown, folded, u, changed, selected)]
    edges = _edges(records, folded)
    proxies, dropped = _shorten_long_edges(records, folded, edges, allowance=max_nodes - len(nodes))
    out += nodes + proxies
    out += [_edge_line(src, dst, kinds) for (src, dst), kinds in edges.items()]
    if dropped:  # said in the legend, not a node: the node budget is spent
        out[1] = out[1].replace(f"label=<{_text(LEGEND)}>", f"label=<{_text(LEGEND)}<BR/>{_dropped_text(dropped)}>")
    out.append("}")
    return "\n".join(out) + "\n"


def node_map(trace: Trace, unfold: Iterable = (), max_nodes: int = limits.GRAPH_NODES) -> dict[int, str]:
    """Record id -> the DOT node that draws it (`r<id>`, a folded node's name, or "more").

    `render_dot` with the same `unfold` and `max_nodes` names its nodes so; the
    widget uses this to light up a record that sits inside a folded node.
    """
    return {rid: u.key for rid, u in fold(trace, unfold=unfold, max_nodes=max_nodes).unit_of.items()}


# ---------------------------------------------------------------- escaping


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(value: object, limit: int = 0) -> str:
    """Text for inside an HTML-like label: entities escaped, newlines as <BR/>."""
    s = _CONTROL.sub("", str(value)).replace("\r\n", "\n").replace("\r", "\n")
    if limit and len(s) > limit:
        s = s[: limit - 1] + "…"
    return "<BR/>".join(html.escape(line, quote=True) for line in s.split("\n"))


def _token(value: object) -> str:
    """A class name made only of safe characters (Graphviz copies it into SVG)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", str(value))


def _attrs(**kw) -> str:
    parts = []
    for k, v in kw.items():
        if v is None:
            continue
        if isinstance(v, str) and v.startswith("<") and v.endswith(">"):
            parts.append(f"{k}={v}")  # an HTML-like label, escaped by _text
        else:
            parts.append(f'{k}="{str(v)}"')  # only our own fixed strings and tokens
    return ", ".join(parts)


# ---------------------------------------------------------------- nodes


_MORE_STYLE = dict(shape="note", style="filled", fillcolor="#fafafa", color="#9e9e9e", fontcolor="#424242")
_ACC_STYLE = dict(shape="box", style="rounded,filled", fillcolor="#e8f5e9", color="#66bb6a", fontsize="8")


def _unit_lines(shown: Trace, folded: Folded, u: Unit, changed: set[int], selected) -> list[str]:
    records = shown.records
    if u.kind == "more":
        return [f"  more [{_attrs(label=_more_label(u), **_MORE_STYLE, **{'class': 'more'})}];"]
    is_selected = selected is not None and selected in u.records
    is_changed = any(rid in changed for rid in u.records)
    r = records[u.output]
    label = _record_label(shown, u, is_changed, is_selected)
    classes = " ".join([u.kind] + _flags(r, is_changed, is_selected))
    lines = [f"  {u.key} [{_attrs(label=label, **{'class': classes})}];"]
    if u.kind == "record":
        if has_op_node(r) and _op_owner(records, r) == r.id:
            lines.append(_op_line(r))
        if r.id in folded.acc:
            lines.append(f"  acc{r.id} [{_attrs(label='<AccumulateGrad>', **_ACC_STYLE, **{'class': 'acc'})}];")
    return lines


def _flags(r: Record, is_changed: bool, is_selected: bool) -> list[str]:
    """SVG classes of a node, for the widget's CSS and tests."""
    conditions = (
        (r.is_leaf, "leaf"), (not r.grad_enabled, "no-grad"), (r.external, "external"), (r.inplace, "inplace"),
        (r.detached, "detached"), (is_changed, "changed"), (is_selected, "selected"),
    )
    return ["requires-grad" if r.requires_grad else "no-requires-grad"] + [name for cond, name in conditions if cond]


def _colors(r: Record, u: Unit) -> tuple[str, str]:
    if u.kind == "call" or (u.kind == "repeat" and u.title):
        return _CALL
    if not r.grad_enabled:
        return _NO_GRAD
    return _RG if r.requires_grad else _PLAIN


def _record_label(shown: Trace, u: Unit, is_changed: bool, is_selected: bool) -> str:
    records = shown.records
    r = records[u.output]
    fill, color = _colors(r, u)
    if is_changed:
        fill = _CHANGED_FILL
    if is_selected:  # colours only: the same geometry, so selecting never moves the layout
        fill, color = _SELECTED
    style = ' STYLE="rounded"' if (r.external or u.kind != "record") else ""
    font = f'<FONT COLOR="{_GREY_TEXT}">' if not r.grad_enabled else "<FONT>"
    title = f"{font}<B>{_text(_title(r, u), 40)}</B>{_small(_subtitle(r, u, is_changed))}</FONT>"
    if u.kind == "params":
        data = f"{font}{len(u.records)} tensors</FONT>"
        grad = f"{font}grad set on {sum(1 for i in u.records if records[i].grad_preview is not None)}</FONT>"
    else:
        value = "uninitialised" if hides_value(r) else format_short(r.preview, 28)
        data = f"{font}data {_text(value)}</FONT>"
        grad = f"{font}grad {_text(gradient_cell(r, shown, _short_grad)[0])}</FONT>"
    return (
        f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3"'
        f' BGCOLOR="{fill}" COLOR="{color}"{style}>'
        f'<TR><TD ROWSPAN="3">{title}</TD><VR/><TD ALIGN="LEFT">{data}</TD></TR>'
        f'<HR/><TR><TD ALIGN="LEFT">{grad}</TD></TR></TABLE>>'
    )


def _small(text: str) -> str:
    """Small print under a title, each line cut at 60 characters."""
    lines = "<BR/>".join(_text(line, 60) for line in text.split("\n"))
    return f'<BR/><FONT POINT-SIZE="8">{lines}</FONT>' if text else ""


def _title(r: Record, u: Unit) -> str:
    """A plain record is its name or expression; ⊞ marks a node that folds several."""
    if u.kind == "params":
        return f"⊞ {u.title}"
    if u.kind in ("call", "repeat"):
        return f"⊞ {r.expr or r.label}"
    return record_label(r)


def _subtitle(r: Record, u: Unit, is_changed: bool) -> str:
    """The small lines under the title: what folded, what was not recorded, shape and flags."""
    parts = [_folded_text(r, u)]
    if u.not_kept:
        parts.append(_not_kept_text(u))
    tags = [format_shape(r.preview) if u.kind != "params" and r.shape else ""]
    tags += ["✂ detached" if f == FLAG_WORDS["detached"] else f for f in flags(r) if f != FLAG_WORDS["external"]]
    if is_changed:
        tags.append("changed")
    parts.append(" ".join(t for t in tags if t))
    return "\n".join(p for p in parts if p)


def _folded_text(r: Record, u: Unit) -> str:
    if u.kind == "call":
        params = f" · {u.params} param" + ("s" if u.params > 1 else "") if u.params else ""
        return f"{u.title} · {u.ops} ops{params}"
    if u.kind == "repeat":
        return f"×{u.runs} more runs folded" + (f" · {u.title}" if u.title else "")
    if u.kind == "params":
        return f"{len(u.records)} tensors from outside the cell, read by ops not recorded"
    statement = wording.statement_of(r)
    if statement:  # `h += 1`, `torch.mul(a, b, out=c)`: the line changes the named tensor, it binds nothing
        return statement
    if r.name and r.expr and r.expr != r.name:
        return f"= {r.expr}"
    return "from outside the cell" if r.external else ""


def _not_kept_text(u: Unit) -> str:
    """`trace.repeats` counts ops; a call of k ops that ran n more times counts n·k."""
    per_run = u.ops // max(u.runs, 1) if u.kind in ("call", "repeat") else 1
    if per_run > 1 and u.not_kept % per_run == 0:
        return f"×{u.not_kept // per_run} more runs (not recorded)"
    if per_run > 1:
        return f"×{u.not_kept} more ops (not recorded)"
    return f"×{u.not_kept} more runs (not recorded)"


def _short_grad(g) -> str:
    return format_short(g, 28)


def _op_owner(records: list[Record], r: Record) -> int:
    """Outputs of one tuple-returning op share the op node of the first output."""
    rid = r.id
    while rid > 0 and records[rid].output_index and records[rid - 1].inputs == records[rid].inputs:
        prev = records[rid - 1]
        if prev.output_index is None or prev.output_index != records[rid].output_index - 1:
            break
        rid -= 1
    return rid


def _op_line(r: Record) -> str:
    name = r.grad_fn or r.op
    sub = r.op if r.grad_fn else "no grad_fn"
    if r.inplace:
        sub += " · in-place"
    if r.grad_fn:
        fill, border, font = ("#e3f2fd", "#1e88e5", "#000000")
    else:
        fill, border, font = ("#f5f5f5", "#bdbdbd", _GREY_TEXT)
    style = "rounded,filled" + (",dashed" if not r.grad_enabled else "")
    flags = [(not r.grad_fn, "no-grad-fn"), (not r.grad_enabled, "no-grad"), (r.inplace, "inplace")]
    classes = " ".join(["op", _token(name)] + [flag for cond, flag in flags if cond])
    label = f'<{_text(name, 40)}<BR/><FONT POINT-SIZE="8">{_text(sub, 40)}</FONT>>'
    attrs = _attrs(
        label=label, shape="box", style=style, fillcolor=fill, color=border, fontcolor=font,
        penwidth="2" if r.inplace else None, **{"class": classes},
    )
    return f"  op{r.id} [{attrs}];"


def _more_label(u: Unit) -> str:
    return (
        f"<… {u.hidden_nodes} more nodes folded<BR/>"
        f'<FONT POINT-SIZE="8">{u.ops} tensors; raise max_nodes to see them</FONT>>'
    )


# ---------------------------------------------------------------- edges


def _edges(records: list[Record], folded: Folded) -> dict[tuple[str, str], set[str]]:
    """(source node, target node) -> kinds ("cut", "acc", "no-grad", "") of the data edges."""
    edges: dict[tuple[str, str], set[str]] = {}

    def add(src: str, dst: str, kind: str = "") -> None:
        if src != dst:
            edges.setdefault((src, dst), set()).add(kind)

    for u in folded.units:
        if u.kind == "record":
            r = records[u.output]
            if r.id in folded.acc:
                add(f"acc{r.id}", u.key, "acc")
            if not has_op_node(r):
                continue
            op = f"op{_op_owner(records, r)}"
            add(op, u.key, "" if r.grad_enabled else "no-grad")
            if op != f"op{r.id}":
                continue
            _input_edges(records, folded, r, op, add)
            continue
        for rid in u.records:
            _input_edges(records, folded, records[rid], u.key, add)
    return edges


def _input_edges(records, folded: Folded, r: Record, dst: str, add) -> None:
    cut_op = r.op in ("detach", "detach_")
    for i in r.inputs:
        src = folded.unit_of.get(i)
        if src is None:
            continue
        kind = "cut" if (records[i].detached or cut_op) else ("no-grad" if not r.grad_enabled else "")
        add(src.key, dst, kind)


def _edge_line(src: str, dst: str, kinds: set[str]) -> str:
    if "cut" in kinds:
        attrs = _attrs(style="dashed", color=_CUT, fontcolor=_CUT, arrowhead="tee", label="✂", **{"class": "cut"})
    elif "acc" in kinds:
        attrs = _attrs(style="dashed", color="#66bb6a", arrowhead="empty", **{"class": "acc"})
    elif "no-grad" in kinds and len(kinds) == 1:
        attrs = _attrs(style="dashed", color="#bdbdbd", **{"class": "no-grad"})
    else:
        attrs = ""
    return f"  {src} -> {dst}" + (f" [{attrs}];" if attrs else ";")


# ---------------------------------------------------------------- long edges

LONG = 6  # ranks an edge may span before it costs Graphviz real time
HUB = 3  # long reads of one tensor that make it a hub
_PROXY_STYLE = {"shape": "box", "style": "dashed,rounded", "fontsize": "8", "class": "proxy"}


def _shorten_long_edges(records, folded: Folded, edges: dict, allowance: int) -> tuple[list[str], int]:
    """Reads of one tensor from far along the graph go through a small copy of it.

    A parameter read by each of 50 unrolled steps gives 50 edges spanning up
    to 100 ranks; Graphviz's dot spent minutes on such a 265-node graph and
    lays the same graph out in 0.3 s when each far read starts from a copy
    (`r5_p1`, labelled like `r5`) placed beside the reader. Copies count
    against `max_nodes`; far reads past the allowance are left out, counted.
    """
    depth = _depths(folded, edges)
    far: dict[str, list[str]] = {}
    for src, dst in edges:
        if depth.get(dst, 0) - depth.get(src, 0) > LONG:
            far.setdefault(src, []).append(dst)
    titles = {u.key: records[u.output].label for u in folded.units if u.kind != "more"}
    lines: list[str] = []
    dropped = 0
    for src, targets in far.items():
        if len(targets) < HUB or src not in titles:
            continue
        for k, dst in enumerate(targets, 1):
            kinds = edges.pop((src, dst))
            if len(lines) >= allowance:
                dropped += 1
                continue
            lines.append(f"  {src}_p{k} [{_attrs(label=f'<↪ {_text(titles[src], 30)}>', **_PROXY_STYLE)}];")
            edges[(f"{src}_p{k}", dst)] = kinds
    return lines, dropped


def _depths(folded: Folded, edges: dict) -> dict[str, int]:
    """Longest-path rank of each node, following execution order (folded loops may close cycles)."""
    order: dict[str, tuple[int, int]] = {}
    for i, u in enumerate(folded.units):
        order[f"acc{u.output}"], order[f"op{u.output}"], order[u.key] = (i, 0), (i, 1), (i, 2)
    depth: dict[str, int] = {}
    for src, dst in sorted(edges, key=lambda e: order.get(e[1], (0, 0))):
        if order.get(src, (0, 0)) < order.get(dst, (0, 0)):
            depth[dst] = max(depth.get(dst, 0), depth.get(src, 0) + 1)
    return depth


def _dropped_text(n: int) -> str:
    return f"{n} far reads of shared tensors not drawn: raise max_nodes to see them"


# ---------------------------------------------------------------- variants


def changed_records(original: Trace, variant: Trace) -> set[int]:
    """Ids of `variant` records whose values, grads or graph differ from the original run.

    Uses the matching every view shares (`_compare`); ops only the variant ran count as changed.
    """
    matched = match_records(original, variant)
    out = {v for o, v in matched.items() if changed_fields(original.records[o], variant.records[v])}
    seen = set(matched.values())
    out.update(r.id for r in variant.records if r.id not in seen and r.span is not None)
    return out

// The front end of autograd_magic's view: draws what Python sends, sends back ids and switches.
// Every string from the payload goes into the page through textContent, never parsed as markup;
// the graph SVG is parsed inertly and rebuilt from an allowlist (see safeSvg).

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  }
  return el;
}

// The gradient sits next to the value: in a narrow notebook the right-hand columns scroll.
const COLUMNS = [
  ["label", "name / expression"],
  ["value", "value"],
  ["grad", "grad"],
  ["grad_fn", "grad_fn"],
  ["requires_grad", "requires_grad"],
  ["is_leaf", "is_leaf"],
  ["shape", "shape"],
  ["dtype", "dtype"],
];

function cellText(row, key) {
  const v = row[key];
  if (v === undefined || v === null) return key === "grad_fn" ? "None" : "";
  if (typeof v === "boolean") return v ? "True" : "False"; // as Python prints them
  return String(v);
}

// ---- the graph's SVG, rebuilt from an allowlist ----
// The SVG text is untrusted even though Python's Graphviz wrote it: widget state is saved into
// the notebook, so whoever edits the .ipynb chooses it. A blocklist always misses something
// (SMIL <animate>/<set> writes a javascript: href onto a link after any filter has run), so
// nothing is copied unless it is named here, and the copy is a fresh tree of elements made in
// the SVG namespace: no parsed node, unknown attribute or namespace trick reaches the page.
const SVG_NS = "http://www.w3.org/2000/svg";
const XLINK_NS = "http://www.w3.org/1999/xlink";
const XML_NS = "http://www.w3.org/XML/1998/namespace";

// Keyed by lower case, so that a match never depends on how the parser cased a name;
// the value is the spelling to create (SVG names are case-sensitive).
const byLowerCase = (names) => new Map(names.map((n) => [n.toLowerCase(), n]));

// What Graphviz's SVG renderer writes (record, op and note nodes, edges, arrowheads, legend),
// plus the gradient elements it writes for two-colour fills.
const SVG_ELEMENTS = byLowerCase([
  "svg", "g", "title", "path", "polygon", "polyline", "ellipse", "circle", "line", "rect",
  "text", "tspan", "a", "defs", "linearGradient", "radialGradient", "stop",
]);
const PRESENTATION = [
  "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-dasharray", "stroke-dashoffset",
  "stroke-linecap", "stroke-linejoin", "stroke-miterlimit", "stroke-opacity", "opacity", "stop-color",
  "stop-opacity", "font-family", "font-size", "font-weight", "font-style", "font-variant", "font-stretch",
  "text-anchor", "text-decoration", "baseline-shift", "dominant-baseline",
];
const SVG_ATTRS = byLowerCase([
  "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "fx", "fy", "dx", "dy", "points", "d",
  "transform", "width", "height", "viewBox", "preserveAspectRatio", "offset", "gradientUnits",
  "gradientTransform", "class", "id", ...PRESENTATION,
]);
// Older Graphviz writes a gradient stop's colour as style="stop-color:…": such declarations are
// copied out as plain attributes; a style attribute itself is never copied (CSS can fetch).
const STYLE_PROPS = new Set(PRESENTATION);
const TEXT_HOLDERS = new Set(["title", "text", "tspan"]);
const MAX_DEPTH = 64; // Graphviz nests five deep; deeper input is cut rather than recursed into
const LOCAL_ID = /^[A-Za-z_][\w.-]{0,199}$/;
const LOCAL_REF = /url\((["']?)#([\w.-]+)\1\)/g;
let graphCount = 0;

// Whitespace, control and invisible characters dropped, lower case: how a URL scheme or CSS
// keyword is spelled when split up to slip past a check. Entities are already decoded by the
// parser (&#106;avascript: arrives as javascript:), so this is the text the browser acts on.
const flatten = (value) => value.replace(/[\s\u0000-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u2028-\u202e\u2060\ufeff]/g, "").toLowerCase();

// Refused: anything that could name a script or an outside resource. The one url() kept points
// at an element of this same graph (a gradient). Backslashes and comments are refused because
// CSS reads them as escapes and gaps (\75 rl(…) is url(…)).
function safeValue(value) {
  const flat = flatten(value);
  if (/javascript:|vbscript:|data:|expression\(|@import|\\|\/\*/.test(flat)) return false;
  return !flat.replace(LOCAL_REF, "").includes("url(");
}

function styleDeclarations(style) {
  const out = [];
  for (const decl of style.split(";")) {
    const at = decl.indexOf(":");
    if (at > 0) out.push([decl.slice(0, at).trim().toLowerCase(), decl.slice(at + 1).trim()]);
  }
  return out;
}

// Ids get a prefix of their own graph, and local references follow: two graphs on one page no
// longer share gradient ids, and no id can name (clobber) a global the page relies on.
function localize(name, value, prefix) {
  if (name === "id") return LOCAL_ID.test(value) ? prefix + value : null;
  return value.replace(/url\(\s*(["']?)\s*#\s*([\w.-]+)\s*\1\s*\)/g, (_m, _q, id) => `url(#${prefix}${id})`);
}

function copyAttributes(src, out, tag, prefix) {
  const put = (name, value) => {
    const known = SVG_ATTRS.get(name);
    if (!known || !safeValue(value)) return;
    const v = localize(known, value, prefix);
    if (v !== null) out.setAttribute(known, v);
  };
  for (const attr of src.attributes) {
    const ns = attr.namespaceURI;
    const name = attr.localName.toLowerCase();
    if (ns === XML_NS) {
      if (name === "space" && /^(preserve|default)$/.test(attr.value)) out.setAttributeNS(XML_NS, "xml:space", attr.value);
    } else if (ns === XLINK_NS || (ns === null && name === "href")) {
      // a link may only jump inside this graph; any other href (javascript:, data:, http:) is dropped
      const target = /^#([\w.-]+)$/.exec(attr.value.trim());
      if (tag === "a" && name === "href" && target) out.setAttribute("href", `#${prefix}${target[1]}`);
      else if (tag === "a" && name === "title" && ns === XLINK_NS) out.setAttributeNS(XLINK_NS, "xlink:title", attr.value);
    } else if (ns === null && !name.includes(":")) {
      // (a prefix the HTML parser left unresolved, foo:href, is never an attribute we know)
      if (name === "style") for (const [prop, value] of styleDeclarations(attr.value)) STYLE_PROPS.has(prop) && put(prop, value);
      else put(name, attr.value);
    }
  }
}

function cleanElement(src, prefix, depth) {
  const tag = src.namespaceURI === SVG_NS ? SVG_ELEMENTS.get(src.localName.toLowerCase()) : undefined;
  if (!tag || depth > MAX_DEPTH) return null; // the element and everything inside it
  const out = document.createElementNS(SVG_NS, tag);
  copyAttributes(src, out, tag, prefix);
  for (const child of src.childNodes) {
    if (child.nodeType === Node.TEXT_NODE) {
      if (TEXT_HOLDERS.has(tag)) out.appendChild(document.createTextNode(child.data));
    } else if (child.nodeType === Node.ELEMENT_NODE && tag !== "title" && tag !== "stop") {
      const copy = cleanElement(child, prefix, depth + 1);
      if (copy) out.appendChild(copy);
    }
  }
  return out;
}

export function safeSvg(text) {
  // Parsed inertly (a DOMParser document runs no scripts and loads nothing), then rebuilt.
  const doc = new DOMParser().parseFromString(String(text), "text/html");
  const found = [...doc.getElementsByTagName("svg")].find((el) => el.namespaceURI === SVG_NS);
  const svg = found && cleanElement(found, `agm${++graphCount}-`, 0);
  return svg ? { svg, text: "" } : { svg: null, text: doc.body ? doc.body.textContent : "" };
}

function nodeRecordId(g) {
  const title = g.querySelector("title");
  const m = title && /^r(\d+)(?:_p\d+)?$/.exec(title.textContent.trim());  // r5_p2: a copy of r5 drawn near a far reader
  return m ? Number(m[1]) : null;
}

const SPAN = COLUMNS.length + 1; // the detach column plus the data columns
const sortIds = (ids) => [...ids].sort((a, b) => a - b);

// ---- the view: toolbar, table (rows grouped by source line), detail, stepper, graph ----

class View {
  constructor(model, el) {
    this.model = model;
    this.expanded = new Set(); // "line:call" keys whose internal ops are unfolded
    this.root = h("div", { class: "agm-root" });
    el.appendChild(this.root);
    this.buildToolbar();
    this.banner = h("div", { class: "agm-banner" });
    this.table = h("table", { class: "agm-table" });
    this.detail = h("div", { class: "agm-detail" });
    const main = h("div", { class: "agm-main" }, h("div", { class: "agm-table-wrap" }, this.table), this.detail);
    this.stepper = h("div", { class: "agm-stepper" });
    this.graph = h("div", { class: "agm-graph" });
    this.checkOut = h("div", { class: "agm-gradcheck" });
    this.root.append(this.toolbar, this.banner, main, this.stepper, this.graph, this.checkOut);
  }

  get(key) {
    return this.model.get(key);
  }

  set(key, value) {
    this.model.set(key, value);
    this.model.save_changes();
  }

  buildToolbar() {
    this.noGrad = h("input", { type: "checkbox", class: "agm-nograd" });
    this.noGrad.addEventListener("change", () => this.set("no_grad", this.noGrad.checked));
    this.reset = h("button", { class: "agm-reset", text: "reset toggles", type: "button" });
    this.reset.addEventListener("click", () => {
      this.model.set("no_grad", false);
      this.model.set("detach_ids", []);
      this.set("flip_ids", []);
    });
    this.check = h("button", { class: "agm-check", text: "check gradients", type: "button" });
    this.check.addEventListener("click", () => this.set("request_check", this.get("request_check") + 1));
    this.status = h("span", { class: "agm-status" });
    const noGradLabel = h("label", { class: "agm-toggle", title: "Re-run the whole cell under torch.no_grad()" }, this.noGrad, " no_grad");
    this.toolbar = h("div", { class: "agm-toolbar" }, noGradLabel, this.reset, this.check, this.status);
  }

  // The id a toggle names: the real run's record (a variant's rows carry it as `oid`).
  toggleTarget(row) {
    if (row.oid !== undefined) return row.oid;
    return this.get("payload").variant ? null : row.id;
  }

  detachCell(row) {
    const target = this.toggleTarget(row);
    if (target === null) return h("td", { class: "agm-c-detach" });
    const box = h("input", { type: "checkbox", class: "agm-detach", title: "detach this tensor and re-run the cell" });
    box.checked = this.get("detach_ids").includes(target);
    box.addEventListener("click", (ev) => ev.stopPropagation());
    box.addEventListener("change", () => {
      const ids = new Set(this.get("detach_ids"));
      box.checked ? ids.add(target) : ids.delete(target);
      this.set("detach_ids", sortIds(ids));
    });
    return h("td", { class: "agm-c-detach" }, box);
  }

  flipButton(row) {
    const target = this.toggleTarget(row);
    if (!row.can_flip || target === null) return null;
    const flipped = this.get("flip_ids").includes(target);
    const btn = h("button", {
      type: "button",
      class: "agm-flip" + (flipped ? " agm-on" : ""),
      text: "flip",
      title: "re-run with this leaf's requires_grad flipped",
    });
    btn.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const ids = new Set(this.get("flip_ids"));
      flipped ? ids.delete(target) : ids.add(target);
      this.set("flip_ids", sortIds(ids));
    });
    return btn;
  }

  rowEl(row, cls) {
    const classes = ["agm-row", cls, row.detached && "agm-detached", row.new && "agm-new"];
    const tr = h("tr", { class: classes.filter(Boolean).join(" "), "data-id": row.id }, this.detachCell(row));
    for (const [key] of COLUMNS) tr.appendChild(this.dataCell(row, key));
    tr.addEventListener("click", () => this.set("selected", row.id));
    return tr;
  }

  dataCell(row, key) {
    const changed = (row.changed || []).includes(key);
    const td = h("td", { class: "agm-c-" + key.replace("_", "-") + (changed ? " agm-changed" : "") });
    td.appendChild(h("span", { class: "agm-v", text: key === "label" ? labelText(row) : cellText(row, key) }));
    if (key === "label") {
      if (row.repeats) td.appendChild(h("span", { class: "agm-muted", text: ` (+${row.repeats} more runs)` }));
      if (row.external) td.appendChild(h("span", { class: "agm-muted", text: " (from outside the cell)" }));
    }
    if (key === "grad" && row.grad_note) td.appendChild(h("div", { class: "agm-note", text: row.grad_note }));
    if (key === "requires_grad") {
      const flip = this.flipButton(row);
      if (flip) td.appendChild(flip);
    }
    if (changed && row.was && key in row.was) td.title = "original run: " + cellText(row.was, key);
    return td;
  }

  drawTable(p) {
    const head = h("tr", {}, h("th", { text: "detach", title: "detach and re-run" }), COLUMNS.map(([, t]) => h("th", { text: t })));
    const body = h("tbody");
    for (const group of p.lines) {
      body.appendChild(lineRow(group));
      if (p.error && p.error.line === group.line) body.appendChild(errorRow(p.error));
      for (const row of group.rows) body.appendChild(this.rowEl(row, ""));
      for (const call of group.folded) body.append(...this.foldedRows(group, call));
    }
    if (p.error && !p.lines.some((g) => g.line === p.error.line)) body.appendChild(errorRow(p.error));
    if (p.hidden_rows) body.appendChild(noteRow(`${p.hidden_rows} more tensors not shown (see the Trace's records)`));
    this.table.replaceChildren(h("thead", {}, head), body);
  }

  foldedRows(group, call) {
    const key = `${group.line}:${call.call}`;
    const open = this.expanded.has(key);
    const label = (open ? "▾ " : "▸ ") + `${call.count} ops inside ${call.call}`;
    const summary = h("tr", { class: "agm-fold" }, h("td", { colspan: SPAN }, h("button", { type: "button", class: "agm-fold-btn", text: label })));
    summary.addEventListener("click", () => {
      open ? this.expanded.delete(key) : this.expanded.add(key);
      this.drawAll();
    });
    if (!open) return [summary];
    const rows = call.rows.map((r) => this.rowEl(r, "agm-internal"));
    if (call.count > call.rows.length) rows.push(noteRow(`… ${call.count - call.rows.length} more`));
    return [summary, ...rows];
  }

  // ---- the detail panel ----
  drawDetail() {
    const d = this.get("detail") || {};
    if (d.id === undefined) {
      this.detail.replaceChildren(h("p", { class: "agm-muted", text: "Select a row or a graph node to see it in full." }));
      return;
    }
    const inputs = (d.inputs || []).map((i) => {
      const link = h("button", { type: "button", class: "agm-link", text: i.label });
      link.addEventListener("click", () => this.set("selected", i.id));
      return link;
    });
    this.detail.replaceChildren(...detailNodes(d, inputs));
  }

  // ---- the graph: Graphviz SVG whose record nodes are titled r<id> ----
  drawGraph() {
    const text = this.get("graph_svg");
    if (!text) return this.graph.replaceChildren();
    const { svg, text: fallback } = safeSvg(text);
    if (!svg) {
      // no SVG (layout timed out or failed): show the fallback's text, never its markup
      return this.graph.replaceChildren(h("pre", { class: "agm-muted", text: fallback }));
    }
    for (const g of svg.querySelectorAll("g.node")) {
      const id = nodeRecordId(g);
      if (id === null) continue;
      g.classList.add("agm-gnode");
      g.setAttribute("data-id", String(id));
      g.addEventListener("click", () => this.set("selected", id));
    }
    this.graph.replaceChildren(svg);
    this.highlight();
  }

  // ---- the backward stepper ----
  currentPass() {
    const passes = this.get("payload").passes || [];
    return passes.length ? [Math.min(this.get("pass_index"), passes.length - 1), passes] : [-1, passes];
  }

  drawStepper() {
    const [pi, passes] = this.currentPass();
    if (pi < 0) return this.stepper.replaceChildren();
    const steps = passes[pi].steps;
    const step = this.get("step");
    const pick = h("select", { class: "agm-pass" }, passes.map((p, i) => h("option", { value: i, text: `pass ${i + 1}: ${p.expr || p.kind}` })));
    pick.value = String(pi);
    pick.addEventListener("change", () => {
      this.model.set("pass_index", Number(pick.value));
      this.set("step", -1);
    });
    const prev = h("button", { type: "button", class: "agm-prev", text: "◀ previous" });
    const next = h("button", { type: "button", class: "agm-next", text: "next ▶" });
    const slider = h("input", { type: "range", class: "agm-slider", min: -1, max: steps.length - 1 });
    slider.value = String(step);
    prev.addEventListener("click", () => this.set("step", Math.max(-1, step - 1)));
    next.addEventListener("click", () => this.set("step", Math.min(steps.length - 1, step + 1)));
    slider.addEventListener("input", () => this.set("step", Number(slider.value)));
    const bar = h("div", { class: "agm-stepper-bar" }, h("strong", { text: "backward" }), passes.length > 1 ? pick : null, prev, slider, next);
    const error = passes[pi].error ? h("div", { class: "agm-errtext", text: passes[pi].error }) : null;
    this.stepper.replaceChildren(...[bar, h("div", { class: "agm-step-text", text: stepText(steps, step) }), error].filter(Boolean));
  }

  // ---- selection and step highlights, in the table and the graph at once ----
  highlight() {
    const sel = this.get("selected");
    const [pi, passes] = this.currentPass();
    const s = pi < 0 ? null : passes[pi].steps[this.get("step")];
    const stepIds = new Set(s ? s.records : []);
    for (const node of this.root.querySelectorAll("[data-id]")) {
      const id = Number(node.getAttribute("data-id"));
      node.classList.toggle("agm-selected", id === sel);
      node.classList.toggle("agm-step", stepIds.has(id));
    }
  }

  // A selection made in the graph may name an op folded inside a call: unfold it and show the row.
  onSelect() {
    const sel = this.get("selected");
    for (const group of this.get("payload").lines || []) {
      for (const call of group.folded) {
        const key = `${group.line}:${call.call}`;
        if (!this.expanded.has(key) && call.rows.some((r) => r.id === sel)) {
          this.expanded.add(key);
          this.drawAll();
        }
      }
    }
    this.highlight();
    const row = this.table.querySelector(`tr.agm-row[data-id="${Number(sel)}"]`);
    if (row) row.scrollIntoView({ block: "nearest" });
  }

  drawAll() {
    const p = this.get("payload") || {};
    if (!p.lines) return;
    this.noGrad.checked = this.get("no_grad");
    for (const control of [this.noGrad, this.reset, this.check]) control.disabled = !p.can_rerun;
    const notes = (p.notes || []).map((n) => h("div", { class: "agm-muted", text: n }));
    const variant = p.variant
      ? h("div", { class: "agm-variant", text: `Variant (your variables are untouched): ${p.variant.text}. Changed cells are highlighted; hover for the original.` })
      : null;
    this.banner.replaceChildren(...[variant, ...notes].filter(Boolean));
    this.drawTable(p);
    this.drawStepper();
    const check = p.gradcheck ? [h("h5", { text: "gradient check" }), h("pre", { text: p.gradcheck.join("\n") })] : [];
    this.checkOut.replaceChildren(...check);
    this.highlight();
  }

  drawStatus() {
    this.status.textContent = this.get("busy") ? "re-running…" : this.get("status");
    this.status.classList.toggle("agm-errtext", !!this.get("status"));
  }

  handlers() {
    return {
      "change:payload change:detach_ids change:flip_ids": () => this.drawAll(),
      "change:no_grad": () => (this.noGrad.checked = this.get("no_grad")),
      "change:detail": () => this.drawDetail(),
      "change:graph_svg": () => this.drawGraph(),
      "change:selected": () => this.onSelect(),
      "change:step change:pass_index": () => (this.drawStepper(), this.highlight()),
      "change:status change:busy": () => this.drawStatus(),
    };
  }
}

// ---- small pieces without state ----

function labelText(row) {
  let text = row.expr && row.name ? `${row.name} = ${row.expr}` : cellText(row, "label");
  if (row.occurrence) text += "  #" + (row.occurrence + 1);
  return text;
}

function lineRow(group) {
  const where = group.line === null ? "from earlier cells" : `line ${group.line}`;
  const td = h("td", { colspan: SPAN }, h("span", { class: "agm-lineno", text: where }), h("code", { text: group.source || "" }));
  return h("tr", { class: "agm-line", "data-line": group.line === null ? "" : group.line }, td);
}

function noteRow(text) {
  return h("tr", {}, h("td", { colspan: SPAN, class: "agm-muted", text }));
}

function errorRow(err) {
  const text = `${err.type}: ${err.message}` + (err.line ? ` (line ${err.line})` : "");
  const td = h("td", { colspan: SPAN }, h("div", { class: "agm-errtext", text }));
  if (err.explain) td.appendChild(h("div", { class: "agm-note", text: err.explain }));
  return h("tr", { class: "agm-error" }, td);
}

function stepText(steps, step) {
  if (steps[step]) return `step ${step + 1}/${steps.length} — ${steps[step].text}`;
  return steps.length ? `${steps.length} steps: press next to walk the backward pass` : "no autograd node ran in this pass";
}

function detailNodes(d, inputs) {
  const pre = (text) => h("pre", { class: "agm-value", text });
  const nodes = [
    h("h4", { text: d.label }),
    d.line ? h("div", { class: "agm-src" }, h("span", { class: "agm-lineno", text: `line ${d.line}` }), h("code", { text: d.source })) : null,
    pre(d.value),
    h("div", { class: "agm-muted", text: [d.shape, d.dtype, d.stats].filter(Boolean).join("  ") }),
    h("div", { class: "agm-facts", text: d.facts.join(" · ") }),
    inputs.length ? h("div", {}, "inputs: ", inputs) : null,
  ];
  if (d.passes && d.passes.length) {
    nodes.push(h("h5", { text: "backward passes" }));
    for (const p of d.passes) {
      nodes.push(h("div", { class: "agm-muted", text: `pass ${p.index + 1} (${p.where})` }));
      nodes.push(p.grad ? pre(p.grad) : h("div", { class: "agm-note", text: "did not reach this tensor" }));
    }
    nodes.push(h("div", { class: "agm-attr" }, h("code", { text: ".grad" }), " after the cell: "));
    nodes.push(d.attr_grad ? pre(d.attr_grad) : h("div", { class: "agm-note", text: "None" }));
  }
  if (d.why && d.why.length) nodes.push(h("ul", { class: "agm-why" }, d.why.map((w) => h("li", { text: w }))));
  if (d.original) {
    nodes.push(h("h5", { text: "in the original run" }), pre(d.original.value));
    nodes.push(h("div", { class: "agm-muted", text: "grad: " + d.original.grad }));
  }
  return nodes.filter(Boolean);
}

function render({ model, el }) {
  const view = new View(model, el);
  const pairs = Object.entries(view.handlers()).flatMap(([events, fn]) => events.split(" ").map((ev) => [ev, fn]));
  for (const [ev, fn] of pairs) model.on(ev, fn);
  view.drawAll();
  view.drawDetail();
  view.drawGraph();
  view.drawStatus();
  return () => {
    for (const [ev, fn] of pairs) model.off(ev, fn);
  };
}

export default { render };

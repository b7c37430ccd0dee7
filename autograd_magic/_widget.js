// The front end of autograd_magic's view: draws what Python sends, sends back ids and switches.
// Every string from the payload goes into the page through textContent, never parsed as markup;
// the graph SVG (made by Graphviz in Python) is parsed as SVG and stripped of scripts.

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

function safeSvg(text) {
  // Graphviz output made in Python: parsed inertly (DOMParser runs no scripts), then stripped
  // of scripts, event handlers and outside links before it joins the page.
  const doc = new DOMParser().parseFromString(text, "text/html");
  const svg = doc.querySelector("svg");
  if (!svg) return { svg: null, text: doc.body.textContent };
  for (const bad of svg.querySelectorAll("script, foreignObject, iframe")) bad.remove();
  for (const el of [svg, ...svg.querySelectorAll("*")]) {
    for (const attr of [...el.attributes]) {
      const name = attr.name.toLowerCase();
      const isLink = name === "href" || name === "xlink:href";
      if (name.startsWith("on") || (isLink && !attr.value.startsWith("#"))) el.removeAttribute(attr.name);
    }
  }
  return { svg: document.importNode(svg, true), text: "" };
}

function nodeRecordId(g) {
  const title = g.querySelector("title");
  const m = title && /^r(\d+)$/.exec(title.textContent.trim());
  return m ? Number(m[1]) : null;
}

function render({ model, el }) {
  const set = (key, value) => {
    model.set(key, value);
    model.save_changes();
  };
  const root = h("div", { class: "agm-root" });
  el.appendChild(root);

  // ---- toolbar ----
  const noGrad = h("input", { type: "checkbox", class: "agm-nograd" });
  noGrad.addEventListener("change", () => set("no_grad", noGrad.checked));
  const reset = h("button", { class: "agm-reset", text: "reset toggles", type: "button" });
  reset.addEventListener("click", () => {
    model.set("no_grad", false);
    model.set("detach_ids", []);
    model.set("flip_ids", []);
    model.save_changes();
  });
  const check = h("button", { class: "agm-check", text: "check gradients", type: "button" });
  check.addEventListener("click", () => set("request_check", model.get("request_check") + 1));
  const status = h("span", { class: "agm-status" });
  const toolbar = h(
    "div",
    { class: "agm-toolbar" },
    h("label", { class: "agm-toggle", title: "Re-run the whole cell under torch.no_grad()" }, noGrad, " no_grad"),
    reset,
    check,
    status,
  );
  const banner = h("div", { class: "agm-banner" });
  const table = h("table", { class: "agm-table" });
  const detail = h("div", { class: "agm-detail" });
  const main = h("div", { class: "agm-main" }, h("div", { class: "agm-table-wrap" }, table), detail);
  const graph = h("div", { class: "agm-graph" });
  const stepper = h("div", { class: "agm-stepper" });
  const checkOut = h("div", { class: "agm-gradcheck" });
  root.append(toolbar, banner, main, stepper, graph, checkOut);
  const expanded = new Set(); // call lines whose internal ops are unfolded

  // ---- table ----
  function toggleControl(row) {
    const target = row.oid !== undefined ? row.oid : model.get("payload").variant ? null : row.id;
    if (target === null) return h("td", { class: "agm-c-detach" });
    const box = h("input", {
      type: "checkbox",
      class: "agm-detach",
      title: "detach this tensor and re-run the cell",
    });
    box.checked = model.get("detach_ids").includes(target);
    box.addEventListener("click", (ev) => ev.stopPropagation());
    box.addEventListener("change", () => {
      const ids = new Set(model.get("detach_ids"));
      box.checked ? ids.add(target) : ids.delete(target);
      set("detach_ids", [...ids].sort((a, b) => a - b));
    });
    return h("td", { class: "agm-c-detach" }, box);
  }

  function flipControl(row) {
    const target = row.oid !== undefined ? row.oid : model.get("payload").variant ? null : row.id;
    if (!row.can_flip || target === null) return null;
    const flipped = model.get("flip_ids").includes(target);
    const btn = h("button", {
      type: "button",
      class: "agm-flip" + (flipped ? " agm-on" : ""),
      text: "flip",
      title: "re-run with this leaf's requires_grad flipped",
    });
    btn.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const ids = new Set(model.get("flip_ids"));
      flipped ? ids.delete(target) : ids.add(target);
      set("flip_ids", [...ids].sort((a, b) => a - b));
    });
    return btn;
  }

  function rowEl(row, cls) {
    const changed = new Set(row.changed || []);
    const tr = h("tr", {
      class: ["agm-row", cls, row.detached && "agm-detached", row.new && "agm-new"].filter(Boolean).join(" "),
      "data-id": row.id,
    });
    tr.appendChild(toggleControl(row));
    for (const [key] of COLUMNS) {
      const td = h("td", { class: "agm-c-" + key.replace("_", "-") + (changed.has(key) ? " agm-changed" : "") });
      let text = cellText(row, key);
      if (key === "label") {
        if (row.expr && row.name) text = row.name + " = " + row.expr;
        if (row.occurrence) text += "  #" + (row.occurrence + 1);
        if (row.repeats) td.appendChild(h("span", { class: "agm-muted", text: ` (+${row.repeats} more runs)` }));
        if (row.external) td.appendChild(h("span", { class: "agm-muted", text: " (from outside the cell)" }));
      }
      td.prepend(h("span", { class: "agm-v", text }));
      if (key === "grad" && row.grad_note) td.appendChild(h("div", { class: "agm-note", text: row.grad_note }));
      if (key === "requires_grad") {
        const f = flipControl(row);
        if (f) td.appendChild(f);
      }
      if (changed.has(key) && row.was && key in row.was) td.title = "original run: " + cellText(row.was, key);
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => set("selected", row.id));
    return tr;
  }

  function drawTable(p) {
    table.replaceChildren();
    const head = h("tr", {}, h("th", { text: "detach", title: "detach and re-run" }), COLUMNS.map(([, t]) => h("th", { text: t })));
    table.appendChild(h("thead", {}, head));
    const body = h("tbody");
    for (const group of p.lines) {
      const lineText = group.line === null ? "from earlier cells" : `line ${group.line}`;
      body.appendChild(
        h(
          "tr",
          { class: "agm-line", "data-line": group.line === null ? "" : group.line },
          h("td", { colspan: COLUMNS.length + 1 }, h("span", { class: "agm-lineno", text: lineText }), h("code", { text: group.source || "" })),
        ),
      );
      if (p.error && p.error.line === group.line) body.appendChild(errorRow(p.error));
      for (const row of group.rows) body.appendChild(rowEl(row, ""));
      for (const call of group.folded) body.append(...foldedRows(group, call));
    }
    if (p.error && !p.lines.some((g) => g.line === p.error.line)) body.appendChild(errorRow(p.error));
    if (p.hidden_rows) {
      body.appendChild(h("tr", {}, h("td", { colspan: COLUMNS.length + 1, class: "agm-muted", text: `${p.hidden_rows} more tensors not shown (see the Trace's records)` })));
    }
    table.appendChild(body);
  }

  function errorRow(err) {
    const text = `${err.type}: ${err.message}` + (err.line ? ` (line ${err.line})` : "");
    const td = h("td", { colspan: COLUMNS.length + 1 }, h("div", { class: "agm-errtext", text }));
    if (err.explain) td.appendChild(h("div", { class: "agm-note", text: err.explain }));
    return h("tr", { class: "agm-error" }, td);
  }

  function foldedRows(group, call) {
    const key = `${group.line}:${call.call}`;
    const open = expanded.has(key);
    const summary = h(
      "tr",
      { class: "agm-fold" },
      h("td", { colspan: COLUMNS.length + 1 }, h("button", { type: "button", class: "agm-fold-btn", text: (open ? "▾ " : "▸ ") + `${call.count} ops inside ${call.call}` })),
    );
    summary.addEventListener("click", () => {
      open ? expanded.delete(key) : expanded.add(key);
      drawAll();
    });
    if (!open) return [summary];
    const rows = call.rows.map((r) => rowEl(r, "agm-internal"));
    if (call.count > call.rows.length) {
      rows.push(h("tr", {}, h("td", { colspan: COLUMNS.length + 1, class: "agm-muted", text: `… ${call.count - call.rows.length} more` })));
    }
    return [summary, ...rows];
  }

  // ---- detail panel ----
  function drawDetail() {
    const d = model.get("detail") || {};
    detail.replaceChildren();
    if (d.id === undefined) {
      detail.appendChild(h("p", { class: "agm-muted", text: "Select a row or a graph node to see it in full." }));
      return;
    }
    detail.append(
      ...[
        h("h4", { text: d.label }),
        d.line ? h("div", { class: "agm-src" }, h("span", { class: "agm-lineno", text: `line ${d.line}` }), h("code", { text: d.source })) : null,
        h("pre", { class: "agm-value", text: d.value }),
        h("div", { class: "agm-muted", text: [d.shape, d.dtype, d.stats].filter(Boolean).join("  ") }),
        h("div", { class: "agm-facts", text: d.facts.join(" · ") }),
      ].filter(Boolean),
    );
    if (d.inputs && d.inputs.length) {
      const links = d.inputs.map((i) => {
        const a = h("button", { type: "button", class: "agm-link", text: i.label });
        a.addEventListener("click", () => set("selected", i.id));
        return a;
      });
      detail.appendChild(h("div", {}, "inputs: ", links));
    }
    if (d.passes && d.passes.length) {
      detail.appendChild(h("h5", { text: "backward passes" }));
      for (const p of d.passes) {
        detail.appendChild(h("div", { class: "agm-muted", text: `pass ${p.index + 1} (${p.where})` }));
        detail.appendChild(p.grad ? h("pre", { class: "agm-value", text: p.grad }) : h("div", { class: "agm-note", text: "did not reach this tensor" }));
      }
      detail.appendChild(h("div", { class: "agm-attr" }, h("code", { text: ".grad" }), " after the cell: "));
      detail.appendChild(d.attr_grad ? h("pre", { class: "agm-value", text: d.attr_grad }) : h("div", { class: "agm-note", text: "None" }));
    }
    if (d.why && d.why.length) detail.appendChild(h("ul", { class: "agm-why" }, d.why.map((w) => h("li", { text: w }))));
    if (d.original) {
      detail.appendChild(h("h5", { text: "in the original run" }));
      detail.appendChild(h("pre", { class: "agm-value", text: d.original.value }));
      detail.appendChild(h("div", { class: "agm-muted", text: "grad: " + d.original.grad }));
    }
  }

  // ---- graph ----
  function drawGraph() {
    graph.replaceChildren();
    const text = model.get("graph_svg");
    if (!text) return;
    const { svg, text: fallback } = safeSvg(text);
    if (svg) {
      for (const g of svg.querySelectorAll("g.node")) {
        const id = nodeRecordId(g);
        if (id === null) continue;
        g.classList.add("agm-gnode");
        g.setAttribute("data-id", String(id));
        g.addEventListener("click", () => set("selected", id));
      }
      graph.appendChild(svg);
    } else {
      // no SVG (layout timed out or failed): show the fallback's text, never its markup
      graph.appendChild(h("pre", { class: "agm-muted", text: fallback }));
    }
    highlight();
  }

  // ---- backward stepper ----
  function currentSteps() {
    const passes = model.get("payload").passes || [];
    const p = passes[Math.min(model.get("pass_index"), passes.length - 1)];
    return p ? p.steps : [];
  }

  function drawStepper() {
    stepper.replaceChildren();
    const passes = model.get("payload").passes || [];
    if (!passes.length) return;
    const pi = Math.min(model.get("pass_index"), passes.length - 1);
    const steps = passes[pi].steps;
    const step = model.get("step");
    const pick = h("select", { class: "agm-pass" }, passes.map((p, i) => h("option", { value: i, text: `pass ${i + 1}: ${p.expr || p.kind}` })));
    pick.value = String(pi);
    pick.addEventListener("change", () => {
      model.set("pass_index", Number(pick.value));
      set("step", -1);
    });
    const prev = h("button", { type: "button", class: "agm-prev", text: "◀ previous" });
    const next = h("button", { type: "button", class: "agm-next", text: "next ▶" });
    const slider = h("input", { type: "range", class: "agm-slider", min: -1, max: steps.length - 1 });
    slider.value = String(step);
    prev.addEventListener("click", () => set("step", Math.max(-1, step - 1)));
    next.addEventListener("click", () => set("step", Math.min(steps.length - 1, step + 1)));
    slider.addEventListener("input", () => set("step", Number(slider.value)));
    const s = steps[step];
    const idle = steps.length ? `${steps.length} steps: press next to walk the backward pass` : "no autograd node ran in this pass";
    const text = s ? `step ${step + 1}/${steps.length} — ${s.text}` : idle;
    stepper.append(h("div", { class: "agm-stepper-bar" }, h("strong", { text: "backward" }), passes.length > 1 ? pick : null, prev, slider, next), h("div", { class: "agm-step-text", text }));
    if (passes[pi].error) stepper.appendChild(h("div", { class: "agm-errtext", text: passes[pi].error }));
  }

  // ---- selection and step highlights, in the table and the graph at once ----
  function highlight() {
    const sel = model.get("selected");
    const s = currentSteps()[model.get("step")];
    const stepIds = new Set(s ? s.records : []);
    for (const node of root.querySelectorAll("[data-id]")) {
      const id = Number(node.getAttribute("data-id"));
      node.classList.toggle("agm-selected", id === sel);
      node.classList.toggle("agm-step", stepIds.has(id));
    }
  }

  function drawAll() {
    const p = model.get("payload") || {};
    if (!p.lines) return;
    noGrad.checked = model.get("no_grad");
    noGrad.disabled = !p.can_rerun;
    reset.disabled = !p.can_rerun;
    check.disabled = !p.can_rerun;
    banner.replaceChildren();
    if (p.variant) {
      banner.appendChild(h("div", { class: "agm-variant", text: "Variant (your variables are untouched): " + p.variant.text + ". Changed cells are highlighted; hover for the original." }));
    }
    for (const n of p.notes || []) banner.appendChild(h("div", { class: "agm-muted", text: n }));
    drawTable(p);
    drawStepper();
    checkOut.replaceChildren();
    if (p.gradcheck) checkOut.append(h("h5", { text: "gradient check" }), h("pre", { text: p.gradcheck.join("\n") }));
    highlight();
  }

  // A selection made in the graph may name an op folded inside a call: unfold it and show the row.
  function onSelect() {
    const sel = model.get("selected");
    const p = model.get("payload") || {};
    for (const group of p.lines || []) {
      for (const call of group.folded) {
        const key = `${group.line}:${call.call}`;
        if (!expanded.has(key) && call.rows.some((r) => r.id === sel)) {
          expanded.add(key);
          drawAll();
        }
      }
    }
    highlight();
    const row = table.querySelector(`tr.agm-row[data-id="${Number(sel)}"]`);
    if (row) row.scrollIntoView({ block: "nearest" });
  }

  const drawStatus = () => {
    status.textContent = model.get("busy") ? "re-running…" : model.get("status");
    status.classList.toggle("agm-errtext", !!model.get("status"));
  };
  const onStep = () => {
    drawStepper();
    highlight();
  };
  const handlers = {
    "change:payload": drawAll,
    "change:detach_ids change:flip_ids": drawAll,
    "change:no_grad": () => (noGrad.checked = model.get("no_grad")),
    "change:detail": drawDetail,
    "change:graph_svg": drawGraph,
    "change:selected": onSelect,
    "change:step change:pass_index": onStep,
    "change:status change:busy": drawStatus,
  };
  const each = (fn) => Object.entries(handlers).forEach(([evs, h]) => evs.split(" ").forEach((ev) => fn(ev, h)));
  each((ev, fn) => model.on(ev, fn));
  drawAll();
  drawDetail();
  drawGraph();
  drawStatus();
  return () => {
    each((ev, fn) => model.off(ev, fn));
  };
}

export default { render };

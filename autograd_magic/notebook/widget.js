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

// Name, value and gradient side by side; the rest is in the detail panel, or shown on demand
// ("all columns"). The name is the variable alone: the line header above shows the source.
const MAIN_COLUMNS = [
  ["label", "detach · name"],
  ["value", "value"],
  ["grad", "grad"],
];
const MORE_COLUMNS = [
  ["grad_fn", "grad_fn"],
  ["requires_grad", "requires_grad"],
  ["is_leaf", "is_leaf"],
  ["shape", "shape"],
  ["dtype", "dtype"],
];

// Liveness: the page pings Python (a custom message) on render and before each action it sends;
// no pong within these many ms means the object behind this view is gone with its kernel.
const PING_TIMEOUT_RENDER = 8000;
const PING_TIMEOUT_ACTION = 5000;
const TOGGLES = { no_grad: 1, detach_ids: 1, flip_ids: 1 }; // what a dead kernel leaves undone
const DEAD_TEXT = "This view's kernel is gone (restarted or shut down): re-run the cell to explore it again.";
// The explorer's one request in flight is given up after this long without an answer (the next
// slider step is then sent): a kernel that is only slow still answers, and late answers are dropped.
const EXPLORE_TIMES = 100; // slider-to-view times kept in data-ms
const EXPLORE_TIMEOUT = 15000;

// Zoom limits of the graph, relative to its natural size (1 = Graphviz's points at 96 dpi).
const ZOOM_MIN = 0.05;
const ZOOM_MAX = 4;
const PX_PER_PT = 4 / 3;
const GRAPH_MIN_H = 100;
const GRAPH_MAX_H = 560;

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

const sortIds = (ids) => [...ids].sort((a, b) => a - b);

// ---- the view: toolbar, table (rows grouped by source line), detail, stepper, graph ----

class View {
  constructor(model, el) {
    this.model = model;
    this.el = el;
    this.expanded = new Set(); // "line:call" keys whose internal ops are unfolded
    this.allColumns = false;
    this.dead = false;
    this.unconfirmed = {};
    this.pingN = 0;
    this.pingTimer = null;
    this.timers = [];
    this.hidden = []; // [element, its display before] of the snapshot outputs this view hides
    // What the page asked Python for (custom messages), kept for the payload's version they answer:
    // table rows past the first screen, backward steps past the first few, the graph's SVG.
    this.version = null;
    this.pages = []; // answers to {"type": "rows"}: more line groups, in table order
    this.loadedRows = 0;
    this.steps = {}; // pass index -> sparse array of steps
    this.asked = new Set(); // questions sent and not yet answered
    this.graphText = null; // null: not arrived yet
    this.root = h("div", { class: "agm-root" });
    el.appendChild(this.root);
    this.buildToolbar();
    this.deadLine = h("div", { class: "agm-dead-line", hidden: true, text: DEAD_TEXT });
    this.banner = h("div", { class: "agm-banner" });
    this.debugBox = h("div", { class: "agm-debug" }); // issue 16: the first NaN/Inf, gradient flow
    this.table = h("table", { class: "agm-table" });
    this.tableWrap = h("div", { class: "agm-table-wrap" }, this.table);
    this.detail = h("div", { class: "agm-detail" });
    const main = h("div", { class: "agm-main" }, this.tableWrap, this.detail);
    this.stepper = h("div", { class: "agm-stepper" });
    this.buildGraph();
    this.buildExplore();
    this.checkOut = h("div", { class: "agm-gradcheck" });
    this.root.append(this.toolbar, this.deadLine, this.debugBox, this.banner, main, this.explore, this.stepper, this.graph, this.checkOut);
  }

  get(key) {
    return this.model.get(key);
  }

  // Every change the user makes goes to Python after a ping, so a dead kernel is noticed.
  set(key, value) {
    this.ping(PING_TIMEOUT_ACTION);
    this.remember(key);
    this.model.set(key, value);
    this.model.save_changes();
  }

  // What a change replaced, until Python answers: a dead kernel never re-ran it, so it is undone.
  remember(key) {
    if (this.dead || !(key in TOGGLES) || key in this.unconfirmed) return;
    this.unconfirmed[key] = this.get(key);
  }

  buildToolbar() {
    this.noGrad = h("input", { type: "checkbox", class: "agm-nograd" });
    this.noGrad.addEventListener("change", () => this.set("no_grad", this.noGrad.checked));
    this.reset = h("button", { class: "agm-reset", text: "reset toggles", type: "button" });
    this.reset.addEventListener("click", () => {
      this.ping(PING_TIMEOUT_ACTION);
      this.remember("no_grad");
      this.remember("detach_ids");
      this.model.set("no_grad", false);
      this.model.set("detach_ids", []);
      this.set("flip_ids", []);
      this.resetExplore();
    });
    this.check = h("button", { class: "agm-check", text: "check gradients", type: "button" });
    this.check.addEventListener("click", () => this.set("request_check", this.get("request_check") + 1));
    this.columnsBox = h("input", { type: "checkbox", class: "agm-allcols" });
    this.columnsBox.addEventListener("change", () => {
      this.allColumns = this.columnsBox.checked; // a local view choice: nothing goes to Python
      this.drawAll();
    });
    const columnsLabel = h(
      "label",
      { class: "agm-toggle", title: "Show grad_fn, requires_grad, is_leaf, shape and dtype as columns (the detail panel always has them)" },
      this.columnsBox,
      " all columns",
    );
    this.status = h("span", { class: "agm-status" });
    const noGradLabel = h("label", { class: "agm-toggle", title: "Re-run the whole cell under torch.no_grad()" }, this.noGrad, " no_grad");
    this.toolbar = h("div", { class: "agm-toolbar" }, noGradLabel, this.reset, this.check, columnsLabel, this.status);
  }

  columns() {
    return this.allColumns ? [...MAIN_COLUMNS, ...MORE_COLUMNS] : MAIN_COLUMNS;
  }

  // ---- is Python still there? ----
  ping(timeout) {
    if (this.pingTimer !== null) return; // one question at a time; its answer covers later ones
    const n = ++this.pingN;
    try {
      this.model.send({ type: "ping", n });
    } catch (e) {
      // no comm at all (a view drawn from saved state): the timer below says so
    }
    this.pingTimer = setTimeout(() => {
      this.pingTimer = null;
      this.setDead(true);
    }, timeout);
  }

  // A question to Python (the answer comes as a custom message); each is sent once.
  ask(question) {
    const key = JSON.stringify(question);
    if (this.dead || this.asked.has(key)) return;
    this.asked.add(key);
    try {
      this.model.send(question);
    } catch (e) {
      this.asked.delete(key); // no comm (a view drawn from saved state): nothing to ask
    }
  }

  onCustom(msg) {
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "graph") return this.onGraph(msg);
    if (msg.type === "steps") return this.onSteps(msg);
    if (msg.type === "rows") return this.onRows(msg);
    if (msg.type === "explored") return this.onExplored(msg);
    if (msg.type !== "pong") return;
    if (this.pingTimer !== null) clearTimeout(this.pingTimer);
    this.pingTimer = null;
    this.unconfirmed = {};
    this.setDead(false); // a late answer revives a view that was only slow (a busy kernel)
  }

  setDead(dead) {
    if (this.dead === dead) return;
    this.dead = dead;
    if (dead) {
      for (const [key, value] of Object.entries(this.unconfirmed)) this.model.set(key, value); // local only
      this.unconfirmed = {};
      this.dropExplore();
    }
    this.deadLine.hidden = !dead;
    this.root.classList.toggle("agm-is-dead", dead);
    if (!dead) this.asked.clear(); // questions lost to a kernel that seemed gone may be asked again
    this.drawAll();
    if (this.graphText === null) this.drawGraph();
  }

  // ---- what was asked for: kept while the payload it belongs to is the one shown ----
  checkVersion() {
    const v = (this.get("payload") || {}).version;
    if (v === this.version) return;
    this.version = v;
    this.pages = [];
    this.steps = {};
    this.loadedRows = countRows((this.get("payload") || {}).lines || []);
    for (const key of [...this.asked]) if (!key.includes('"graph"')) this.asked.delete(key);
  }

  current(msg) {
    this.checkVersion();
    return msg.version === this.version;
  }

  onRows(msg) {
    this.asked.delete(JSON.stringify({ type: "rows", start: msg.start }));
    if (!this.current(msg) || msg.start !== this.loadedRows || !Array.isArray(msg.lines)) return;
    this.pages.push(msg);
    this.loadedRows += countRows(msg.lines);
    this.drawAll();
  }

  onSteps(msg) {
    this.asked.delete(JSON.stringify({ type: "steps", pass: msg.pass, start: msg.start }));
    if (!this.current(msg) || !Array.isArray(msg.steps)) return;
    const have = (this.steps[msg.pass] = this.steps[msg.pass] || []);
    msg.steps.forEach((s, k) => (have[msg.start + k] = s));
    const [pi] = this.currentPass();
    if (pi === msg.pass) this.onStep();
  }

  onGraph(msg) {
    this.graphText = typeof msg.svg === "string" ? msg.svg : "";
    this.drawGraph();
  }

  // The table's line groups: the first screen's, then each page asked for, merged by line and call.
  lines() {
    this.checkVersion();
    const p = this.get("payload") || {};
    if (!this.pages.length) return p.lines || [];
    const out = (p.lines || []).map((g) => ({ ...g, rows: [...g.rows], folded: g.folded.map((c) => ({ ...c, rows: [...c.rows] })) }));
    for (const page of this.pages) {
      for (const g of page.lines) {
        let into = out.find((o) => o.line === g.line);
        if (!into) out.push((into = { ...g, rows: [], folded: [] }));
        into.rows.push(...g.rows);
        for (const c of g.folded) {
          const call = into.folded.find((o) => o.call === c.call);
          if (call) call.rows.push(...c.rows);
          else into.folded.push({ ...c, rows: [...c.rows] });
        }
      }
    }
    return out;
  }

  moreRows() {
    this.checkVersion();
    const last = this.pages[this.pages.length - 1] || this.get("payload") || {};
    return last.more_rows || 0;
  }

  // ---- the snapshot output published next to this widget ----
  // Python marks it with a class naming this model; it is looked for around this view (nearest
  // enclosing element first), so in Lab, Notebook 7 or any page that keeps outputs side by side
  // the live view is shown alone. Outputs can arrive after the view is drawn: look a few times.
  hideSnapshot() {
    const marker = this.get("snapshot_class");
    if (!marker || !/^agm-snapshot-[A-Za-z0-9]+$/.test(marker)) return;
    const find = () => {
      for (let node = this.el.parentElement; node && node !== document.documentElement; node = node.parentElement) {
        const found = [...node.getElementsByClassName(marker)].filter((snap) => !snap.contains(this.el));
        if (!found.length) continue;
        for (const snap of found) {
          const child = snap.closest(".jp-OutputArea-child");
          const target = child && !child.contains(this.el) ? child : snap;
          if (this.hidden.some(([el]) => el === target)) continue;
          this.hidden.push([target, target.style.display]);
          target.style.display = "none";
          if (this.dead && this.graphText === null && !this.svg) this.drawGraph(); // its saved drawing
        }
        return;
      }
    };
    for (const ms of [0, 100, 500, 1500, 4000]) this.timers.push(setTimeout(find, ms));
    const area = this.el.closest(".jp-OutputArea");
    if (area && typeof MutationObserver !== "undefined") {
      this.observer = new MutationObserver(find);
      this.observer.observe(area, { childList: true });
    }
  }

  // The graph's SVG inside the snapshot output this view hides (null when there is none); it goes
  // through safeSvg like any other.
  savedGraph() {
    const DATA = "data:image/svg+xml,";
    for (const [el] of this.hidden) {
      const img = el.querySelector(".am-graph img");
      const src = img ? img.getAttribute("src") || "" : "";
      if (src.startsWith(DATA)) {
        try {
          return decodeURIComponent(src.slice(DATA.length));
        } catch (e) {
          return null; // not a drawing we wrote
        }
      }
      const svg = el.querySelector(".am-graph svg"); // a snapshot saved before the graph was an image
      if (svg && typeof XMLSerializer !== "undefined") return new XMLSerializer().serializeToString(svg);
    }
    return null;
  }

  destroy() {
    for (const t of this.timers) clearTimeout(t);
    if (this.pingTimer !== null) clearTimeout(this.pingTimer);
    if (this.observer) this.observer.disconnect();
    if (this.resizer) this.resizer.disconnect();
    // the widget is gone from the page (closed, cleared): its snapshot may show again
    for (const [el, display] of this.hidden) el.style.display = display;
  }

  // The id a toggle names: the real run's record (a variant's rows carry it as `oid`).
  toggleTarget(row) {
    if (row.oid !== undefined) return row.oid;
    return this.get("payload").variant ? null : row.id;
  }

  detachBox(row, live) {
    const target = this.toggleTarget(row);
    if (target === null) return null;
    const box = h("input", { type: "checkbox", class: "agm-detach", title: "detach this tensor and re-run the cell" });
    box.checked = this.get("detach_ids").includes(target);
    box.disabled = !live;
    box.addEventListener("click", (ev) => ev.stopPropagation());
    box.addEventListener("change", () => {
      const ids = new Set(this.get("detach_ids"));
      box.checked ? ids.add(target) : ids.delete(target);
      this.set("detach_ids", sortIds(ids));
    });
    return box;
  }

  flipButton(row, live) {
    const target = this.toggleTarget(row);
    if (!row.can_flip || target === null) return null;
    const flipped = this.get("flip_ids").includes(target);
    const btn = h("button", {
      type: "button",
      class: "agm-flip" + (flipped ? " agm-on" : ""),
      text: "flip",
      title: "re-run with this leaf's requires_grad flipped",
    });
    btn.disabled = !live;
    btn.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const ids = new Set(this.get("flip_ids"));
      flipped ? ids.delete(target) : ids.add(target);
      this.set("flip_ids", sortIds(ids));
    });
    return btn;
  }

  rowEl(row, cls, live) {
    const classes = ["agm-row", cls, row.detached && "agm-detached", row.new && "agm-new", row.moved && "agm-moved-row"];
    const tr = h("tr", { class: classes.filter(Boolean).join(" "), "data-id": row.id });
    for (const [key] of this.columns()) tr.appendChild(this.dataCell(row, key, live));
    tr.addEventListener("click", () => this.set("selected", row.id));
    return tr;
  }

  dataCell(row, key, live) {
    const changed = (row.changed || []).includes(key);
    const moved = (row.moved || []).includes(key); // changed from the run shown before (a slider step)
    const td = h("td", { class: "agm-c-" + key.replace("_", "-") + (changed ? " agm-changed" : "") + (moved ? " agm-moved" : "") });
    if (key === "label") {
      td.appendChild(h("span", { class: "agm-c-detach" }, this.detachBox(row, live)));
      td.title = fullLabel(row);
    }
    td.appendChild(h("span", { class: "agm-v", text: key === "label" ? labelText(row) : cellText(row, key) }));
    if (key === "label") {
      if (row.repeats) td.appendChild(h("span", { class: "agm-muted", text: ` (+${row.repeats} more runs)` }));
    }
    if (key === "grad" && row.grad_note) td.appendChild(h("div", { class: "agm-note", text: row.grad_note }));
    if (key === "requires_grad") {
      const flip = this.flipButton(row, live);
      if (flip) td.appendChild(flip);
    }
    if (changed && row.was && key in row.was) td.title = "original run: " + cellText(row.was, key);
    return td;
  }

  drawTable(p, live) {
    const span = this.columns().length;
    const head = h("tr", {}, this.columns().map(([key, t]) => h("th", { class: "agm-h-" + key.replace("_", "-"), text: t })));
    const body = h("tbody");
    const lines = this.lines();
    for (const group of lines) {
      body.appendChild(lineRow(group, span));
      if (p.error && p.error.line === group.line) body.appendChild(errorRow(p.error, span));
      for (const row of group.rows) body.appendChild(this.rowEl(row, "", live));
      for (const call of group.folded) body.append(...this.foldedRows(group, call, span, live));
    }
    if (p.error && !lines.some((g) => g.line === p.error.line)) body.appendChild(errorRow(p.error, span));
    const more = this.moreRows();
    if (more) {
      const button = h("button", { type: "button", class: "agm-more-rows", text: `show more rows (${more} not loaded yet)` });
      button.disabled = this.dead;
      button.addEventListener("click", () => {
        button.disabled = true;
        button.textContent = "loading…";
        this.ask({ type: "rows", start: this.loadedRows });
      });
      body.appendChild(h("tr", {}, h("td", { colspan: span }, button)));
    }
    if (p.hidden_rows) body.appendChild(noteRow(`${p.hidden_rows} more tensors not shown (see the Trace's records)`, span));
    this.table.replaceChildren(h("thead", {}, head), body);
  }

  foldedRows(group, call, span, live) {
    const key = `${group.line}:${call.call}`;
    const open = this.expanded.has(key);
    const label = (open ? "▾ " : "▸ ") + `${call.count} ops inside ${call.call}`;
    const summary = h("tr", { class: "agm-fold" }, h("td", { colspan: span }, h("button", { type: "button", class: "agm-fold-btn", text: label })));
    summary.addEventListener("click", () => {
      open ? this.expanded.delete(key) : this.expanded.add(key);
      this.drawAll();
    });
    if (!open) return [summary];
    const rows = call.rows.map((r) => this.rowEl(r, "agm-internal", live));
    if (call.count > call.rows.length) rows.push(noteRow(`… ${call.count - call.rows.length} more`, span));
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

  // ---- debugging (issue 16): where the first NaN/Inf appeared, the training-loop and gradient-flow charts ----
  // Sentences go in as text; each one's button selects its record (row and graph node). The
  // chart's SVG goes through safeSvg; its bars carry ids p<record>, localized to …-p<record>.
  drawDebug(d) {
    if (!d) return this.debugBox.replaceChildren();
    const line = (text, id) => {
      if (id === null || id === undefined) return h("span", { text });
      const link = h("button", { type: "button", class: "agm-link agm-debug-link", text, title: "select this tensor" });
      link.addEventListener("click", () => this.set("selected", id));
      return link;
    };
    const out = [];
    if (d.forward) {
      const inputs = (d.forward.inputs || []).map((s) => h("div", { class: "agm-muted", text: s }));
      out.push(h("div", { class: "agm-debug-nf" }, line(d.forward.text, d.forward.id), ...inputs));
    }
    for (const b of d.backward || []) out.push(h("div", { class: "agm-debug-nf" }, line(b.text, b.id)));
    if (d.more_backward) out.push(h("div", { class: "agm-muted", text: `… and ${d.more_backward} more backward passes` }));
    if (d.training) {
      const { svg } = safeSvg(d.training.svg);
      const summary = h("summary", { text: "training loop" });
      out.push(h("details", { class: "agm-flow agm-training", open: true }, summary, svg, h("div", { class: "agm-muted", text: d.training.summary })));
    }
    if (d.flow) out.push(this.flowChart(d.flow));
    this.debugBox.replaceChildren(...out);
  }

  // One pass's bar chart; with several passes (`passes`), a button per pass switches the chart.
  flowChart(flow) {
    const passes = Array.isArray(flow.passes) && flow.passes.length ? flow.passes : [flow];
    const chart = h("div", { class: "agm-flow-chart" });
    const caption = h("div", { class: "agm-muted agm-flow-summary" });
    const show = (k) => {
      const { svg } = safeSvg(String(passes[k].svg || ""));
      for (const g of svg ? svg.querySelectorAll("g[id]") : []) {
        const m = /-p(\d+)$/.exec(g.getAttribute("id") || "");
        if (!m) continue;
        g.setAttribute("data-id", m[1]);
        g.classList.add("agm-flow-bar");
        g.addEventListener("click", () => this.set("selected", Number(m[1])));
      }
      chart.replaceChildren(...(svg ? [svg] : []));
      caption.textContent = String(passes[k].summary || "");
      buttons.forEach((b, i) => b.setAttribute("aria-pressed", String(i === k)));
    };
    const buttons = passes.length > 1
      ? passes.map((p, k) => {
          const b = h("button", { type: "button", class: "agm-zoom-btn agm-flow-pass", text: String(p.label || `pass ${k + 1}`) });
          b.addEventListener("click", () => show(k));
          return b;
        })
      : [];
    const picker = buttons.length ? [h("div", { class: "agm-flow-passes" }, h("span", { class: "agm-muted", text: "backward pass: " }), ...buttons)] : [];
    const k = Number.isInteger(flow.selected) && flow.selected >= 0 && flow.selected < passes.length ? flow.selected : passes.length - 1;
    show(k);
    return h("details", { class: "agm-flow", open: true }, h("summary", { text: "gradient flow" }), ...picker, chart, caption);
  }

  // ---- the graph: Graphviz SVG whose record nodes are titled r<id>, fitted, zoomed, panned ----
  buildGraph() {
    const button = (text, title, fn) => {
      const b = h("button", { type: "button", class: "agm-zoom-btn", text, title });
      b.addEventListener("click", fn);
      return b;
    };
    this.zoomOut = button("−", "zoom out", () => this.zoomBy(1 / 1.25));
    this.zoomIn = button("+", "zoom in", () => this.zoomBy(1.25));
    this.zoomFit = button("fit", "fit the whole graph to the width", () => this.fitGraph());
    this.zoomLabel = h("span", { class: "agm-zoom-label agm-muted" });
    this.graphBar = h(
      "div",
      { class: "agm-graph-bar" },
      h("strong", { text: "graph" }),
      this.zoomOut, this.zoomIn, this.zoomFit, this.zoomLabel,
      h("span", { class: "agm-muted", text: "drag to pan, ctrl+wheel to zoom" }),
    );
    this.graphPane = h("div", { class: "agm-graph-pane" });
    this.graph = h("div", { class: "agm-graph" }, this.graphBar, this.graphPane);
    this.gv = null; // {x, y, w, h}: the graph's own box, in its units (points)
    this.attachPanZoom();
    if (typeof ResizeObserver !== "undefined") {
      let lastWidth = 0;
      this.resizer = new ResizeObserver(() => {
        const w = this.graphPane.clientWidth;
        if (!this.gv || w === lastWidth) return;
        lastWidth = w;
        this.fitted ? this.fitGraph() : this.applyView();
      });
      this.resizer.observe(this.graphPane);
    }
  }

  drawGraph() {
    const wanted = (this.get("payload") || {}).graph !== false;
    let text = this.graphText;
    // no kernel to lay it out (a saved notebook reopened): the drawing its snapshot saved, if any
    if (text === null && wanted && this.dead) text = this.savedGraph();
    this.gv = null;
    if (text === null && wanted) {
      // asked for when the view is drawn; Python lays it out after the cell has returned
      this.ask({ type: "graph" });
      this.graph.hidden = false;
      this.graphBar.hidden = true;
      this.graphPane.style.height = "";
      const say = this.dead ? "The graph is drawn by the kernel, which is gone: re-run the cell to see it." : "laying out the graph…";
      return this.graphPane.replaceChildren(h("div", { class: "agm-muted agm-graph-wait", text: say }));
    }
    if (!text) {
      this.graph.hidden = true;
      return this.graphPane.replaceChildren();
    }
    this.graph.hidden = false;
    const { svg, text: fallback } = safeSvg(text);
    if (!svg) {
      // no SVG (layout timed out or failed): show the fallback's text, never its markup
      this.graphBar.hidden = true;
      this.graphPane.style.height = "";
      return this.graphPane.replaceChildren(h("pre", { class: "agm-graph-text", text: fallback }));
    }
    this.graphBar.hidden = false;
    for (const g of svg.querySelectorAll("g.node")) {
      const id = nodeRecordId(g);
      if (id === null) continue;
      g.classList.add("agm-gnode");
      g.setAttribute("data-id", String(id));
      g.addEventListener("click", (ev) => {
        if (this.dragged) return ev.stopPropagation(); // the end of a pan, not a click
        this.set("selected", id);
      });
    }
    const vb = svg.viewBox && svg.viewBox.baseVal;
    const num = (v) => parseFloat(String(v || "").replace(/[a-z]+$/i, "")) || 0;
    this.gv = vb && vb.width > 0 && vb.height > 0
      ? { x: vb.x, y: vb.y, w: vb.width, h: vb.height }
      : { x: 0, y: 0, w: num(svg.getAttribute("width")) || 100, h: num(svg.getAttribute("height")) || 100 };
    svg.removeAttribute("width");
    svg.removeAttribute("height");
    svg.setAttribute("preserveAspectRatio", "xMidYMid meet");
    this.svg = svg;
    this.graphPane.replaceChildren(svg);
    this.fitGraph();
    this.highlight();
  }

  paneWidth() {
    return this.graphPane.clientWidth || this.root.clientWidth || 600;
  }

  // The whole graph in the pane's width (never enlarged past its natural size); the pane is as
  // tall as the fitted graph, within limits.
  fitGraph() {
    if (!this.gv) return;
    const w = this.paneWidth();
    const natural = PX_PER_PT;
    let scale = Math.min(natural, w / this.gv.w);
    const height = Math.max(GRAPH_MIN_H, Math.min(GRAPH_MAX_H, Math.ceil(this.gv.h * scale) + 8));
    scale = Math.min(scale, (height - 8) / this.gv.h);
    this.paneHeight = height;
    this.scale = scale; // px per graph unit
    this.cx = this.gv.x + this.gv.w / 2;
    this.cy = this.gv.y + this.gv.h / 2;
    this.fitted = true;
    this.applyView();
  }

  applyView() {
    if (!this.gv || !this.svg) return;
    const w = this.paneWidth();
    const hgt = this.paneHeight || GRAPH_MIN_H;
    this.graphPane.style.height = hgt + "px";
    this.svg.style.width = "100%";
    this.svg.style.height = hgt + "px";
    const vw = w / this.scale;
    const vh = hgt / this.scale;
    this.svg.setAttribute("viewBox", `${this.cx - vw / 2} ${this.cy - vh / 2} ${vw} ${vh}`);
    this.zoomLabel.textContent = `${Math.round((this.scale / PX_PER_PT) * 100)}%`;
  }

  // Zoom about a point of the pane (its centre by default), in pane pixels.
  zoomBy(factor, px, py) {
    if (!this.gv) return;
    const w = this.paneWidth();
    const hgt = this.paneHeight || GRAPH_MIN_H;
    if (px === undefined) [px, py] = [w / 2, hgt / 2];
    const next = Math.max(ZOOM_MIN * PX_PER_PT, Math.min(ZOOM_MAX * PX_PER_PT, this.scale * factor));
    // the graph point under (px, py) stays under it
    const ux = this.cx + (px - w / 2) / this.scale;
    const uy = this.cy + (py - hgt / 2) / this.scale;
    this.cx = ux - (px - w / 2) / next;
    this.cy = uy - (py - hgt / 2) / next;
    this.scale = next;
    this.fitted = false;
    this.applyView();
  }

  attachPanZoom() {
    const pane = this.graphPane;
    let start = null;
    pane.addEventListener("pointerdown", (ev) => {
      if (!this.gv || ev.button !== 0) return;
      start = { x: ev.clientX, y: ev.clientY, cx: this.cx, cy: this.cy, id: ev.pointerId };
      this.dragged = false;
    });
    pane.addEventListener("pointermove", (ev) => {
      if (!start || ev.pointerId !== start.id) return;
      const dx = ev.clientX - start.x;
      const dy = ev.clientY - start.y;
      if (!this.dragged && Math.hypot(dx, dy) < 4) return;
      if (!this.dragged) {
        this.dragged = true;
        try {
          pane.setPointerCapture(ev.pointerId);
        } catch (e) {
          // capture is a nicety
        }
        pane.classList.add("agm-panning");
      }
      this.cx = start.cx - dx / this.scale;
      this.cy = start.cy - dy / this.scale;
      this.fitted = false;
      this.applyView();
    });
    const end = () => {
      start = null;
      pane.classList.remove("agm-panning");
      // the click that ends a drag comes right after pointerup: forget the drag after it
      setTimeout(() => (this.dragged = false), 0);
    };
    pane.addEventListener("pointerup", end);
    pane.addEventListener("pointercancel", end);
    pane.addEventListener(
      "wheel",
      (ev) => {
        if (!this.gv || !(ev.ctrlKey || ev.metaKey)) return; // a plain wheel scrolls the notebook
        ev.preventDefault();
        const r = pane.getBoundingClientRect();
        this.zoomBy(Math.exp(-ev.deltaY / 300), ev.clientX - r.left, ev.clientY - r.top);
      },
      { passive: false },
    );
  }

  // Pan (zoom unchanged) so that these records' nodes are inside the pane.
  bringIntoView(ids) {
    if (!this.gv || !ids.length) return;
    const pane = this.graphPane.getBoundingClientRect();
    if (!pane.width) return;
    let box = null;
    for (const id of ids) {
      for (const g of this.graphPane.querySelectorAll(`g.agm-gnode[data-id="${Number(id)}"]`)) {
        const r = g.getBoundingClientRect();
        box = box
          ? { l: Math.min(box.l, r.left), t: Math.min(box.t, r.top), r: Math.max(box.r, r.right), b: Math.max(box.b, r.bottom) }
          : { l: r.left, t: r.top, r: r.right, b: r.bottom };
      }
    }
    if (!box) return;
    const margin = 12;
    let dx = 0;
    let dy = 0;
    if (box.l < pane.left + margin) dx = box.l - pane.left - margin;
    else if (box.r > pane.right - margin) dx = Math.min(box.r - pane.right + margin, box.l - pane.left - margin);
    if (box.t < pane.top + margin) dy = box.t - pane.top - margin;
    else if (box.b > pane.bottom - margin) dy = Math.min(box.b - pane.bottom + margin, box.t - pane.top - margin);
    if (!dx && !dy) return;
    this.cx += dx / this.scale;
    this.cy += dy / this.scale;
    this.fitted = false;
    this.applyView();
  }

  // ---- the explorer: per scalar input a slider and a number box, the curve; the Jacobian ----
  // The curve's SVG is Python's (one renderer for the snapshot and this view), rebuilt through
  // safeSvg like the graph; every other string is set as text. At most one request is in flight:
  // while Python re-runs the cell, slider steps only replace the one waiting (no backlog).
  buildExplore() {
    this.exploreInputs = h("div", { class: "agm-explore-inputs" });
    this.exploreReason = h("div", { class: "agm-muted agm-explore-reason" });
    this.exploreNote = h("div", { class: "agm-muted agm-explore-note" });
    this.jacobian = h("div", { class: "agm-jacobian" });
    this.explore = h(
      "div",
      { class: "agm-explore", hidden: true },
      h("h5", { text: "explore" }),
      this.exploreReason,
      this.exploreInputs,
      this.jacobian,
      this.exploreNote,
    );
    this.exploreKey = null; // the inputs the controls were built for
    this.controls = new Map(); // record id -> {slider, number, plot, slope, secant, note}
    this.exploreSeq = 0;
    this.inFlight = null; // {seq, t0, timer}: the request Python has not answered yet
    this.pending = null; // {values, t0}: the latest position, waiting for that answer
    this.sentValues = null; // what the last request sent (JSON): the same again is not sent
  }

  buildControls(inputs, key) {
    this.exploreKey = key;
    this.controls.clear();
    const rows = inputs.map((input) => {
      const rec = input.record;
      const step = input.step > 0 ? input.step : "any";
      const slider = h("input", { type: "range", class: "agm-explore-slider", "data-record": rec, min: input.lo, max: input.hi, step });
      const number = h("input", { type: "number", class: "agm-explore-number", "data-record": rec, step });
      slider.addEventListener("input", () => {
        number.value = slider.value;
        this.exploreInput(performance.now());
      });
      // Enter applies the box (and stays here: Lab's own Enter would leave for the cell's editor)
      number.addEventListener("keydown", (e) => {
        e.stopPropagation();
        if (e.key === "Enter") number.dispatchEvent(new Event("change"));
      });
      number.addEventListener("change", () => {
        if (number.value === "" || !Number.isFinite(Number(number.value))) return;
        slider.value = number.value; // the slider clamps to its range; the box keeps the exact value
        this.exploreInput(performance.now());
      });
      const plot = h("div", { class: "agm-explore-plot" });
      const slope = h("div", { class: "agm-explore-slope" });
      const secant = h("div", { class: "agm-explore-secant" });
      const note = h("div", { class: "agm-note" });
      const where = input.external ? " (from an earlier cell)" : "";
      const bar = h("div", { class: "agm-explore-bar" }, h("code", { text: input.label }), slider, number, h("span", { class: "agm-muted", text: where }));
      this.controls.set(rec, { slider, number, plot, slope, secant, note });
      return h("div", { class: "agm-explore-input", "data-record": rec }, bar, plot, slope, secant, note);
    });
    this.exploreInputs.replaceChildren(...rows);
  }

  drawExplore(p, live) {
    const ex = p.explore;
    const inputs = (ex && ex.inputs) || [];
    if (!ex || (!inputs.length && !ex.jacobian)) {
      this.explore.hidden = true;
      this.exploreInputs.replaceChildren();
      this.jacobian.replaceChildren();
      this.exploreKey = null;
      this.controls.clear();
      return;
    }
    this.explore.hidden = false;
    const key = JSON.stringify(inputs.map((i) => [i.record, i.lo, i.hi, i.step]));
    if (key !== this.exploreKey) this.buildControls(inputs, key);
    const curves = new Map((ex.curves || []).map((c) => [c.input, c]));
    for (const input of inputs) {
      const c = this.controls.get(input.record);
      c.slider.disabled = c.number.disabled = !live;
      const curve = curves.get(input.record);
      const svg = curve && curve.svg ? safeSvg(curve.svg).svg : null;
      c.plot.replaceChildren(...(svg ? [svg] : []));
      c.slope.textContent = curve ? curve.caption : "";
      c.secant.textContent = curve ? curve.secant_text : "";
      c.note.textContent = curve ? curve.note || "" : "";
    }
    this.syncControls();
    let reason = "";
    if (inputs.length && !live) {
      reason = this.dead
        ? "The sliders need the kernel, which is gone: re-run the cell to move them."
        : "The sliders re-run the cell, which this view cannot do (the note above says why).";
    }
    this.exploreReason.textContent = reason;
    this.exploreNote.textContent = ex.note || "";
    this.jacobian.replaceChildren(...jacobianNodes(ex.jacobian));
  }

  // The controls show the values of the run shown, unless the user is moving them right now.
  syncControls() {
    if (this.inFlight !== null || this.pending !== null) return;
    const ex = (this.get("payload") || {}).explore;
    for (const input of (ex && ex.inputs) || []) {
      const c = this.controls.get(input.record);
      if (!c || input.current === null || input.current === undefined) continue;
      c.slider.value = String(input.current);
      c.number.value = String(input.current);
    }
  }

  exploreValues() {
    const out = {};
    for (const [rec, c] of this.controls) {
      const v = Number(c.number.value);
      if (c.number.value !== "" && Number.isFinite(v)) out[rec] = v;
    }
    return out;
  }

  exploreInput(t0) {
    this.pending = { values: this.exploreValues(), t0 };
    this.flushExplore();
  }

  flushExplore() {
    if (this.inFlight !== null || this.pending === null || this.dead) return;
    const { values, t0 } = this.pending;
    this.pending = null;
    const text = JSON.stringify(values);
    if (text === this.sentValues) return this.syncControls();
    const seq = ++this.exploreSeq;
    this.ping(PING_TIMEOUT_ACTION);
    try {
      this.model.send({ type: "explore", values, seq });
    } catch (e) {
      return; // no comm (a view drawn from saved state): the sliders are disabled there
    }
    this.sentValues = text;
    const timer = setTimeout(() => {
      if (!this.inFlight || this.inFlight.seq !== seq) return;
      this.inFlight = null;
      this.sentValues = null;
      this.flushExplore();
    }, EXPLORE_TIMEOUT);
    this.inFlight = { seq, t0, timer };
    this.explore.classList.add("agm-exploring");
  }

  // Python answers after it set the new payload, but ipywidgets applies a state update
  // asynchronously and a custom message at once: the answer can overtake its payload. A request
  // is done when both are here (the payload of the answer's version drawn): then the time from the
  // slider's input event goes in data-ms, and the latest position, if it moved on, is sent.
  onExplored(msg) {
    if (!this.inFlight || msg.seq !== this.inFlight.seq) return;
    this.inFlight.answer = msg;
    this.finishExplored();
  }

  finishExplored() {
    const done = this.inFlight;
    if (!done || !done.answer) return;
    const version = (this.get("payload") || {}).version;
    if (done.answer.version !== undefined && version !== done.answer.version) return; // its payload is on the way
    clearTimeout(done.timer);
    this.inFlight = null;
    // the last EXPLORE_TIMES of them, as JSON (the browser test reads the median and the worst)
    this.exploreTimes = [...(this.exploreTimes || []), Math.round((performance.now() - done.t0) * 10) / 10].slice(-EXPLORE_TIMES);
    this.explore.setAttribute("data-ms", JSON.stringify(this.exploreTimes));
    this.explore.setAttribute("data-seq", String(done.answer.seq));
    this.explore.classList.remove("agm-exploring");
    if (this.pending) return this.flushExplore();
    this.syncControls(); // a refused value: the controls go back to the run shown
    // the slider rests: the graph, left at an earlier run while it moved, is laid out again
    if (done.answer.graph_stale && this.graphText !== null) {
      try {
        this.model.send({ type: "graph" });
      } catch (e) {
        // no comm: nothing to ask
      }
    }
  }

  dropExplore() {
    if (this.inFlight) clearTimeout(this.inFlight.timer);
    this.inFlight = null;
    this.pending = null;
    this.sentValues = null;
    this.explore.classList.remove("agm-exploring");
  }

  // "reset toggles" puts the inputs back at the cell's values too.
  resetExplore() {
    const ex = (this.get("payload") || {}).explore;
    const inputs = (ex && ex.inputs) || [];
    if (!inputs.some((i) => i.current !== i.value)) return;
    for (const i of inputs) {
      const c = this.controls.get(i.record);
      if (c && i.value !== null) c.slider.value = c.number.value = String(i.value);
    }
    this.exploreInput(performance.now());
  }

  // ---- the backward stepper ----
  currentPass() {
    const passes = this.get("payload").passes || [];
    return passes.length ? [Math.min(this.get("pass_index"), passes.length - 1), passes] : [-1, passes];
  }

  // Pass `pi`'s steps as far as they are here: the first screen's, then what was asked for.
  passSteps(pi, passes) {
    this.checkVersion();
    const first = passes[pi].steps || [];
    const have = this.steps[pi] || [];
    const n = passes[pi].n_steps === undefined ? first.length : passes[pi].n_steps;
    const steps = new Array(n);
    for (let k = 0; k < n; k++) steps[k] = first[k] || have[k];
    return steps;
  }

  // Ask for the step shown (and the ones just after it) before the stepper gets there.
  fetchSteps(pi, steps, step) {
    for (const k of [step, step + 1, step + 5]) {
      if (k < 0 || k >= steps.length || steps[k]) continue;
      let start = k;
      while (start > 0 && !steps[start - 1] && k - start < 19) start--;
      this.ask({ type: "steps", pass: pi, start });
      return;
    }
  }

  drawStepper() {
    const [pi, passes] = this.currentPass();
    if (pi < 0) return this.stepper.replaceChildren();
    const steps = this.passSteps(pi, passes);
    const step = this.get("step");
    this.fetchSteps(pi, steps, step);
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

  stepIds() {
    const [pi, passes] = this.currentPass();
    const s = pi < 0 ? null : this.passSteps(pi, passes)[this.get("step")];
    return s ? s.records : [];
  }

  onStep() {
    this.drawStepper();
    this.highlight();
    this.bringIntoView(this.stepIds());
  }

  // ---- selection and step highlights, in the table and the graph at once ----
  highlight() {
    const sel = this.get("selected");
    const stepIds = new Set(this.stepIds());
    for (const node of this.root.querySelectorAll("[data-id]")) {
      const id = Number(node.getAttribute("data-id"));
      node.classList.toggle("agm-selected", id === sel);
      node.classList.toggle("agm-step", stepIds.has(id));
    }
  }

  // A selection made in the graph may name an op folded inside a call: unfold it and show the row.
  onSelect() {
    const sel = this.get("selected");
    for (const group of this.lines()) {
      for (const call of group.folded) {
        const key = `${group.line}:${call.call}`;
        if (!this.expanded.has(key) && call.rows.some((r) => r.id === sel)) {
          this.expanded.add(key);
          this.drawAll();
        }
      }
    }
    this.highlight();
    // Scroll the table's own box only: scrollIntoView would also scroll the notebook and can
    // carry the graph (where the click came from) off the screen.
    const row = this.table.querySelector(`tr.agm-row[data-id="${Number(sel)}"]`);
    if (row) {
      const wrap = this.tableWrap;
      const top = row.offsetTop;
      const head = this.table.tHead ? this.table.tHead.offsetHeight : 0;
      if (top - head < wrap.scrollTop) wrap.scrollTop = top - head;
      else if (top + row.offsetHeight > wrap.scrollTop + wrap.clientHeight) wrap.scrollTop = top + row.offsetHeight - wrap.clientHeight;
    }
    if (sel >= 0) this.bringIntoView([sel]);
  }

  drawAll() {
    const p = this.get("payload") || {};
    if (!p.lines) return;
    const live = !!p.can_rerun && !this.dead;
    this.noGrad.checked = this.get("no_grad");
    for (const control of [this.noGrad, this.reset, this.check]) control.disabled = !live;
    this.columnsBox.checked = this.allColumns;
    const notes = (p.notes || []).map((n) => h("div", { class: "agm-muted", text: n }));
    const variant = p.variant
      ? h("div", { class: "agm-variant", text: `Variant (your variables are untouched): ${p.variant.text}. Changed cells are highlighted; hover for the original.` })
      : null;
    this.banner.replaceChildren(...[variant, ...notes].filter(Boolean));
    this.drawDebug(p.debug);
    this.drawTable(p, live);
    this.drawExplore(p, live);
    this.drawStepper();
    const check = p.gradcheck ? [h("h5", { text: "gradient check" }), h("pre", { text: p.gradcheck.join("\n") })] : [];
    this.checkOut.replaceChildren(...check);
    this.highlight();
    this.finishExplored(); // an explorer's answer that came before this payload is done now
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
      "change:selected": () => this.onSelect(),
      "change:step change:pass_index": () => this.onStep(),
      "change:status change:busy": () => this.drawStatus(),
      "msg:custom": (msg) => this.onCustom(msg),
    };
  }
}

// ---- small pieces without state ----

// The variable's name alone (the line header shows the source); an unnamed op, its expression.
function labelText(row) {
  let text = row.name ? String(row.name) : cellText(row, "label");
  if (row.occurrence) text += "  #" + (row.occurrence + 1);
  return text;
}

function fullLabel(row) {
  const text = row.expr && row.name ? `${row.name} = ${row.expr}` : cellText(row, "label");
  if (!row.external) return text;
  return text + (row.made_in ? ` (${row.made_in})` : " (from outside the cell)");
}

function lineRow(group, span) {
  const where = group.line === null ? "from earlier cells" : `line ${group.line}`;
  const td = h("td", { colspan: span }, h("span", { class: "agm-lineno", text: where }), h("code", { text: group.source || "" }));
  return h("tr", { class: "agm-line", "data-line": group.line === null ? "" : group.line }, td);
}

function noteRow(text, span) {
  return h("tr", {}, h("td", { colspan: span, class: "agm-muted", text }));
}

function errorRow(err, span) {
  const text = `${err.type}: ${err.message}` + (err.line ? ` (line ${err.line})` : "");
  const td = h("td", { colspan: span }, h("div", { class: "agm-errtext", text }));
  if (err.explain) td.appendChild(h("div", { class: "agm-note", text: err.explain }));
  return h("tr", { class: "agm-error" }, td);
}
function countRows(lines) {
  let n = 0;
  for (const g of lines) {
    n += g.rows.length;
    for (const c of g.folded) n += c.rows.length;
  }
  return n;
}

function stepText(steps, step) {
  if (steps[step]) return `step ${step + 1}/${steps.length} — ${steps[step].text}`;
  if (step >= 0 && step < steps.length) return `step ${step + 1}/${steps.length} — loading…`;
  return steps.length ? `${steps.length} steps: press next to walk the backward pass` : "no autograd node ran in this pass";
}

// The Jacobian's grid as Python worded it (render/explore.py jacobian_parts): J's rows, each led by
// its entry of v when backward() was given one, then v·J and the leaf's .grad under J's columns.
function jacobianNodes(jac) {
  if (!jac) return [];
  const rows = jac.rows || [];
  const labelled = rows.some((r) => r.label);
  const lead = labelled || !!jac.vj || !!jac.grad;
  const tr = (label, cells, head) =>
    h("tr", {}, lead ? h(head ? "th" : "td", { text: label }) : null, (cells || []).map((c) => h("td", { text: c })));
  const body = rows.map((r, k) => (!labelled && k === 0 ? tr("J", r.cells, true) : tr(r.label, r.cells, false)));
  if (jac.vj) body.push(tr("v·J", jac.vj, true));
  if (jac.grad) body.push(tr(jac.grad_label, jac.grad, true));
  const verdict = jac.verdict ? h("div", { class: jac.agrees ? "agm-ok" : "agm-errtext", text: jac.verdict }) : null;
  return [
    h("div", {}, h("strong", { text: "Jacobian " }), jac.title),
    body.length ? h("table", { class: "agm-jac-table" }, h("tbody", {}, body)) : null,
    verdict,
    jac.note ? h("div", { class: "agm-muted", text: jac.note }) : null,
  ].filter(Boolean);
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
      const none = p.before ? "ran before this tensor was made" : "did not reach this tensor";
      nodes.push(p.grad ? pre(p.grad) : h("div", { class: "agm-note", text: none }));
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
  view.hideSnapshot();
  view.ping(PING_TIMEOUT_RENDER);
  return () => {
    for (const [ev, fn] of pairs) model.off(ev, fn);
    view.destroy();
  };
}

export default { render };

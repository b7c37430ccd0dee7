// The widget's front end (autograd_magic/notebook/widget.js) in Node, on a minimal stand-in for
// the DOM: enough to draw the view and move the explorer's slider, not a browser. It runs the
// steps given as JSON on stdin against a fake model and prints what the page sent and showed.
//
//   node tests/explore_page.mjs path/to/widget.js < steps.json
//
// Steps: {"payload": {...}} sets the model's payload (as Python would), {"slide": [record, value]}
// moves a slider (an input event), {"type": "number", ...} types into the number box,
// {"answer": {...}} delivers a custom message, {"dead": true} lets the liveness ping time out.
// After each step the output records the messages sent so far and the explorer's state.

import { readFileSync } from "node:fs";

class ClassList {
  constructor(el) {
    this.el = el;
  }
  get set() {
    return new Set((this.el.getAttribute("class") || "").split(/\s+/).filter(Boolean));
  }
  write(set) {
    this.el.setAttribute("class", [...set].join(" "));
  }
  add(...names) {
    const s = this.set;
    names.forEach((n) => s.add(n));
    this.write(s);
  }
  remove(...names) {
    const s = this.set;
    names.forEach((n) => s.delete(n));
    this.write(s);
  }
  toggle(name, on) {
    const s = this.set;
    if (on === undefined ? !s.has(name) : on) s.add(name);
    else s.delete(name);
    this.write(s);
  }
  contains(name) {
    return this.set.has(name);
  }
}

class Node_ {
  constructor() {
    this.childNodes = [];
    this.parentElement = null;
  }
  appendChild(c) {
    if (c.parentElement) c.parentElement.childNodes = c.parentElement.childNodes.filter((x) => x !== c);
    c.parentElement = this;
    this.childNodes.push(c);
    return c;
  }
  append(...cs) {
    cs.forEach((c) => this.appendChild(typeof c === "string" ? new Text(c) : c));
  }
  replaceChildren(...cs) {
    this.childNodes.forEach((c) => (c.parentElement = null));
    this.childNodes = [];
    this.append(...cs);
  }
  get textContent() {
    return this.childNodes.map((c) => c.textContent).join("");
  }
  set textContent(v) {
    this.replaceChildren(new Text(String(v)));
  }
}

class Text extends Node_ {
  constructor(data) {
    super();
    this.data = data;
    this.nodeType = 3;
  }
  get textContent() {
    return this.data;
  }
}

// a compound selector without combinators: tag, .classes, [attr] or [attr="value"]
function matches(el, selector) {
  const m = /^([a-z0-9]*)((?:\.[\w-]+)*)((?:\[[\w-]+(?:="[^"]*")?\])*)$/i.exec(selector.trim());
  if (!m || !(el instanceof Element)) return false;
  if (m[1] && el.tagName !== m[1].toLowerCase()) return false;
  for (const c of m[2].split(".").filter(Boolean)) if (!el.classList.contains(c)) return false;
  for (const [, name, value] of m[3].matchAll(/\[([\w-]+)(?:="([^"]*)")?\]/g)) {
    if (!el.hasAttribute(name) || (value !== undefined && el.getAttribute(name) !== value)) return false;
  }
  return true;
}

class Element extends Node_ {
  constructor(tag) {
    super();
    this.tagName = tag.toLowerCase();
    this.attrs = new Map();
    this.listeners = {};
    this.style = {};
    this.classList = new ClassList(this);
    this.nodeType = 1;
    this.value = "";
    this.disabled = false;
    this.checked = false;
    this.hidden = false;
  }
  set className(v) {
    this.setAttribute("class", v);
  }
  get className() {
    return this.getAttribute("class") || "";
  }
  setAttribute(k, v) {
    this.attrs.set(k, String(v));
  }
  getAttribute(k) {
    return this.attrs.has(k) ? this.attrs.get(k) : null;
  }
  hasAttribute(k) {
    return this.attrs.has(k);
  }
  removeAttribute(k) {
    this.attrs.delete(k);
  }
  addEventListener(ev, fn) {
    (this.listeners[ev] = this.listeners[ev] || []).push(fn);
  }
  dispatch(ev) {
    for (const fn of this.listeners[ev] || []) fn({ stopPropagation() {}, preventDefault() {} });
  }
  descendants() {
    return this.childNodes.filter((c) => c instanceof Element).flatMap((c) => [c, ...c.descendants()]);
  }
  querySelectorAll(sel) {
    return this.descendants().filter((el) => matches(el, sel));
  }
  querySelector(sel) {
    return this.querySelectorAll(sel)[0] || null;
  }
  getElementsByClassName(name) {
    return this.descendants().filter((el) => el.classList.contains(name));
  }
  closest(sel) {
    for (let el = this; el; el = el.parentElement) if (matches(el, sel)) return el;
    return null;
  }
  contains(other) {
    for (let el = other; el; el = el.parentElement) if (el === this) return true;
    return false;
  }
}
// `k in el` decides property or attribute in widget.js's h(): these are properties, as in a browser
for (const k of ["value", "disabled", "checked", "hidden", "min", "max", "step", "type", "title"]) {
  if (!(k in Element.prototype)) Object.defineProperty(Element.prototype, k, { writable: true, value: undefined });
}

globalThis.document = {
  createElement: (tag) => new Element(tag),
  createElementNS: (_ns, tag) => new Element(tag),
  createTextNode: (data) => new Text(data),
  documentElement: null,
  title: "",
};
globalThis.Node = { TEXT_NODE: 3, ELEMENT_NODE: 1 };
// no SVG parsing here: safeSvg finds no <svg> and shows nothing (the browser tests check drawings)
globalThis.DOMParser = class {
  parseFromString() {
    return { getElementsByTagName: () => [], body: { textContent: "" } };
  }
};

const timers = [];
globalThis.setTimeout = (fn, ms) => {
  timers.push({ fn, ms, live: true });
  return timers.length - 1;
};
globalThis.clearTimeout = (id) => {
  if (timers[id]) timers[id].live = false;
};
function runTimers(atLeast) {
  for (const t of timers) {
    if (t.live && t.ms >= atLeast) {
      t.live = false;
      t.fn();
    }
  }
}

class Model {
  constructor(state) {
    this.state = state;
    this.handlers = {};
    this.sent = [];
  }
  get(k) {
    return this.state[k];
  }
  set(k, v) {
    this.state[k] = v;
    this.emit("change:" + k);
  }
  save_changes() {}
  send(content) {
    this.sent.push(JSON.parse(JSON.stringify(content)));
  }
  on(ev, fn) {
    (this.handlers[ev] = this.handlers[ev] || []).push(fn);
  }
  off() {}
  emit(ev, arg) {
    for (const fn of this.handlers[ev] || []) fn(arg);
  }
}

const widget = await import(process.argv[2]);
const steps = JSON.parse(readFileSync(0, "utf-8"));
const model = new Model({
  payload: {}, detail: {}, status: "", busy: false, snapshot_class: "", selected: -1,
  detach_ids: [], flip_ids: [], no_grad: false, step: -1, pass_index: 0, request_check: 0,
});
const el = new Element("div");
widget.default.render({ model, el });
const out = [];
const explore = () => el.querySelector("div.agm-explore");
for (const step of steps) {
  if (step.payload) model.set("payload", step.payload);
  if (step.slide) {
    const [rec, value] = step.slide;
    const slider = el.querySelector(`input.agm-explore-slider[data-record="${rec}"]`);
    slider.value = String(value);
    slider.dispatch("input");
  }
  if (step.type) {
    const [rec, value] = step.type;
    const box = el.querySelector(`input.agm-explore-number[data-record="${rec}"]`);
    box.value = String(value);
    box.dispatch("change");
  }
  if (step.answer) model.emit("msg:custom", step.answer);
  if (step.pong) model.emit("msg:custom", { type: "pong", n: 1 });
  if (step.dead) runTimers(5000);
  if (step.reset) el.querySelector("button.agm-reset").dispatch("click");
  const ex = explore();
  const sliders = el.querySelectorAll("input.agm-explore-slider");
  out.push({
    sent: model.sent.filter((m) => m.type === "explore"),
    hidden: ex.hidden,
    ms: ex.getAttribute("data-ms"),
    seq: ex.getAttribute("data-seq"),
    slope: el.querySelectorAll("div.agm-explore-slope").map((s) => s.textContent),
    sliders: sliders.map((s) => ({ record: s.getAttribute("data-record"), value: s.value, disabled: s.disabled, min: s.min, max: s.max })),
    numbers: el.querySelectorAll("input.agm-explore-number").map((s) => s.value),
    reason: el.querySelector("div.agm-explore-reason").textContent,
    jacobian: el.querySelector("div.agm-jacobian").querySelectorAll("tr").map((tr) => tr.childNodes.map((c) => c.textContent)),
    moved: el.querySelectorAll("td.agm-moved").map((td) => td.textContent),
  });
}
process.stdout.write(JSON.stringify(out));

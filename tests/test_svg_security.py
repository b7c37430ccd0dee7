"""The graph SVG is untrusted: hostile SVG in the widget's `graph_svg` runs nothing, loads nothing.

Widget state is saved into the notebook, so whoever edits an .ipynb chooses the SVG the front
end draws. Each payload below is a way SVG can run script or fetch from outside; each is put
into a real Graphviz drawing of the project (so the legit graph must keep working next to it).

Two levels, both in headless Chromium:
- the sanitizer alone (`safeSvg` from `widget.js`, imported as an ES module into a blank page):
  its output holds only allowlisted names and safe values, clicking everything runs nothing,
  and the drawing Graphviz makes comes through unchanged; a control shows the payloads are
  live (the old blocklist let the SMIL ones run).
- the widget in real JupyterLab: a traced cell is run, then the kernel (a second client on the
  same kernel) overwrites the view's `graph_svg` with each payload; the page redraws, every node
  and link is clicked, and nothing may have run, while a graph node still selects its row.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from pathlib import Path

import pytest

from browser_util import SCREENSHOTS, TIMEOUT, jupyter_server, run_all, wait_kernel_ready

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
WIDGET_JS = ROOT / "autograd_magic" / "notebook" / "widget.js"
EVIL_HOST = "agm-evil.invalid"  # any request naming it is a fetch the SVG was not allowed to make

GRID_SETUP = "import torch\nx = torch.tensor([[1.,2,3],[3,2,1]], requires_grad=True)"
GRID_CELL = "y = 3*x + 2\nz = 2*y**2\nout = z.mean()\nout.backward()"

_INNER_SVG = base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" id="x"><a href="javascript:void(window.__pwned=\'use-data\')">'
    b'<rect width="99" height="99"/></a></svg>'
).decode()

# name -> (attributes added to the root <svg>, markup added inside the drawing)
PAYLOADS = {
    "animate href": ("", '<a id="t"><animate attributeName="href" values="javascript:void(document.title=\'PWNED\')" fill="freeze"/><text x="10" y="20">click</text></a>'),
    "set href": ("", '<a><set attributeName="href" to="javascript:void(window.__pwned=\'set\')"/><text x="10" y="20">click</text></a>'),
    "animate xlink:href": ("", '<a xlink:href="#"><animate attributeName="xlink:href" values="javascript:void(window.__pwned=\'xlink\')" fill="freeze"/><text x="10" y="20">click</text></a>'),
    "style @import": ("", f'<style>@import url("http://{EVIL_HOST}/import.css"); text {{ fill: url(javascript:void(window.__pwned=\'style\')) }}</style>'),
    "image javascript/outside href": ("", f'<image href="javascript:void(window.__pwned=\'image\')" width="20" height="20"/><image xlink:href="http://{EVIL_HOST}/i.png" x="30" width="20" height="20"/>'),
    "mixed-case element names": ("", '<a><AnImAtE AtTrIbUtEnAmE="href" VaLuEs="javascript:void(window.__pwned=\'case\')" FILL="freeze"/><text x="10" y="20">click</text></a><SCRIPT>window.__pwned="SCRIPT"</SCRIPT><sCrIpT>window.__pwned="sCrIpT"</sCrIpT>'),
    "entity-encoded javascript:": ("", '<a href="&#106;avascript:void(window.__pwned=\'entity\')"><text x="10" y="20">click</text></a><a><animate attributeName="href" values="&#x6A;ava&#x09;script&colon;void(window.__pwned=\'entity2\')" fill="freeze"/><text x="10" y="40">click</text></a>'),
    "xlink: namespace tricks": ("", '<a XLINK:HREF="javascript:void(window.__pwned=\'XLINK\')"><text x="10" y="20">a</text></a><a xmlns:xl="http://www.w3.org/1999/xlink" xl:href="javascript:void(window.__pwned=\'xl\')"><text x="20" y="20">b</text></a><a xlink:href="  javascript:void(window.__pwned=\'space\')"><text x="30" y="20">c</text></a><a href="#ok" xlink:href="javascript:void(window.__pwned=\'both\')"><text x="40" y="20">d</text></a><a><animate attributeName="XLINK:HREF" values="javascript:void(window.__pwned=\'anim-XLINK\')" fill="freeze"/><text x="50" y="20">e</text></a>'),
    "use data:/outside href": ("", f'<use href="data:image/svg+xml;base64,{_INNER_SVG}#x"/><use xlink:href="http://{EVIL_HOST}/u.svg#x"/><use href="#t"/>'),
    "style/fill url(javascript:)": ("", f'<rect width="50" height="20" style="fill:url(javascript:void(window.__pwned=\'fill\'))"/><rect width="50" height="20" fill="url(javascript:void(window.__pwned=\'fill2\'))"/><rect width="9" height="9" style="background:url(http://{EVIL_HOST}/bg.png)"/><rect width="9" height="9" fill="url(http://{EVIL_HOST}/p.svg#p)"/><rect width="9" height="9" style="fill:\\75 rl(http://{EVIL_HOST}/esc.svg#p)"/>'),
    "onload/onclick attributes": ('onload="window.__pwned=\'root-onload\'" ONCLICK="window.__pwned=\'root-onclick\'"', '<g onclick="window.__pwned=\'onclick\'" OnMouseOver="window.__pwned=\'over\'"><rect onclick="window.__pwned=\'rect\'" width="30" height="30"/></g><svg onload="window.__pwned=\'inner-onload\'"/><animate onbegin="window.__pwned=\'onbegin\'" attributeName="x" dur="1s"/>'),
    "foreignObject, title breakout, other SMIL": ("", f'<foreignObject width="50" height="50"><iframe srcdoc="&lt;script&gt;parent.__pwned=\'iframe\'&lt;/script&gt;"></iframe></foreignObject><title><img src="http://{EVIL_HOST}/t.png" onerror="window.__pwned=\'title\'"></title><animateTransform attributeName="transform" type="rotate" from="0" to="90" dur="1s"/><animateMotion path="M0,0 L9,9" dur="1s"/><a><discard begin="0s"/><text x="1" y="1">x</text></a>'),
    "id that clobbers a global": ("", '<g id="__pwned"/><a id="__pwned" href="#__pwned"><text x="60" y="20">f</text></a>'),
}

# What the sanitizer may let through, written out here apart from the module it checks.
ALLOWED_ELEMENTS = {
    "svg", "g", "title", "path", "polygon", "polyline", "ellipse", "circle", "line", "rect", "text", "tspan", "a",
    "defs", "linearGradient", "radialGradient", "stop",
}
ALLOWED_ATTRS = {
    "x", "y", "x1", "y1", "x2", "y2", "cx", "cy", "r", "rx", "ry", "fx", "fy", "dx", "dy", "points", "d", "transform",
    "width", "height", "viewBox", "preserveAspectRatio", "offset", "gradientUnits", "gradientTransform", "class", "id",
    "fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-dasharray", "stroke-dashoffset",
    "stroke-linecap", "stroke-linejoin", "stroke-miterlimit", "stroke-opacity", "opacity", "stop-color", "stop-opacity",
    "font-family", "font-size", "font-weight", "font-style", "font-variant", "font-stretch", "text-anchor",
    "text-decoration", "baseline-shift", "dominant-baseline", "xml:space", "xlink:title", "href",
}

# The sanitizer this project had before, kept only as the control: it lets SMIL write a link.
BLOCKLIST_SAFESVG = """
(text) => {
  const doc = new DOMParser().parseFromString(text, "text/html");
  const svg = doc.querySelector("svg");
  for (const bad of svg.querySelectorAll("script, foreignObject, iframe")) bad.remove();
  for (const el of [svg, ...svg.querySelectorAll("*")]) {
    for (const attr of [...el.attributes]) {
      const name = attr.name.toLowerCase();
      const isLink = name === "href" || name === "xlink:href";
      if (name.startsWith("on") || (isLink && !attr.value.startsWith("#"))) el.removeAttribute(attr.name);
    }
  }
  return { svg: document.importNode(svg, true) };
}
"""

# Every element of the output, as (namespace, name, [[attribute, value], ...]).
WALK = """
(svg) => [svg, ...svg.querySelectorAll('*')].map(el => [el.namespaceURI, el.localName,
  [...el.attributes].map(a => [a.prefix ? a.prefix + ':' + a.localName : a.localName, a.value])])
"""

# Click what a user could click: every graph node and every link, with the mouse, then every
# element by event (covers ones hidden under others); SMIL gets time to have applied.
CLICK_ALL = """
async (root) => {
  for (const el of root.querySelectorAll('svg *')) {
    el.dispatchEvent(new MouseEvent('click', {bubbles: true, cancelable: true, view: window}));
    el.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
  }
  await new Promise(r => setTimeout(r, 300));
}
"""


@functools.lru_cache(maxsize=None)
def graphviz_svg() -> str:
    """The graph_svg the widget gets for the seed grid cell, made by the project's own code."""
    from IPython.core.interactiveshell import InteractiveShell

    from autograd_magic.render.dot import render_dot
    from autograd_magic.run.execute import execute
    from autograd_magic.render.layout import svg_or_fallback_html

    shell = InteractiveShell.instance()
    shell.run_cell(GRID_SETUP)
    run = execute(shell, GRID_CELL, first_line=2, display=False, capture=True)
    return svg_or_fallback_html(render_dot(run.trace))


def graphviz_features_svg() -> str:
    """What else Graphviz writes: gradients (style on <stop>), links with tooltips, text styles."""
    from autograd_magic.render.layout import render_svg

    return render_svg(
        'digraph { a [style=filled, fillcolor="red:blue", tooltip="tip", URL="#node2"];'
        ' b [shape=ellipse, style="filled,dashed", fillcolor="#ff000080"];'
        " c [shape=plaintext, label=<<I>it</I><U>u</U><SUB>s</SUB><B>b</B>>];"
        ' d [style=radial, fillcolor="white:black"]; e [shape=note, style=filled]; a->b->c->d->e [arrowhead=tee, style=dashed] }'
    )


def inject(svg_html: str, payload: tuple[str, str], probe: str = "") -> str:
    """The payload inside a real drawing: on its root, and right inside the graph's group."""
    root_attrs, markup = payload
    out = svg_html.replace("<svg ", f"<svg {root_attrs} ", 1) if root_attrs else svg_html
    marker = f'<g class="{probe}"></g>' if probe else ""
    out, n = re.subn(r'(<g id="graph0"[^>]*>)', lambda m: m.group(1) + markup + marker, out, count=1)
    assert n == 1, "the drawing has no graph0 group"
    return out


def _findings(page, requests: list[str], title: str) -> dict:
    got = page.evaluate("() => ({pwned: window.__pwned === undefined ? null : String(window.__pwned), title: document.title})")
    return {
        "pwned": got["pwned"],
        "title_changed": got["title"] != title,
        "fetches": [u for u in requests if EVIL_HOST in u],
    }


CLEAN = {"pwned": None, "title_changed": False, "fetches": []}


# ---- the sanitizer alone, in a blank page --------------------------------------------------


def _module_page(browser):
    """A blank page with `widget.js` imported as an ES module (window.__mod)."""
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_content("<html><head><title>blank</title></head><body><div id=host></div></body></html>")
    page.evaluate(
        "async (src) => { window.__mod = await import(URL.createObjectURL(new Blob([src], {type: 'text/javascript'}))); }",
        WIDGET_JS.read_text(encoding="utf-8"),
    )
    return page, requests


def _show(page, fn: str, text: str) -> list:
    """Sanitize `text` with `fn` in the page, put the result on it, return the output's elements."""
    return page.evaluate(
        f"([text, walk]) => {{ const {{svg}} = ({fn})(text); document.getElementById('host').replaceChildren(svg);"
        " return eval(walk)(svg); }",
        [text, WALK],
    )


def _click_everything(page) -> None:
    for link in page.locator("#host svg a, #host svg g.node").all():
        try:
            link.click(force=True, timeout=2000)
        except Exception:  # an element with no box (empty <a>) cannot take a mouse click
            pass
    page.evaluate(CLICK_ALL, page.query_selector("#host"))
    page.wait_for_timeout(200)


def _assert_only_allowed(elements: list) -> None:
    svg_ns = "http://www.w3.org/2000/svg"
    for ns, name, attrs in elements:
        assert ns == svg_ns and name in ALLOWED_ELEMENTS, (ns, name)
        for attr, value in attrs:
            assert attr in ALLOWED_ATTRS, (name, attr, value)
            flat = re.sub(r"\s", "", value).lower()
            assert not re.search(r"javascript:|vbscript:|data:|expression\(|@import|\\", flat), (name, attr, value)
            assert not re.sub(r"url\(#[\w.-]+\)", "", flat).count("url("), (name, attr, value)
            if attr == "href":
                assert name == "a" and value.startswith("#"), (name, attr, value)
            if attr == "id":
                assert value.startswith("agm"), value  # prefixed: an id never names a page global


@pytest.mark.parametrize("name", list(PAYLOADS))
def test_sanitizer_output_is_allowlisted_and_inert(browser, name):
    page, requests = _module_page(browser)
    try:
        text = inject(graphviz_svg(), PAYLOADS[name])
        elements = _show(page, "window.__mod.safeSvg", text)
        _assert_only_allowed(elements)
        _click_everything(page)
        assert _findings(page, requests, "blank") == CLEAN
        # the drawing around the payload is intact
        assert page.locator("#host svg g.node title").count() >= 9
    finally:
        page.close()


def test_control_the_payloads_are_live(browser):
    """Each payload does run (or fetch) unsanitized, most of them through the old blocklist too."""
    raw = "(t) => ({svg: document.importNode(new DOMParser().parseFromString(t, 'text/html').querySelector('svg'), true)})"
    old_leaks = ["animate href", "set href", "animate xlink:href", "mixed-case element names", "entity-encoded javascript:",
                 "style @import", "style/fill url(javascript:)", "foreignObject, title breakout, other SMIL", "id that clobbers a global"]
    fired = {}
    for name, fn in [(n, BLOCKLIST_SAFESVG if n in old_leaks else raw) for n in PAYLOADS]:
        page, requests = _module_page(browser)
        try:
            _show(page, fn, inject(graphviz_svg(), PAYLOADS[name]))
            _click_everything(page)
            fired[name] = _findings(page, requests, "blank") != CLEAN
        finally:
            page.close()
    assert fired == {name: True for name in fired}, fired


@pytest.mark.parametrize("source", ["project graph", "graphviz features"])
def test_the_graphviz_drawing_comes_through_unchanged(browser, source):
    """Every element and attribute Graphviz writes survives, bar ids (prefixed) and comments."""
    text = graphviz_svg() if source == "project graph" else graphviz_features_svg()
    page, _ = _module_page(browser)
    page.set_viewport_size({"width": 2000, "height": 1000})
    try:
        # the pixels too: the rebuilt drawing looks exactly like Graphviz's own, shown as is
        page.evaluate("(text) => { document.getElementById('host').replaceChildren("
                      "document.importNode(new DOMParser().parseFromString(text, 'text/html').querySelector('svg'), true)); }", text)
        as_is = page.locator("#host svg").screenshot()
        clean = _show(page, "window.__mod.safeSvg", text)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        rebuilt = page.locator("#host svg").screenshot(path=str(SCREENSHOTS / f"svg_security_{source.replace(' ', '_')}.png"))
        raw = page.evaluate(
            "([text, walk]) => eval(walk)(new DOMParser().parseFromString(text, 'text/html').querySelector('svg'))",
            [text, WALK],
        )
    finally:
        page.close()
    assert rebuilt == as_is

    def norm(elements, prefixed: bool):
        out = []
        for _ns, name, attrs in elements:
            kept = {}
            for attr, value in attrs:
                if attr.startswith("xmlns"):
                    continue
                if attr == "style":  # Graphviz's stop colours: the sanitizer writes them as attributes
                    for decl in filter(None, value.split(";")):
                        prop, _, v = decl.partition(":")
                        kept[prop.strip()] = v.strip()
                    continue
                if attr == "xlink:href":
                    attr = "href"
                if prefixed:
                    value = re.sub(r"(^|#)agm\d+-", r"\1", value)
                kept[attr] = value
            out.append((name, sorted(kept.items())))
        return out

    assert norm(clean, True) == norm(raw, False)
    if source == "graphviz features":
        names = {name for _ns, name, _a in clean}
        assert {"linearGradient", "radialGradient", "stop", "a", "ellipse"} <= names


# ---- the widget in real JupyterLab ---------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import nbformat

    root = tmp_path_factory.mktemp("notebooks")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in ["%load_ext autograd_magic\n" + GRID_SETUP, "%%autograd\n" + GRID_CELL]]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(root / "svg_security.ipynb"))
    state = tmp_path_factory.mktemp("jupyter_state")
    with jupyter_server(root, state) as server:
        yield server, state


class Kernel:
    """A second client on the notebook's kernel: code run here changes the widget like a cell would."""

    def __init__(self, state: Path):
        from jupyter_client import BlockingKernelClient

        (conn,) = sorted((state / "runtime").glob("kernel-*.json"))
        self.client = BlockingKernelClient(connection_file=str(conn))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=30)

    def run(self, code: str) -> str:
        out: list[str] = []

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                out.append("\n".join(msg["content"]["traceback"]))

        reply = self.client.execute_interactive(code, timeout=60, output_hook=hook)
        assert reply["content"]["status"] == "ok", "".join(out)
        return "".join(out)

    def close(self) -> None:
        self.client.stop_channels()


FIND_VIEW = """
import ipywidgets.widgets.widget as _w
from autograd_magic.notebook.widget import AutogradView as _AV
(_agm_view,) = [v for v in list(_w._instances.values()) if isinstance(v, _AV)]
_agm_svg = _agm_view.graph_svg
import autograd_magic as _am
print(_am.__file__)
"""


def test_hostile_graph_svg_in_jupyterlab_runs_nothing(lab, browser):
    import autograd_magic

    server, state = lab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.page_url("lab", "svg_security.ipynb"))
    wait_kernel_ready(page)
    run_all(page)
    view = page.locator(".jp-OutputArea-output .agm-root").first
    view.locator(".agm-graph g.agm-gnode").first.wait_for(timeout=TIMEOUT)
    nodes = view.locator(".agm-graph g.agm-gnode").count()
    assert nodes >= 4  # the records x, y, z, out (op nodes are not selectable)
    title = page.evaluate("() => document.title")

    kernel = Kernel(state)
    try:
        # the kernel imports the package under test, as this process does
        assert kernel.run(FIND_VIEW).strip() == autograd_magic.__file__
        legit = kernel.run("print(_agm_svg)")
        rows = {r.get_attribute("data-id"): r for r in view.locator("tr.agm-row").all()}
        results = {}
        for i, (name, payload) in enumerate(PAYLOADS.items()):
            # each payload is judged on its own: what an earlier one did (were it to run) is cleared
            page.evaluate("(t) => { delete window.__pwned; document.title = t; }", title)
            requests.clear()
            probe = f"agm-probe-{i}"
            hostile = inject(legit, payload, probe)
            kernel.run(f"_agm_view.graph_svg = {json.dumps(hostile)}")
            view.locator(f".agm-graph g.{probe}").wait_for(state="attached", timeout=TIMEOUT)
            for el in view.locator(".agm-graph svg a").all() + view.locator(".agm-graph g.node").all():
                try:
                    el.click(force=True, timeout=2000)
                except Exception:  # no box to click (an empty link): the events below reach it
                    pass
            page.evaluate(CLICK_ALL, view.element_handle())
            found = _findings(page, requests, title)
            # the real drawing still works: as many clickable nodes, and a node selects its row
            found["nodes"] = view.locator(".agm-graph g.agm-gnode").count()
            gnode = view.locator(".agm-graph g.agm-gnode").nth(i % nodes)
            rid = gnode.get_attribute("data-id")
            gnode.click()
            if rid in rows:
                view.locator(f"tr.agm-row.agm-selected[data-id='{rid}']").wait_for(timeout=TIMEOUT)
            found["selected"] = view.locator(".agm-graph g.agm-gnode.agm-selected").get_attribute("data-id") == rid
            results[name] = found
            if i == 0:
                view.locator(".agm-graph").screenshot(path=str(SCREENSHOTS / "svg_security_payload.png"))
        assert results == {name: dict(CLEAN, nodes=nodes, selected=True) for name in PAYLOADS}

        # back to the legit drawing: the stepper still lights its nodes up
        kernel.run("_agm_view.graph_svg = _agm_svg")
        view.locator(".agm-graph g.agm-probe-0").wait_for(state="detached", timeout=TIMEOUT)
        view.locator("button.agm-next").click()
        view.locator(".agm-graph g.agm-gnode.agm-step").first.wait_for(timeout=TIMEOUT)
        view.locator(".agm-graph g.agm-gnode.agm-step").first.scroll_into_view_if_needed()
        time.sleep(0.2)
        view.locator(".agm-graph").screenshot(path=str(SCREENSHOTS / "svg_security_graph.png"))
        view.screenshot(path=str(SCREENSHOTS / "svg_security_view.png"))
    finally:
        kernel.close()
        page.close()

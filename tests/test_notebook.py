"""qkv in a notebook, for real: a notebook that displays two attention maps, a heatmap and
an ``explain()`` result is executed by a Jupyter kernel (nbclient + ipykernel, the same
python and this checkout's qkv), exported to HTML by nbconvert and opened in headless
Chromium, where both viewers must work independently with no request made.

Skipped only when the notebook tools, Playwright or /usr/bin/chromium are missing (the
test extra and CI install all of them).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

import qkv

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
nbconvert = pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)",
                allow_module_level=True)

SRC = str(Path(qkv.__file__).resolve().parent.parent)
CELLS = [
    "import qkv\nprint(qkv.__file__)",
    "net = qkv.load_pretrained()\n"
    "a = net.attend(\"The animal didn't cross the street because it was too tired\")\na",
    "b = net.attend('The trophy would not fit in the brown suitcase because it was too big')\n"
    "b",
    "from qkv.viz import terminal\nterminal.heatmap(a.merge_words(), 3, 1)",
    "from qkv.viz import png\npng.figure(a.merge_words(), layer=3, head=1)",
    "import torch\ng = torch.Generator().manual_seed(0)\n"
    "q, k, v = (torch.randn(2, 3, 5, generator=g) for _ in range(3))\n"
    "qkv.explain(q, k, v, causal=True)",
]
# nbconvert's lab template loads require.js, MathJax and mermaid from CDNs for its own
# use; these blocks are emptied so that the exported page may make no request at all.
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook run by a kernel of this python with PYTHONPATH = this checkout."""
    tmp = tmp_path_factory.mktemp("nb")
    spec = tmp / "jupyter" / "kernels" / "qkv-test"
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "qkv test", "language": "python", "env": env}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(tmp / "jupyter")
    try:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
        nbclient.NotebookClient(nb, kernel_name="qkv-test", timeout=300,
                                resources={"metadata": {"path": str(tmp)}}).execute()
    finally:
        if old is None:
            del os.environ["JUPYTER_PATH"]
        else:
            os.environ["JUPYTER_PATH"] = old
    return nb, tmp


def data(cell) -> dict:
    outs = [o for o in cell.outputs if o.output_type == "execute_result"]
    assert len(outs) == 1, cell.outputs
    return outs[0]["data"]


def test_kernel_runs_this_checkout_and_outputs_are_small(executed):
    nb, _ = executed
    assert nb.cells[0].outputs[0]["text"].strip() == str(Path(SRC) / "qkv" / "__init__.py")
    a, b = data(nb.cells[1]), data(nb.cells[2])
    assert a["text/plain"].startswith("AttentionMap(6 layers x 12 heads, 15 tokens: ")
    assert a["text/html"].startswith('<div class="qkv"')
    assert len(a["text/plain"]) < 200 and len(a["text/html"]) < 1_000_000
    assert b["text/html"].startswith('<div class="qkv"') and "suitcase" in b["text/html"]
    heat = data(nb.cells[3])
    plain = re.sub(r"\x1b\[[0-9;]*m", "", heat["text/plain"])  # rich colours text too
    assert plain.startswith("layer 3, head 1: each row is a query")
    assert "layer 3, head 1" in heat["text/html"] and "animal" in heat["text/html"]
    figure = data(nb.cells[4])
    assert figure["image/png"] and figure["text/plain"].startswith("<AttentionFigure size")
    steps = data(nb.cells[5])
    assert steps["text/plain"].startswith("AttentionSteps(2 heads, Lq=3, Lk=3, Dv=5")
    for title in ("1. scores", "2. scaled", "3. masked", "4. weights", "5. output"):
        assert title in steps["text/html"]
    assert "−∞" in steps["text/html"]  # causal: hidden keys


def test_exported_page_has_two_independent_viewers(executed):
    nb, tmp = executed
    from nbconvert import HTMLExporter

    (tmp / "offline.html.j2").write_text(TEMPLATE)
    exporter = HTMLExporter(template_name="lab", template_file=str(tmp / "offline.html.j2"))
    body, _ = exporter.from_notebook_node(nb)
    page_path = tmp / "notebook.html"
    page_path.write_text(body, encoding="utf-8")
    url = page_path.as_uri()
    problems = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        def route(r):
            if r.request.url == url:
                r.continue_()
            else:
                problems.append(f"request to {r.request.url}")
                r.abort()

        page.route("**/*", route)
        page.goto(url)
        roots = page.locator("div.qkv")
        assert roots.count() == 2
        one, two = roots.nth(0), roots.nth(1)
        for root in (one, two):
            assert root.locator(".qkv-modelview canvas").count() == 72
            assert not root.locator(".qkv-noscript").is_visible()
            assert root.locator(".qkv-steps").is_visible()  # q/k/v kept: 15 tokens
        assert "trophy" in two.locator(".qkv-headview").text_content()
        assert "animal" in one.locator(".qkv-headview").text_content()
        start = (one.locator(".qkv-layer").input_value(), one.locator(".qkv-head").input_value())
        # a tile of the second map opens that head there, and only there
        two.locator('.qkv-modelview canvas[data-layer="0"][data-head="7"]').click()
        assert (two.locator(".qkv-layer").input_value(),
                two.locator(".qkv-head").input_value()) == ("0", "7")
        assert (one.locator(".qkv-layer").input_value(),
                one.locator(".qkv-head").input_value()) == start
        # pinning a token in the first map leaves the second alone
        one.locator('.qkv-headview text.tok[data-side="q"][data-unit="2"]').click()
        page.mouse.move(1, 1)
        assert one.locator(".qkv-headview").get_attribute("data-pinned") == "2"
        assert two.locator(".qkv-headview").get_attribute("data-pinned") == ""
        assert "Query “animal”" in one.locator(".qkv-steps-body").text_content()
        assert "Query “animal”" not in two.locator(".qkv-steps-body").text_content()
        assert "5. output" in page.content()  # the explain() tables
        page.close()
        browser.close()
    assert problems == []


def test_docs_notebook_is_stored_executed_and_small():
    path = Path(__file__).resolve().parent.parent / "docs" / "notebook.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs for c in code)
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    html_outputs = [o["data"]["text/html"] for c in code for o in c.outputs
                    if o.output_type == "execute_result" and "text/html" in o["data"]]
    assert any(h.startswith('<div class="qkv"') for h in html_outputs)  # the viewer
    assert path.stat().st_size < 300_000

"""The HTML page in headless Chromium (Debian's, driven by Playwright): it loads offline
with no request beyond the page itself and no console error, shows every token, reacts
to hovering, and its step-by-step numbers are the model's.

Skipped only when Playwright or /usr/bin/chromium is missing (CI installs both).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from bert_model import sentence_map
from qkv.attention_map import AttentionMap
from qkv.viz import html

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture
def open_page(browser, tmp_path):
    """Open a saved page; every request other than the page itself fails the test."""
    pages = []

    def go(amap, **options):
        path = html.save(amap, tmp_path / f"page{len(pages)}.html", **options)
        url = path.as_uri()
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        problems = []
        page.on("console", lambda m: m.type in ("error", "warning") and problems.append(
            f"console {m.type}: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

        def route(r):
            if r.request.url == url:
                r.continue_()
            else:
                problems.append(f"request to {r.request.url}")
                r.abort()

        page.route("**/*", route)
        page.goto(url)
        page.wait_for_selector(".qkv-headview svg")
        pages.append((page, problems))
        return page, problems

    yield go
    for page, problems in pages:
        page.close()
        assert problems == []


def shown(page, side):
    return page.eval_on_selector_all(f'.qkv-headview text.tok[data-side="{side}"]',
                                     "els => els.map(e => e.textContent)")


def visible_lines(page):
    return page.eval_on_selector_all(
        ".qkv-lines line", "els => els.filter(e => +e.getAttribute('stroke-opacity') > 0).length")


def test_every_token_shown_and_hover_changes_the_view(open_page):
    amap = sentence_map()
    it = amap.find("it")
    page, _ = open_page(amap, layer=2, head=3, query=it, words=False)
    assert shown(page, "q") == amap.tokens and shown(page, "k") == amap.tokens
    assert page.locator(".qkv-modelview canvas").count() == 6 * 12
    before = visible_lines(page)
    assert page.get_attribute(".qkv-headview", "data-focus") == ""
    page.hover(f'.qkv-headview text.tok[data-side="q"][data-unit="{it}"]')
    assert page.get_attribute(".qkv-headview", "data-focus") == f"q{it}"
    after = visible_lines(page)
    assert 0 < after <= len(amap.tokens) < before  # only the hovered token's lines
    # the key column now shows where "it" looks, in % (the largest is the model's)
    pcts = page.eval_on_selector_all(".pct", "els => els.map(e => e.textContent)")
    j = int(np.argmax(amap.weights[2, 3, it]))
    assert f"{100 * amap.weights[2, 3, it, j]:.0f}%" in pcts
    page.mouse.move(1, 1)
    assert page.get_attribute(".qkv-headview", "data-focus") == ""


def test_step_panel_numbers_are_the_models(open_page):
    amap = sentence_map()
    it = amap.find("it")
    page, _ = open_page(amap, layer=1, head=8, query=it, words=False)
    assert page.is_visible(".qkv-steps")
    soft = page.eval_on_selector_all(".qkv-steps-table td.w", "els => els.map(e => +e.textContent)")
    assert np.abs(np.array(soft) - amap.weights[1, 8, it]).max() <= 5e-5  # 4 decimals shown
    out = page.text_content(".qkv-steps-output")
    want = amap.weights[1, 8, it] @ amap.v[1, 8]  # (Dv,) the weighted sum of values
    got = np.array([float(x) for x in out.strip("[]").split(",")])
    assert np.abs(got - want).max() <= 5e-4  # 3 decimals shown
    assert "within" in page.text_content(".qkv-steps-check")
    # choosing another layer/head in the selectors updates the panel
    page.select_option(".qkv-layer", "0")
    page.select_option(".qkv-head", "2")
    soft = page.eval_on_selector_all(".qkv-steps-table td.w", "els => els.map(e => +e.textContent)")
    assert np.abs(np.array(soft) - amap.weights[0, 2, it]).max() <= 5e-5


def test_word_and_special_toggles_match_python(open_page):
    amap = sentence_map()
    page, _ = open_page(amap, words=True, hide_special=True)
    view = amap.merge_words().drop_special()
    assert shown(page, "q") == view.tokens
    js = page.evaluate(
        "() => Array.from(document.querySelector('.qkv').qkvViewer.view().head(4, 7))")
    assert np.abs(np.array(js).reshape(view.weights.shape[2:]) - view.weights[4, 7]).max() < 1e-5
    page.uncheck(".qkv-words")
    page.uncheck(".qkv-hide")
    assert shown(page, "q") == amap.tokens


def test_model_view_thumbnail_selects_the_head(open_page):
    page, _ = open_page(sentence_map())
    page.click('.qkv-modelview canvas[data-layer="3"][data-head="5"]')
    assert page.input_value(".qkv-layer") == "3" and page.input_value(".qkv-head") == "5"
    assert page.get_attribute('.qkv-modelview canvas[data-layer="3"][data-head="5"]',
                              "class") == "current"


def test_cross_attention_and_no_qkv(open_page):
    """A map with other key tokens (as qkv translate makes) shows two different columns;
    without q/k/v the step panel is hidden."""
    rng = np.random.default_rng(0)
    w = rng.random((2, 3, 4, 6))
    w /= w.sum(-1, keepdims=True)
    amap = AttentionMap(tokens=["<s>", "le", "chat", "</s>"], weights=w,
                        key_tokens=["the", "c", "##at", "sat", ".", "</s>"],
                        key_words=["cat"], key_word_spans=[(1, 3)],
                        title="the cat sat. → le chat")
    page, _ = open_page(amap, words=False)
    assert shown(page, "q") == amap.tokens and shown(page, "k") == amap.keys
    assert not page.is_visible(".qkv-steps")
    page.hover('.qkv-headview text.tok[data-side="k"][data-unit="3"]')
    assert page.get_attribute(".qkv-headview", "data-focus") == "k3"
    page.check(".qkv-words")
    assert shown(page, "k") == ["the", "cat", "sat", ".", "</s>"]


def focus(page):
    return (page.get_attribute(".qkv-headview", "data-focus"),
            page.get_attribute(".qkv-headview", "data-pinned"))


def test_click_pins_a_token_after_the_mouse_leaves(open_page):
    amap = sentence_map()
    view = amap.merge_words()
    animal = view.tokens.index("animal")
    page, _ = open_page(amap)  # words view, the chosen head
    layer, head = page.evaluate(
        "() => [document.querySelector('.qkv').qkvViewer.state.layer, "
        "document.querySelector('.qkv').qkvViewer.state.head]")
    everything = visible_lines(page)
    tok = f'.qkv-headview text.tok[data-side="q"][data-unit="{animal}"]'
    page.click(tok)
    page.mouse.move(1, 1)  # the pointer leaves: the pinned token stays in focus
    assert focus(page) == (f"q{animal}", str(animal))
    lines = visible_lines(page)
    assert 0 < lines == int((view.weights[layer, head, animal] >= 1e-4).sum()) < everything
    assert "Query “animal”" in page.text_content(".qkv-steps-body")
    assert "pinned" in page.get_attribute(tok, "class")
    # hovering a key shows that key; leaving it returns to the pinned token
    page.hover('.qkv-headview text.tok[data-side="k"][data-unit="1"]')
    assert focus(page) == ("k1", str(animal))
    page.mouse.move(1, 1)
    assert focus(page) == (f"q{animal}", str(animal))
    page.click(tok)  # click again: let go
    page.mouse.move(1, 1)
    assert focus(page) == ("", "") and visible_lines(page) == everything


def test_model_view_tile_brings_that_head_into_view(open_page):
    amap = sentence_map()
    view = amap.merge_words()
    it = view.find("it")
    page, _ = open_page(amap)
    page.set_viewport_size({"width": 1300, "height": 420})
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    section = ("() => { const r = document.querySelector('.qkv-head-section')"
               ".getBoundingClientRect(); return [r.top, r.bottom, window.innerHeight]; }")
    top, bottom, height = page.evaluate(section)
    assert bottom < 0 or top > height  # the head view is out of sight before the click
    page.click('.qkv-modelview canvas[data-layer="5"][data-head="11"]')
    top, bottom, height = page.evaluate(section)
    assert 0 <= top < height  # ... and in sight after it
    assert page.input_value(".qkv-layer") == "5" and page.input_value(".qkv-head") == "11"
    page.hover(f'.qkv-headview text.tok[data-side="q"][data-unit="{it}"]')
    pcts = page.eval_on_selector_all(".pct", "els => els.map(e => e.textContent)")
    j = int(np.argmax(view.weights[5, 11, it]))
    assert f"{100 * view.weights[5, 11, it, j]:.0f}%" in pcts  # the head view is head 5/11


def test_two_viewers_on_one_page_work_independently(browser, tmp_path):
    """Two notebook fragments side by side: each reacts only to its own clicks."""
    amap = sentence_map()
    body = html.fragment(amap) + html.fragment(amap.merge_words().drop_special())
    path = tmp_path / "two.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}"
                    "</body></html>", encoding="utf-8")
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    roots = page.locator("div.qkv")
    assert roots.count() == 2
    first, second = roots.nth(0), roots.nth(1)
    assert first.locator(".qkv-modelview canvas").count() == 72
    assert second.locator('.qkv-headview text.tok[data-side="q"]').count() == 11
    second.locator('.qkv-modelview canvas[data-layer="1"][data-head="4"]').click()
    assert second.locator(".qkv-layer").input_value() == "1"
    assert first.locator(".qkv-layer").input_value() != "1" or \
        first.locator(".qkv-head").input_value() != "4"
    first.locator('.qkv-headview text.tok[data-side="q"][data-unit="2"]').click()
    assert first.locator(".qkv-headview").get_attribute("data-pinned") == "2"
    assert second.locator(".qkv-headview").get_attribute("data-pinned") == ""
    assert errors == []
    page.close()

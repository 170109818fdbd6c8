"""The browser explorer at `/`, in a real headless Chromium driven by selenium against the real app, served by
uvicorn on loopback from this process (the page is under test here, not the server process)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from attribindex import AttributionIndex, PromptCompletion, build_index
from attribindex.testing import serving, write_jsonl
from tests.conftest import exact_config

TOKEN = "explorer-token"
QUERY = "King queen crown sword love death night."
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "explorer.png"
STRONGEST = 8  # highlights per example (explorer.js)
# Corpus texts the page must show as text, highlighted at the right characters: accents and an emoji (split into
# bytes by the byte-level tokenizer; 2 UTF-16 units in the browser), and text that looks like HTML.
ODD = {
    "odd-unicode": "🎉 Café crème, naïve: king queen crown sword love.",
    "odd-html": "<b>bold</b> king & queen <i>love</i> death <script>x()</script>.",
}
# What the page shows of each result: its id, its text, its marks (start, end, sign, code points) and any element in
# the text that is not a mark (an HTML-looking text rendered as HTML would add some). One script, read at once:
# the lists are re-rendered while a test waits, which would stale elements found one by one.
READ_RESULTS = """
return [...document.querySelectorAll('.results li')].map((li) => {
  const text = li.querySelector('.result-text');
  return {
    id: li.dataset.id,
    text: text.textContent,
    marks: [...text.querySelectorAll('mark.tok')].map((m) => [
      Number(m.dataset.start), Number(m.dataset.end), m.classList.contains('pos') ? '+' : '-',
      Array.from(m.textContent, (c) => c.codePointAt(0)),  // code points: half an emoji would not cross as text
    ]),
    elements: [...text.querySelectorAll('*')].filter((e) => !e.matches('mark.tok')).map((e) => e.tagName),
    explained: li.classList.contains('explained'),
  };
});
"""


@pytest.fixture(scope="module")
def index_dir(tiny_models, corpus_records, tmp_path_factory):
    root = tmp_path_factory.mktemp("explorer")
    corpus = write_jsonl(root / "corpus.jsonl", corpus_records + [{"id": i, "text": t} for i, t in ODD.items()])
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), corpus, root / "idx", id_field="id", progress=False)
    return root / "idx"


@pytest.fixture(scope="module")
def server(index_dir):
    with serving(index_dir, token=TOKEN) as url:
        yield url


@pytest.fixture(scope="module")
def local(index_dir):
    """The library's own answers, from an index opened apart from the server's."""
    return AttributionIndex.open(index_dir)


def _wait(browser, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def _connect(browser, server) -> None:
    """Open the page, give it the token, and wait for the index's info."""
    from selenium.webdriver.common.by import By

    browser.get(f"{server}/")
    _wait(browser, lambda b: "token" in b.find_element(By.ID, "status").text)  # it asks for the token
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    _wait(browser, lambda b: "26" in b.find_element(By.ID, "info").text)


def _ask(browser, text: str, k: int, bottom: int) -> None:
    """Type a one-text query with k and bottom, and submit it."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, 'input[name="kind"][value="text"]').click()
    # set, not typed: ChromeDriver types no character outside the BMP (an emoji); the page reads the value on submit
    browser.execute_script("document.getElementById('text').value = arguments[0]", text)
    for name, value in (("k", str(k)), ("bottom", str(bottom))):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "submit").click()


def _shown_when(browser, condition) -> list[dict]:
    """The results as READ_RESULTS gives them, once `condition(results)` holds."""
    found = []

    def ready(b):
        found[:] = b.execute_script(READ_RESULTS)
        return condition(found)

    _wait(browser, ready)
    return found


def _expected_marks(example) -> list[list]:
    """What the page must mark in `example` (explain()'s answer): its STRONGEST character spans by |contribution|,
    the tokens sharing a span (the bytes of one character) counted together, each with its sign and text (as code
    points)."""
    spans: dict[tuple[int, int], float] = {}
    for token in example.tokens:  # in order: the same float sums the page forms
        if token.end > token.start:
            spans[(token.start, token.end)] = spans.get((token.start, token.end), 0.0) + token.contribution
    strongest = sorted((s for s in spans.items() if s[1] != 0), key=lambda s: -abs(s[1]))[:STRONGEST]
    marks = sorted(
        [start, end, "+" if value > 0 else "-", [ord(c) for c in example.text[start:end]]]
        for (start, end), value in strongest
    )
    assert all(a[1] <= b[0] for a, b in zip(marks, marks[1:])), "overlapping spans: the page would drop one"
    return marks


def _assert_marks_are_the_strongest_tokens(shown: list[dict], explanation) -> None:
    by_id = {e.id: e for e in explanation.examples}
    assert [r["id"] for r in shown] == [e.id for e in explanation.examples]
    for result in shown:
        example = by_id[result["id"]]
        assert result["explained"] and result["text"] == example.text  # the whole text, character for character
        assert result["elements"] == []  # text only: no element but the marks
        assert result["marks"] == _expected_marks(example), result["id"]


def test_the_page_is_static_and_needs_no_token_but_the_api_does(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{server}/static/explorer.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{server}/static/explorer.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{server}/?name=../../../etc/passwd").text == page.text  # no parameter picks the file
    assert httpx.get(f"{server}/v1/info").status_code == 401


def test_results_are_marked_with_explains_strongest_tokens_and_signs(server, local, browser, tmp_path):
    from selenium.webdriver.common.by import By

    found = local.attribute(QUERY, k=4, bottom=2).results[0]
    ids = [a.id for a in found.top + found.bottom]
    _connect(browser, server)
    assert "token=" not in browser.current_url
    info = browser.find_element(By.ID, "info").text
    assert "gpt2" in info and "rows" in info and "Hessian" in info and "raw" in info
    _ask(browser, QUERY, 4, 2)
    shown = _shown_when(browser, lambda rows: len(rows) == 6 and all(r["explained"] for r in rows))

    top = browser.find_elements(By.CSS_SELECTOR, "#top li")
    assert [li.get_attribute("data-id") for li in top] == [a.id for a in found.top]
    assert [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "#bottom-list li")] == [
        a.id for a in found.bottom
    ]
    assert found.top[0].id in top[0].text and f"{found.top[0].score:+.4f}" in top[0].text
    status = browser.find_element(By.ID, "status").text
    assert "ms on the server" in status and "explained in" in status
    explanation = local.explain(QUERY, ids)
    _assert_marks_are_the_strongest_tokens(shown, explanation)
    marks = [m for r in shown for m in r["marks"]]
    assert {"+", "-"} <= {m[2] for m in marks} and len(marks) == 6 * STRONGEST  # both signs occur; no span lost
    strongest_query = explanation.examples[0].strongest(1, of_query=True)[0].text
    behind = browser.find_element(By.ID, "query-tokens").text
    assert behind.startswith(f"Query tokens behind {ids[0]}: {json.dumps(strongest_query)} ")
    assert not browser.find_element(By.ID, "explain-note").is_displayed()

    top[0].click()  # a click shows the whole text
    assert "expanded" in top[0].get_attribute("class")
    assert top[0].find_element(By.CSS_SELECTOR, "button").get_attribute("aria-expanded") == "true"
    browser.save_screenshot(str(tmp_path / "explorer.png"))
    if os.environ.get("ATTRIBINDEX_UPDATE_SCREENSHOT"):  # the README's picture, refreshed on request only
        shutil.copy2(tmp_path / "explorer.png", SCREENSHOT)

    # a prompt + completion pair: the same ids as the library's, explained
    pair = local.attribute(PromptCompletion("Ghost father", " son mind heart."), k=4, bottom=2).results[0]
    browser.find_element(By.CSS_SELECTOR, 'input[name="kind"][value="pair"]').click()
    browser.find_element(By.ID, "prompt").send_keys("Ghost father")
    browser.find_element(By.ID, "completion").send_keys(" son mind heart.")
    browser.find_element(By.ID, "submit").click()
    want = [a.id for a in pair.top + pair.bottom]
    _shown_when(browser, lambda rows: [r["id"] for r in rows] == want and all(r["explained"] for r in rows))
    assert browser.execute_script("return sessionStorage.length") == 0  # the token is kept only when asked


def test_unicode_and_html_looking_texts_are_shown_as_text_and_marked_at_their_characters(server, local, browser):
    query = "Café 🎉 <b>bold</b> queen crown."
    ranked = [a.id for a in local.attribute(query, k=26).results[0].top]
    k = 1 + max(ranked.index(i) for i in ODD)  # down to the lower of the two
    ids = ranked[:k]
    _connect(browser, server)
    _ask(browser, query, k, 0)
    shown = _shown_when(browser, lambda rows: len(rows) == k and all(r["explained"] for r in rows))
    _assert_marks_are_the_strongest_tokens(shown, local.explain(query, ids))
    odd = {r["id"]: r for r in shown if r["id"] in ODD}
    assert odd["odd-html"]["text"].startswith("<b>bold</b>")  # the tags are characters on the page
    # a mark after the emoji: UTF-16 slicing would put it one character early
    assert any(start > 0 for start, *_ in odd["odd-unicode"]["marks"])
    assert all(end - start == 1 for start, end, *_ in odd["odd-unicode"]["marks"])  # one character per token


def _damaged(index_dir: Path, name: str):
    """Move every chunk's `name` file aside (a real fault the server meets on disk); a context that puts them back."""

    @contextlib.contextmanager
    def aside():
        files = sorted(index_dir.rglob(f"*.{name}"))
        assert files, name
        for file in files:
            file.rename(file.with_name(file.name + ".aside"))
        try:
            yield
        finally:
            for file in files:
                file.with_name(file.name + ".aside").rename(file)

    return aside()


def test_refusals_server_errors_and_a_failed_explanation_are_shown(server, index_dir, local, browser, tmp_path):
    from selenium.webdriver.common.by import By

    def error_text(b):
        return b.find_element(By.ID, "error").text

    _connect(browser, server)
    _ask(browser, QUERY, 27, 0)  # refused: the index holds 26 rows
    error = _wait(browser, error_text)
    assert "k=27 is over the limit: at most 26" in error
    assert not browser.find_element(By.ID, "results").is_displayed()
    browser.save_screenshot(str(tmp_path / "explorer-error.png"))
    _ask(browser, QUERY, 2, 0)  # answered: the store's files have been read (and checked) once
    _shown_when(browser, lambda rows: len(rows) == 2 and all(r["explained"] for r in rows))
    assert not error_text(browser)

    with _damaged(index_dir, "docs.jsonl"):  # the texts are gone: the server fails on the query (500)
        _ask(browser, QUERY, 3, 0)
        error = _wait(browser, error_text)
    assert "the server failed on this request (FileNotFoundError" in error and "docs.jsonl" in error
    assert not browser.find_element(By.ID, "results").is_displayed()

    found = local.attribute(QUERY, k=3, bottom=1).results[0]
    with _damaged(index_dir, "ids.npy"):  # finding ids fails: attribute answers, explain fails (500)
        _ask(browser, QUERY, 3, 1)
        note = _wait(browser, lambda b: b.find_element(By.ID, "explain-note").text)
        shown = browser.execute_script(READ_RESULTS)
    assert "No highlights: explaining these results failed" in note and "FileNotFoundError" in note
    assert browser.find_element(By.ID, "explain-note").is_displayed() and not error_text(browser)
    assert [r["id"] for r in shown] == [a.id for a in found.top + found.bottom]
    assert [r["text"] for r in shown] == [a.text for a in found.top + found.bottom]
    assert "odd-html" in [r["id"] for r in shown]  # not highlighted, and still shown as text
    assert not any(r["marks"] or r["explained"] or r["elements"] for r in shown)
    assert "not explained" in browser.find_element(By.ID, "status").text

    _ask(browser, QUERY, 2, 0)  # the next query starts clean
    _shown_when(browser, lambda rows: len(rows) == 2 and all(r["explained"] for r in rows))
    assert not browser.find_element(By.ID, "explain-note").is_displayed()

    token = browser.find_element(By.ID, "token")  # a wrong token: the server's 401 message, shown as it is
    token.clear()
    token.send_keys("wrong")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda b: "missing or wrong bearer token" in error_text(b))
    assert not browser.find_element(By.ID, "results").is_displayed()
    assert "wrong" not in browser.current_url

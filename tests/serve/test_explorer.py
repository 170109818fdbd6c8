"""The browser explorer at `/`, in a real headless Chromium driven by selenium against a real server."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import httpx
import pytest

from attribindex import AttributionIndex, PromptCompletion, build_index
from attribindex.testing import start_server
from tests.conftest import exact_config

TOKEN = "explorer-token"
INSTALL = "apt-get install -y chromium chromium-driver (or run tools/setup.sh), and pip install selenium"
QUERY = "King queen crown sword love death night."
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "explorer.png"


@pytest.fixture(scope="module")
def index_dir(tiny_models, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer") / "idx"
    build_index(exact_config("cosine"), str(tiny_models["gpt2"]), corpus_file, out, id_field="id", progress=False)
    return out


@pytest.fixture(scope="module")
def server(index_dir):
    process, url = start_server(index_dir, "--token", TOKEN)
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    # A missing browser fails, never skips: a skipped test would let the page break unnoticed.
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; {INSTALL}")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail(f"Chromium or chromedriver is not on PATH; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(flag)
    # both paths given: selenium's driver manager would otherwise try to download a matching driver
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


def _wait(browser, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def test_the_page_is_static_and_needs_no_token_but_the_api_does(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{server}/static/explorer.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{server}/static/explorer.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{server}/?name=../../../etc/passwd").text == page.text  # no parameter picks the file
    assert httpx.get(f"{server}/v1/info").status_code == 401


def test_query_results_highlights_and_errors_in_a_browser(server, index_dir, browser, tmp_path):
    from selenium.webdriver.common.by import By

    local_index = AttributionIndex.open(index_dir)
    local = local_index.attribute(QUERY, k=4, bottom=2).results[0]
    texts = {a.id: a.text for a in local.top + local.bottom}

    browser.get(f"{server}/")
    assert "token=" not in browser.current_url
    _wait(browser, lambda b: "token" in b.find_element(By.ID, "status").text)  # it asks for the token
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    _wait(browser, lambda b: "24" in b.find_element(By.ID, "info").text)
    info = browser.find_element(By.ID, "info").text
    assert "gpt2" in info and "rows" in info and "Hessian" in info and "raw" in info

    browser.find_element(By.ID, "text").send_keys(QUERY)
    for name, value in (("k", "4"), ("bottom", "2")):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, ".results li.explained")) == 6)

    top = browser.find_elements(By.CSS_SELECTOR, "#top li")
    bottom = browser.find_elements(By.CSS_SELECTOR, "#bottom-list li")
    assert [li.get_attribute("data-id") for li in top] == [a.id for a in local.top]
    assert [li.get_attribute("data-id") for li in bottom] == [a.id for a in local.bottom]
    assert local.top[0].id in top[0].text and f"{local.top[0].score:+.4f}" in top[0].text
    status = browser.find_element(By.ID, "status").text
    assert "ms on the server" in status and "explained in" in status
    marks = browser.find_elements(By.CSS_SELECTOR, ".results li mark.tok")
    assert marks and {m.get_attribute("class").split()[1] for m in marks} <= {"pos", "neg"}
    for item in top + bottom:
        text = texts[item.get_attribute("data-id")]
        for mark in item.find_elements(By.CSS_SELECTOR, "mark.tok"):
            start, end = int(mark.get_attribute("data-start")), int(mark.get_attribute("data-end"))
            # textContent, not .text: the collapsed view may clip a mark, and .text drops hidden words
            assert mark.get_attribute("textContent") == text[start:end]
        # the highlighted rendering still holds the example's whole text, character for character
        assert item.find_element(By.CSS_SELECTOR, ".result-text").get_attribute("textContent") == text
    assert "Query tokens behind" in browser.find_element(By.ID, "query-tokens").text

    top[0].click()  # a click shows the whole text
    assert "expanded" in top[0].get_attribute("class")
    assert top[0].find_element(By.CSS_SELECTOR, "button").get_attribute("aria-expanded") == "true"
    browser.save_screenshot(str(tmp_path / "explorer.png"))
    if os.environ.get("ATTRIBINDEX_UPDATE_SCREENSHOT"):  # the README's picture, refreshed on request only
        shutil.copy2(tmp_path / "explorer.png", SCREENSHOT)

    # a prompt + completion pair: the same ids as the library's, explained
    pair = local_index.attribute(PromptCompletion("Ghost father", " son mind heart."), k=4, bottom=2).results[0]
    browser.find_element(By.CSS_SELECTOR, 'input[name="kind"][value="pair"]').click()
    browser.find_element(By.ID, "prompt").send_keys("Ghost father")
    browser.find_element(By.ID, "completion").send_keys(" son mind heart.")
    browser.find_element(By.ID, "submit").click()
    # read in one script: the lists are re-rendered while it waits, which would stale found elements
    shown = "return [...document.querySelectorAll('.results li.explained')].map((li) => li.dataset.id)"
    want = [a.id for a in pair.top + pair.bottom]
    _wait(browser, lambda b: b.execute_script(shown) == want)
    assert browser.execute_script("return sessionStorage.length") == 0  # the token is kept only when asked

    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("25")  # the index holds 24 rows
    browser.find_element(By.ID, "submit").click()
    error = _wait(browser, lambda b: b.find_element(By.ID, "error") if b.find_element(By.ID, "error").text else None)
    assert "k=25 is over the limit: at most 24" in error.text
    assert not browser.find_element(By.ID, "results").is_displayed()
    browser.save_screenshot(str(tmp_path / "explorer-error.png"))

    token = browser.find_element(By.ID, "token")  # a wrong token: the server's 401 message, shown as it is
    token.clear()
    token.send_keys("wrong")
    k.clear()
    k.send_keys("2")
    browser.find_element(By.ID, "submit").click()
    _wait(browser, lambda b: "missing or wrong bearer token" in b.find_element(By.ID, "error").text)
    assert "wrong" not in browser.current_url

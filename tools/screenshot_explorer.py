"""Screenshot the browser explorer answering a query on an index, as a person would see it after the demo.

Serves INDEX_DIR (`attribindex serve`, loopback, no token), opens the page in headless Chromium (Debian `chromium` +
`chromium-driver`, installed by tools/setup.sh), types the query, waits for the explained results, expands the top
one and saves a PNG. It prints the ids the page showed next to the library's own answer, so the picture is checked.

    .venv/bin/attribindex demo --out demo-index
    .venv/bin/python tools/screenshot_explorer.py demo-index --out docs/img/explorer-demo.png \
        --text "Now is the winter of our discontent made glorious summer by this sun of York."
"""

from __future__ import annotations

import argparse
import shutil
import signal
import time
from pathlib import Path

from attribindex import AttributionIndex
from attribindex.testing import start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index_dir", type=Path)
    parser.add_argument("--text", required=True, help="The query typed into the page.")
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("--bottom", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/img/explorer-demo.png"))
    parser.add_argument("--window", default="1100,1750", help="Browser window size, WIDTH,HEIGHT in pixels.")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    expected = AttributionIndex.open(args.index_dir).attribute(args.text, k=args.k, bottom=args.bottom).results[0]
    process, url = start_server(args.index_dir)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.window}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        started = time.perf_counter()
        browser.get(f"{url}/")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: "rows" in b.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "text").send_keys(args.text)
        for name, value in (("k", args.k), ("bottom", args.bottom)):
            field = browser.find_element(By.ID, name)
            field.clear()
            field.send_keys(str(value))
        browser.find_element(By.ID, "submit").click()
        shown = args.k + args.bottom
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".results li.explained")) == shown)
        top = browser.find_elements(By.CSS_SELECTOR, "#top li")
        top[0].click()  # the whole text of the top result, with its strongest tokens marked
        browser.save_screenshot(str(args.out))
        page_ids = [li.get_attribute("data-id") for li in top]
        print(f"page top-{args.k}:    {page_ids}  ({time.perf_counter() - started:.1f} s in the browser)")
        print(f"library top-{args.k}: {[a.id for a in expected.top]}")
        print(f"status: {browser.find_element(By.ID, 'status').text}")
        print(f"saved {args.out}")
        if page_ids != [a.id for a in expected.top]:
            raise SystemExit("the page's results differ from the library's")
    finally:
        browser.quit()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


if __name__ == "__main__":
    main()

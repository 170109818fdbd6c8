"""report.html in headless Chromium (every sample shown, grouped by outcome, with token highlights for the first
few), the summary counted independently, and the same traces through a server's `Client`."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from attribindex import AttributionIndex, Client
from attribindex.harness import lead_summary, trace_eval_report
from attribindex.testing import serving

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "trace-eval-report.png"


def test_the_report_shows_every_sample_by_outcome_with_highlights(qa_index, lm_eval_results, browser, tmp_path):
    from selenium.webdriver.common.by import By

    index = AttributionIndex.open(qa_index)
    run = trace_eval_report(index, lm_eval_results, tmp_path / "out", k=4, bottom=2, progress=False)
    browser.get((tmp_path / "out" / "report.html").as_uri())
    shown = {a.get_attribute("data-key"): a for a in browser.find_elements(By.CSS_SELECTOR, "article.sample")}
    assert set(shown) == {t.sample.key for t in run.traces} and all(a.is_displayed() for a in shown.values())
    for trace in run.traces:
        article = shown[trace.sample.key]
        assert article.find_element(By.XPATH, "ancestor::section").get_attribute("id") == trace.sample.outcome
        texts = article.find_elements(By.CSS_SELECTOR, ".query")
        assert len(texts) == len(trace.queries)
        for query, listed in zip(trace.queries, texts):
            shown_top = [
                li.find_element(By.TAG_NAME, "b").text for li in listed.find_elements(By.CSS_SELECTOR, "ol.top li")
            ]
            shown_bottom = [
                li.find_element(By.TAG_NAME, "b").text for li in listed.find_elements(By.CSS_SELECTOR, "ol.bottom li")
            ]
            assert shown_top == [a.id for a in query.top] and shown_bottom == [a.id for a in query.bottom]
    highlighted = [a for a in shown.values() if a.find_elements(By.CSS_SELECTOR, ".explain .token")]
    outcomes = Counter(t.sample.outcome for t in run.traces if t.answer is not None)
    assert len(highlighted) == sum(min(3, n) for o, n in outcomes.items() if o in ("wrong", "right")) > 0
    browser.save_screenshot(str(tmp_path / "report.png"))
    if os.environ.get("ATTRIBINDEX_UPDATE_SCREENSHOT"):  # the README's picture, refreshed on request only
        shutil.copy2(tmp_path / "report.png", SCREENSHOT)


def test_the_summary_counts_which_examples_lead_wrong_answers(qa_index, lm_eval_results, tmp_path):
    run = trace_eval_report(AttributionIndex.open(qa_index), lm_eval_results, tmp_path / "out", k=4, progress=False)
    answered = [t for t in run.traces if t.answer is not None and t.sample.outcome != "unscored"]
    wrong = Counter(a.id for t in answered if t.sample.outcome == "wrong" for a in t.answer.top)
    right = Counter(a.id for t in answered if t.sample.outcome == "right" for a in t.answer.top)
    totals = Counter(t.sample.outcome for t in answered)
    lead = {doc: wrong[doc] / max(totals["wrong"], 1) - right[doc] / max(totals["right"], 1) for doc in wrong | right}
    lead = {doc: value for doc, value in lead.items() if value > 0}  # more often behind wrong answers than right
    summary = lead_summary(run.traces)
    assert len(summary) == min(20, len(lead)) > 0
    assert [r.lead for r in summary] == pytest.approx(sorted(lead.values(), reverse=True)[: len(summary)])
    for row in summary:
        assert (row.wrong, row.right) == (wrong[row.id], right[row.id]) and row.lead == pytest.approx(lead[row.id])


def test_a_server_traces_the_same_as_the_index(qa_index, lm_eval_results, tmp_path):
    local = trace_eval_report(AttributionIndex.open(qa_index), lm_eval_results, tmp_path / "local", k=3, progress=False)
    with serving(qa_index) as url, Client(url) as remote:
        served = trace_eval_report(remote, lm_eval_results, tmp_path / "served", k=3, progress=False)
    assert [t.sample.key for t in served.traces] == [t.sample.key for t in local.traces]
    for a, b in zip(served.traces, local.traces):
        assert [[x.id for x in q.top] for q in a.queries] == [[x.id for x in q.top] for q in b.queries]

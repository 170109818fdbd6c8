// The attribindex explorer: plain DOM, no framework, no build step. Every API call sends the token as a bearer
// header; the token never goes into a URL, and is kept in sessionStorage only when asked (gone with the tab).
"use strict";

const STRONGEST = 8; // tokens highlighted per example
const TOKEN_KEY = "attribindex-token";

const $ = (id) => document.getElementById(id);

// POST (or GET) the API; resolves to the JSON answer, or throws an Error carrying the server's message.
async function api(path, body) {
  const headers = { accept: "application/json" };
  const token = $("token").value;
  if (token) headers.authorization = `Bearer ${token}`;
  const init = { headers, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const started = performance.now();
  const response = await fetch(path, init);
  let answer = null;
  try {
    answer = await response.json();
  } catch {
    // not JSON (a proxy's error page, say): the status line below says what happened
  }
  if (!response.ok) {
    const message = answer && answer.error ? answer.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  answer.roundTripMs = performance.now() - started;
  return answer;
}

function showError(err) {
  $("error").textContent = err ? err.message : "";
  $("error").hidden = !err;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text; // text, never HTML: corpus texts are untrusted
  return node;
}

async function loadInfo() {
  const info = await api("/v1/info");
  const rows = [
    ["model", info.model],
    ["rows", info.rows.toLocaleString()],
    ["dims", info.dim.toLocaleString()],
    ["Hessian", info.hessian],
    ["normalization", info.normalization],
    ["search", info.search],
    ["index", `${info.index_id} v${info.index_version}`],
    ["exact re-rank", info.exact ? info.exact.kind : "not built"],
  ];
  $("info").replaceChildren(...rows.flatMap(([name, value]) => [el("dt", "", name), el("dd", "", String(value))]));
}

function currentQuery() {
  if (document.querySelector('input[name="kind"]:checked').value === "pair") {
    return { prompt: $("prompt").value, completion: $("completion").value };
  }
  return $("text").value;
}

function resultItem(attribution, rank) {
  const item = el("li");
  item.dataset.id = attribution.id;
  const head = el("button", "result-head");
  head.type = "button";
  head.setAttribute("aria-expanded", "false");
  const sign = attribution.score >= 0 ? "+" : "";
  head.append(
    el("span", "rank", `${rank}.`),
    el("span", "score", `${sign}${attribution.score.toFixed(4)}`),
    el("span", "id", attribution.id),
    el("span", "source", attribution.source || ""),
  );
  item.append(head, el("p", "result-text", attribution.text));
  // the whole item is the click target; the button inside makes it reachable by keyboard too
  item.addEventListener("click", () => {
    const expanded = item.classList.toggle("expanded");
    head.setAttribute("aria-expanded", String(expanded));
  });
  return item;
}

// Character offsets from the server count code points (Python strings); JS strings index UTF-16 units, so
// slice an array of code points, or every span after an emoji would be off. Tokens covering the same characters
// (the bytes of one character, which a byte-level tokenizer splits) are one highlight carrying their summed share.
function highlighted(text, tokens) {
  const chars = Array.from(text);
  const bySpan = new Map();
  for (const token of tokens) {
    if (token.start < 0 || token.end <= token.start) continue; // special tokens, tokens not placed in the text
    const key = `${token.start}:${token.end}`;
    const span = bySpan.get(key) || { start: token.start, end: token.end, contribution: 0 };
    span.contribution += token.contribution;
    bySpan.set(key, span);
  }
  const strongest = [...bySpan.values()]
    .filter((s) => s.contribution !== 0)
    .sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution))
    .slice(0, STRONGEST);
  const largest = strongest.length ? Math.abs(strongest[0].contribution) : 1;
  strongest.sort((a, b) => a.start - b.start);
  const parts = [];
  let at = 0;
  for (const span of strongest) {
    if (span.start < at) continue; // overlaps the previous highlight (a token straddling two characters' spans)
    parts.push(document.createTextNode(chars.slice(at, span.start).join("")));
    const mark = el("mark", `tok ${span.contribution > 0 ? "pos" : "neg"}`, chars.slice(span.start, span.end).join(""));
    mark.style.setProperty("--strength", (Math.abs(span.contribution) / largest).toFixed(3));
    mark.dataset.start = span.start;
    mark.dataset.end = span.end;
    mark.dataset.contribution = span.contribution;
    mark.title = `${span.contribution > 0 ? "+" : ""}${span.contribution.toPrecision(3)}`;
    parts.push(mark);
    at = span.end;
  }
  parts.push(document.createTextNode(chars.slice(at).join("")));
  return parts;
}

async function explain(query, ids) {
  const answer = await api("/v1/explain", { query, ids });
  for (const example of answer.examples) {
    for (const item of document.querySelectorAll(".results li")) {
      if (item.dataset.id !== example.id) continue;
      item.querySelector(".result-text").replaceChildren(...highlighted(example.text, example.tokens));
      item.classList.add("explained");
    }
  }
  // which of the query's own tokens carried the top example's score
  const top = answer.examples[0];
  if (top) {
    const strongest = [...top.query_tokens]
      .filter((t) => t.contribution !== 0)
      .sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution))
      .slice(0, 5)
      .map((t) => `${JSON.stringify(t.text)} ${t.contribution > 0 ? "+" : ""}${t.contribution.toPrecision(3)}`);
    $("query-tokens").textContent = `Query tokens behind ${top.id}: ${strongest.join(", ")}`;
  }
  return answer;
}

async function attribute(event) {
  event.preventDefault();
  showError(null);
  $("submit").disabled = true;
  $("results").hidden = true; // a refused query must not leave the last answer looking like its own
  $("explain-note").hidden = true;
  $("status").textContent = "Attributing…";
  const query = currentQuery();
  try {
    const body = { queries: [query], k: Number($("k").value), bottom: Number($("bottom").value) };
    const answer = await api("/v1/attribute", body);
    const result = answer.results[0];
    $("top").replaceChildren(...result.top.map((a, i) => resultItem(a, i + 1)));
    $("bottom-list").replaceChildren(...result.bottom.map((a, i) => resultItem(a, i + 1)));
    $("bottom-list").hidden = $("bottom-heading").hidden = result.bottom.length === 0;
    $("query-tokens").textContent = "";
    $("results").hidden = false;
    const timing = `${answer.latency_ms.toFixed(1)} ms on the server, ${answer.roundTripMs.toFixed(0)} ms round trip`;
    $("status").textContent = `Attributed by ${answer.index_id} v${answer.index_version} in ${timing}; explaining…`;
    loadInfo().catch(() => {}); // the index may have changed version since it was last shown
    const ids = [...result.top, ...result.bottom].map((a) => a.id);
    if (ids.length) {
      try {
        const explanation = await explain(query, ids);
        $("status").textContent =
          `Attributed in ${timing}; explained in ${explanation.latency_ms.toFixed(1)} ms (${explanation.method}).`;
      } catch (err) {
        // the results stand; only their highlights are missing, and the note above them says why
        $("explain-note").textContent = `No highlights: explaining these results failed: ${err.message}`;
        $("explain-note").hidden = false;
        $("status").textContent = `Attributed in ${timing}; not explained.`;
      }
    }
  } catch (err) {
    showError(err);
    $("status").textContent = "";
  } finally {
    $("submit").disabled = false;
  }
}

async function connect(event) {
  if (event) event.preventDefault();
  showError(null);
  if ($("remember").checked) sessionStorage.setItem(TOKEN_KEY, $("token").value);
  else sessionStorage.removeItem(TOKEN_KEY);
  try {
    await loadInfo();
    $("status").textContent = "";
  } catch (err) {
    $("info").replaceChildren();
    showError(err);
  }
}

function showKind() {
  const pair = document.querySelector('input[name="kind"]:checked').value === "pair";
  $("pair-fields").hidden = !pair;
  $("text-fields").hidden = pair;
}

document.addEventListener("DOMContentLoaded", () => {
  const kept = sessionStorage.getItem(TOKEN_KEY);
  if (kept !== null) {
    $("token").value = kept;
    $("remember").checked = true;
  }
  $("token-form").addEventListener("submit", connect);
  $("query-form").addEventListener("submit", attribute);
  for (const radio of document.querySelectorAll('input[name="kind"]')) radio.addEventListener("change", showKind);
  // an open server (no --token) shows its info at once; a server with a token waits for it
  loadInfo().catch(() => {
    $("status").textContent = "Enter the server's token and press Connect.";
  });
});

"""The service's search page at ``/``: a query box, the mode, a rerank toggle when a reranker is served, and the
hits with their scores and text. Plain HTML and JavaScript, no build step, served by the ingress.

The page holds no data: it calls ``POST /search`` as any client does, with the API key the user types (kept in
the tab's session storage, gone when the tab closes). The query lives in the URL (``/?q=...&mode=...``), so a
search is a link. Texts are put in the page as text (``textContent``), never as HTML.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json

# No external scripts, styles or fonts; the page's only request is to this service's /search. The one script runs
# by its hash, not by 'unsafe-inline': markup that ever slipped into the page could not run a script of its own.
_POLICY = ("default-src 'none'; script-src {script}; style-src 'unsafe-inline'; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>denseqa search</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: 1rem; }
  #q { flex: 1 1 24rem; font-size: 1.1rem; padding: .45rem; }
  button { font-size: 1rem; padding: .45rem 1rem; }
  #key-box { display: none; margin-bottom: 1rem; padding: .75rem; background: #fff7e0; border: 1px solid #e6c46b; }
  #key-box input { width: 22rem; }
  #error { color: #a00; margin: .5rem 0; }
  #status { color: #666; font-size: .9rem; }
  ol { padding-left: 1.5rem; }
  li { margin-bottom: .9rem; }
  .score { font-family: monospace; color: #555; margin-right: .6rem; }
  .id { font-family: monospace; color: #0a5; }
  .text { white-space: pre-wrap; margin-top: .2rem; }
</style>
</head>
<body>
<h1>denseqa search</h1>
<div id="key-box">
  <label>API key <input id="key" type="password" autocomplete="off"></label>
  <button id="key-save" type="button">Use this key</button>
  <div>The service asks for its key (printed by <code>denseqa serve</code>). It is kept in this tab only.</div>
</div>
<form id="search">
  <input id="q" name="q" type="search" placeholder="Ask a question" autofocus>
  <select id="mode" name="mode">__MODES__</select>
  <label id="rerank-label" __RERANK_HIDDEN__><input id="rerank" name="rerank" type="checkbox"> rerank</label>
  <button id="go" type="submit">Search</button>
</form>
<div id="error" role="alert"></div>
<div id="status"></div>
<ol id="hits"></ol>
<script>
const settings = __SETTINGS__;
const KEY = "denseqa_api_key";
const $ = (id) => document.getElementById(id);

function showKeyBox(message) {
  $("key-box").style.display = "block";
  if (message) $("error").textContent = message;
  $("key").focus();
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  $("q").value = params.get("q") || "";
  const mode = params.get("mode");
  // A link may name a mode this deployment lacks (bm25 without its index): fall back to the default.
  $("mode").value = mode && [...$("mode").options].some((o) => o.value === mode) ? mode : settings.defaultMode;
  $("rerank").checked = settings.reranker && params.get("rerank") === "1";
  return $("q").value.trim() !== "";
}

function toUrl() {
  const params = new URLSearchParams({q: $("q").value, mode: $("mode").value});
  if ($("rerank").checked) params.set("rerank", "1");
  history.pushState(null, "", "?" + params.toString());
}

// A score the JSON could not carry (a non-finite one is sent as null) is shown as such, not fatal to the list.
const fmt = (x) => typeof x === "number" ? x.toFixed(3) : "n/a";

function render(body) {
  const hits = body.results[0].hits;
  $("hits").replaceChildren();
  $("status").textContent = `${hits.length} hits, ${body.mode}` + (body.reranked_candidates ?
    `, ${body.reranked_candidates} candidates re-ranked` : "") + `, ${Math.round(body.took_ms)} ms`;
  for (const hit of hits) {
    const item = document.createElement("li");
    item.className = "hit";
    item.dataset.id = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "rerank_score" in hit ? `rerank ${fmt(hit.rerank_score)} (search ${fmt(hit.score)})` :
      fmt(hit.score);
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = hit.text;
    item.append(score, id, text);
    $("hits").append(item);
  }
}

let latest = 0;  // the newest search: a slower earlier reply (Enter twice, Back during a re-rank) is dropped

async function search() {
  const mine = ++latest;
  $("error").textContent = "";
  $("status").textContent = "searching...";
  $("hits").replaceChildren();
  const key = sessionStorage.getItem(KEY);
  if (settings.auth && !key) {
    $("status").textContent = "";
    showKeyBox("This service needs its API key.");
    return;
  }
  const request = {query: $("q").value, k: 10, mode: $("mode").value};
  if ($("rerank").checked) request.rerank = true;
  let response, body;
  try {
    response = await fetch(settings.root + "/search", {
      method: "POST",
      headers: {"content-type": "application/json", ...(key ? {"authorization": "Bearer " + key} : {})},
      body: JSON.stringify(request),
    });
    const json = (response.headers.get("content-type") || "").includes("application/json");
    body = json ? await response.json() : null;
  } catch (err) {
    if (mine !== latest) return;
    $("status").textContent = "";
    $("error").textContent = "The service did not answer: " + err;
    return;
  }
  if (mine !== latest) return;
  $("status").textContent = "";
  if (!response.ok) {
    const message = body && body.error ? `${response.status} ${body.error.field}: ${body.error.message}` :
      `${response.status}`;
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      showKeyBox(message);
    } else {
      $("error").textContent = message;
    }
    return;
  }
  $("key-box").style.display = "none";
  render(body);
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  toUrl();
  search();
});
$("key-save").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("key-box").style.display = "none";
  if ($("q").value.trim()) search();
});
window.addEventListener("popstate", () => { if (fromUrl()) search(); });
if (fromUrl()) search();
else if (settings.auth && !sessionStorage.getItem(KEY)) showKeyBox("");
</script>
</body>
</html>
"""


def search_page(root_path: str, default_mode: str, modes: list[str], reranker: bool, auth: bool) -> str:
    """The page for this deployment: its path prefix, default mode, the modes its index answers, whether a
    reranker is served and whether the API key is required."""
    options = "".join(f'<option value="{html.escape(mode)}">{html.escape(mode)}</option>' for mode in modes)
    settings = {"root": root_path.rstrip("/"), "defaultMode": default_mode, "reranker": reranker, "auth": auth}
    # json.dumps output inside <script>: "</" and "<!--" cannot end or confuse the script element once escaped.
    settings_js = json.dumps(settings).replace("<", "\\u003c")
    return (_PAGE.replace("__MODES__", options).replace("__RERANK_HIDDEN__", "" if reranker else "hidden")
            .replace("__SETTINGS__", settings_js))


def content_security_policy(page: str) -> str:
    """The Content-Security-Policy header for ``page`` (from :func:`search_page`): its inline script allowed by
    its SHA-256 (CSP Level 2), which covers the deployment's settings written into it."""
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return _POLICY.format(script=f"'sha256-{digest}'")

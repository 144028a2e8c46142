"""The HTTP API's own checks, driven through ASGI in this process (the live service's are in test_serve)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request

from denseqa.api import BodyLimit, Limits, error_body, install_error_handlers, max_body_bytes


def _app(limit: int) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=lambda: limit)

    @app.post("/search")
    async def search(request: Request):
        return {"read": len(await request.body())}

    return app


def _post(app, chunks: list[bytes], declared: int | None) -> tuple[int, dict]:
    """POST the body in ``chunks`` (with ``Content-Length: declared``, or chunked when None); (status, JSON)."""
    headers = [(b"content-type", b"application/json")]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_a_body_beyond_what_the_limits_allow_is_413_before_it_is_read_whole():
    app = _app(limit=1000)
    # A body within the limit is read and answered
    assert _post(app, [b"x" * 600, b"y" * 400], declared=1000) == (200, {"read": 1000})
    assert _post(app, [b"x" * 600, b"y" * 400], declared=None) == (200, {"read": 1000})
    # One that declares more is refused at once, naming the body and both sizes
    status, body = _post(app, [b"x" * 1001], declared=1001)
    assert status == 413 and body == error_body("body", "request body of 1,001 bytes; at most 1,000 (the service's "
                                                        "max_queries x max_query_chars)")
    # A chunked one, once its bytes pass the limit
    status, body = _post(app, [b"x" * 600, b"y" * 600, b"z" * 600], declared=None)
    assert status == 413 and body["error"]["field"] == "body" and "more than 1,200 bytes" in body["error"]["message"]


def test_the_body_limit_admits_every_request_within_the_query_limits():
    # The largest request the limits allow: every query at its longest, in the costliest JSON escapes
    limits = Limits(max_queries=3, max_query_chars=5)
    query = "\U0001F600" * 5  # one character, 12 bytes escaped as a surrogate pair
    raw = json.dumps({"queries": [query] * 3, "k": 1000, "mode": "hybrid", "rerank": True, "candidates": 200})
    assert len(raw.encode()) <= max_body_bytes(limits)
    assert max_body_bytes(Limits()) < 2_000_000  # the defaults: 64 queries of 2,000 characters


def test_rerank_candidates_default_stays_within_the_services_limit():
    import pytest

    from denseqa.api import DEFAULT_CANDIDATES, BadRequest, SearchRequest, checked_candidates

    # Given a service deployed to re-rank at most 20 candidates (fewer than the default 50, as on CPU)
    low = Limits(max_candidates=20)
    # When a request asks for re-ranking without naming `candidates` (the search page never names them)
    # Then it re-ranks as many as the service allows, or k if larger, instead of refusing with a 413
    assert checked_candidates(SearchRequest(query="q", k=10, rerank=True), low, True) == 20
    assert checked_candidates(SearchRequest(query="q", k=10, rerank=True), Limits(), True) == DEFAULT_CANDIDATES
    assert checked_candidates(SearchRequest(query="q", k=60, rerank=True), Limits(), True) == 60
    # And a k beyond the limit, or candidates named above it, are still refused, naming the field that was sent
    for request, field in ((SearchRequest(query="q", k=30, rerank=True), "k"),
                           (SearchRequest(query="q", rerank=True, candidates=21), "candidates")):
        with pytest.raises(BadRequest) as refused:
            checked_candidates(request, low, True)
        assert refused.value.status == 413 and refused.value.field == field


def test_the_hits_of_one_request_are_bounded_naming_the_field_sent():
    import pytest

    from denseqa.api import BadRequest, SearchRequest, check_hits

    limits = Limits(max_hits=100)
    # k and the query count each within their limits, their product within max_hits: answered
    check_hits(SearchRequest(queries=["q"] * 10, k=10), ["q"] * 10, None, limits)
    check_hits(SearchRequest(query="q", k=100), ["q"], None, limits)
    # Beyond it: 413, naming k, or candidates when re-ranking names them
    for request, candidates, field in ((SearchRequest(queries=["q"] * 11, k=10), None, "k"),
                                       (SearchRequest(queries=["q"] * 3, k=10, rerank=True, candidates=40), 40,
                                        "candidates"),
                                       (SearchRequest(queries=["q"] * 3, k=10, rerank=True), 50, "k")):
        with pytest.raises(BadRequest) as refused:
            check_hits(request, request.queries, candidates, limits)
        assert refused.value.status == 413 and refused.value.field == field, request
        assert "at most 100 in one request" in refused.value.message

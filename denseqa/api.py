"""The HTTP API of the search service: request and response models, input limits, and error bodies.

Kept apart from the Ray Serve deployments (:mod:`denseqa.serve`) so the same contract can be checked, documented
(FastAPI's OpenAPI page at ``/docs``) and reused by a plain FastAPI process (the benchmark's baseline).

Every bad input is answered with a 4xx and one JSON body, ``{"error": {"field": ..., "message": ...}}``, where
``field`` names the offending part of the request (``"k"``, ``"queries[3]"``, ``"body"``); never with a 500.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from denseqa.config import Limits  # defined once, with the serve section that overrides it
from denseqa.texts import is_blank

MAX_K = 1000
DEFAULT_CANDIDATES = 50


def _integral(value):
    # JSON Schema (and so any OpenAPI client) counts 87.0 as an integer; strict pydantic would refuse it. Any other
    # float, a string or a bool is still refused.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[StrictInt, BeforeValidator(_integral)]


class SearchRequest(BaseModel):
    """One query (``query``) or several (``queries``), the number of hits ``k`` and the search ``mode``."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr | None = Field(None, description="A single query; give this or `queries`.")
    queries: list[StrictStr] | None = Field(None, description="Several queries answered in one call.")
    k: Count = Field(10, ge=1, le=MAX_K, description="Hits per query.")
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(
        None, description="dense (FAISS), bm25 (lexical) or hybrid (reciprocal rank fusion of both). Default: the "
        "service's default mode (`/info` names it; `denseqa run` deploys the one its evaluation found best)."
    )
    rerank: StrictBool = Field(
        False, description="Re-rank the first `candidates` hits of the search with the service's cross-encoder."
    )
    candidates: Count | None = Field(
        None, ge=1, description=f"With `rerank`: hits retrieved and re-ranked, at least `k` (default "
        f"{DEFAULT_CANDIDATES} or the service's `max_candidates` if lower, or `k` if larger); at most the service's "
        "`max_candidates`.",
    )

    @field_validator("query", "queries", "candidates", "mode", mode="before")
    @classmethod
    def _not_null(cls, value, info: ValidationInfo):
        # An explicit null is refused rather than read as "left out": the published schema says these are a
        # string, a list and an integer, and a server must refuse what its schema does not allow.
        if value is None:
            raise ValueError(f"null is not a value of `{info.field_name}`; give one or leave the key out")
        return value


class ErrorDetail(BaseModel):
    field: str = Field(description="The part of the request at fault: `query`, `queries[3]`, `k`, `body`, "
                                   "`authorization`, ...")
    message: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 503 answer."""

    error: ErrorDetail


class Hit(BaseModel):
    id: str
    score: float = Field(description="The search's score (dense: cosine; bm25: BM25; hybrid: fused rank score).")
    text: str
    rerank_score: float | None = Field(None, description="With `rerank`: the cross-encoder's score; hits are "
                                                         "ordered by it.")
    retrieval_rank: int | None = Field(None, description="With `rerank`: the hit's rank in the search, from 1.")


class QueryResult(BaseModel):
    query: str
    hits: list[Hit] = Field(description="Best first.")


class SearchResponse(BaseModel):
    results: list[QueryResult] = Field(description="One entry per query, in the order given.")
    mode: str
    k: int
    reranked_candidates: int | None = Field(None, description="With `rerank`: how many hits were re-ranked (for "
                                            "several queries, the most for one); fewer than `candidates` where the "
                                            "search found fewer.")
    index: str = Field(description="The index folder that answered (it changes after a hot swap).")
    took_ms: float = Field(description="Time spent in the service, from request parsed to response built.")


class BadRequest(Exception):
    """A request the service refuses; answered with ``status`` and the field it names."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


def error_body(field: str, message: str) -> dict:
    return {"error": {"field": field, "message": message}}


def checked_queries(request: SearchRequest, limits: Limits) -> list[str]:
    """The request's queries after the checks a pydantic model cannot express (limits are configurable)."""
    if (request.query is None) == (request.queries is None):
        raise BadRequest("query", "give exactly one of `query` (a string) or `queries` (a list of strings)")
    field = "query" if request.query is not None else "queries"
    queries = [request.query] if request.query is not None else request.queries
    if not queries:
        raise BadRequest("queries", "`queries` is empty; give at least one query")
    if len(queries) > limits.max_queries:
        raise BadRequest("queries", f"{len(queries)} queries in one request; at most {limits.max_queries}", 413)
    for i, query in enumerate(queries):
        name = field if field == "query" else f"queries[{i}]"
        if is_blank(query):
            raise BadRequest(name, "query is empty or only whitespace")
        try:
            # JSON may carry a lone surrogate ("\ud800") that no tokenizer can encode: refused here, it would
            # fail the whole encoder batch, other clients' queries with it.
            query.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(name, f"query is not valid Unicode text (a lone surrogate at character {e.start})") \
                from None
        if len(query) > limits.max_query_chars:
            raise BadRequest(name, f"query has {len(query)} characters; at most {limits.max_query_chars}", 413)
    return queries


def check_hits(request: SearchRequest, queries: list[str], candidates: int | None, limits: Limits) -> None:
    """The hits the request retrieves (each query's k, or its candidates to re-rank) within ``max_hits``."""
    per_query = candidates if candidates is not None else request.k
    total = len(queries) * per_query
    if total > limits.max_hits:
        if request.candidates is not None:
            field, asked = "candidates", f"candidates={per_query}"
        elif candidates is not None:  # the default candidates, which follow k: the field the client sent is k
            field, asked = "k", f"k={request.k} with rerank ({per_query} candidates each)"
        else:
            field, asked = "k", f"k={per_query}"
        raise BadRequest(field, f"{len(queries)} queries x {asked} are {total} hits; at most {limits.max_hits} in "
                         "one request (send fewer queries, or ask fewer hits)", 413)


def checked_candidates(request: SearchRequest, limits: Limits, has_reranker: bool) -> int | None:
    """How many hits to retrieve for re-ranking (None: no re-ranking), after the checks that need the service."""
    if not request.rerank:
        if request.candidates is not None:
            raise BadRequest("candidates", "`candidates` is only used with `rerank: true`")
        return None
    if not has_reranker:
        raise BadRequest("rerank", "this service has no reranker; deploy it with one (denseqa serve --reranker "
                         "FOLDER, a folder written by train-reranker) or leave `rerank` out", 400)
    # The default stays within the service's limit: a service deployed to re-rank fewer (on CPU, say) must not
    # refuse every request that leaves `candidates` out, the search page's among them.
    candidates = request.candidates if request.candidates is not None else \
        max(min(DEFAULT_CANDIDATES, limits.max_candidates), request.k)
    if candidates < request.k:
        raise BadRequest("candidates", f"{candidates} candidates cannot fill k={request.k} hits; give at least k")
    if candidates > limits.max_candidates:
        if request.candidates is None:  # the default followed k: the field the client sent is k
            raise BadRequest("k", f"k={request.k} with rerank re-ranks {candidates} candidates; at most "
                             f"{limits.max_candidates}", 413)
        raise BadRequest("candidates", f"{candidates} candidates to re-rank; at most {limits.max_candidates}", 413)
    return candidates


# Python's str.isspace(), which is_blank() follows, spelled out: JSON Schema's \\s (ECMA-262) differs from it
# (it lacks \\x1c-\\x1f and \\x85 and has \\ufeff), so a pattern using it would state another rule than the server's.
_PYTHON_WHITESPACE = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
NON_BLANK_PATTERN = "[^" + "".join(f"\\u{ord(c):04x}" for c in _PYTHON_WHITESPACE) + "]"


def error_responses(*statuses: int, **descriptions: str) -> dict:
    """OpenAPI ``responses`` entries with the error body, for FastAPI's ``responses=``; ``descriptions`` by
    ``s<status>``."""
    return {status: {"model": ErrorResponse, "description": descriptions.get(f"s{status}", "Refused")}
            for status in statuses}


def openapi_with_limits(spec: dict, limits: Limits, has_reranker: bool, has_bm25: bool,
                        default_mode: str = "dense") -> dict:
    """The service's OpenAPI schema with every rule its server enforces on a search request written in: the
    query limits of this deployment (configurable, so not in the static model), one of `query` or `queries`, no
    blank query, the modes its index answers, and re-ranking only where a reranker runs. What JSON Schema cannot
    say (``candidates`` at least ``k``, the hits of all queries within ``max_hits``) is in the fields'
    descriptions."""
    request = spec["components"]["schemas"]["SearchRequest"]
    props = request["properties"]
    query = {"type": "string", "minLength": 1, "maxLength": limits.max_query_chars, "pattern": NON_BLANK_PATTERN}
    props["query"] = {**query, "description": props["query"].get("description", "")
                      + " Not blank; at most the service's `max_query_chars` characters."}
    props["queries"] = {"type": "array", "items": query, "minItems": 1, "maxItems": limits.max_queries,
                        "description": props["queries"].get("description", "")
                        + " At most the service's `max_queries`."}
    request["oneOf"] = [{"required": ["query"]}, {"required": ["queries"]}]
    props["k"] = {**props["k"], "description": props["k"].get("description", "") + f" The queries times `k` (times "
                  f"`candidates` with `rerank`) are at most the service's `max_hits`, {limits.max_hits}."}
    # A string when given (null is refused, as for the other fields), defaulting to this deployment's mode; an
    # index built without BM25 answers dense search only.
    props["mode"] = {"type": "string", "enum": ["dense", "bm25", "hybrid"] if has_bm25 else ["dense"],
                     "default": default_mode, "description": props["mode"].get("description", "")}
    if has_reranker:
        props["candidates"] = {"type": "integer", "minimum": 1, "maximum": limits.max_candidates,
                               "description": props["candidates"].get("description", "")}
        request["dependentRequired"] = {"candidates": ["rerank"]}
    else:  # this service re-ranks nothing: rerank is false or absent, and candidates has no use
        props["rerank"] = {"type": "boolean", "enum": [False], "default": False,
                           "description": "This service has no reranker (deployed without --reranker)."}
        props.pop("candidates", None)
    return spec


# A JSON string spends at most 12 bytes on one character (a surrogate pair escaped, "\\ud83d\\ude00"), so a request
# within the limits is never larger than this; the rest of an object (keys, k, mode, rerank) fits in the margin.
BODY_MARGIN_BYTES = 65_536


def max_body_bytes(limits: Limits) -> int:
    """The largest request body a request within ``limits`` can have."""
    return limits.max_queries * (limits.max_query_chars * 12 + 4) + BODY_MARGIN_BYTES


# The largest body this process's ingress reads (set by its SearchAPI replica from its limits); None: no limit yet.
# A module attribute read through a function, not a closure: Serve may pickle the app, and a function of an
# importable module is pickled by reference, so it reads this module's value in the replica.
_body_limit: int | None = None


def set_body_limit(limit: int | None) -> None:
    global _body_limit
    _body_limit = limit


def body_limit() -> int | None:
    return _body_limit


class BodyLimit:
    """ASGI middleware: a request body larger than ``max_bytes()`` is answered 413 before it is read whole.

    By hand because Starlette and FastAPI have no body limit (uvicorn has none either, and Serve's proxy passes
    bodies on as they come): FastAPI would read and parse any body before the request's limits are checked, so one
    client could fill a replica's memory. A declared Content-Length is refused at once; a chunked body, once its
    bytes pass the limit.
    """

    def __init__(self, app, max_bytes) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        limit = self.max_bytes() if scope["type"] == "http" else None
        if limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse(error_body("body", _too_large(int(declared), limit)), status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # answered 413 by the app's handler of Starlette's HTTPException
                    raise StarletteHTTPException(413, _too_large(received, limit, so_far=True))
            return message

        await self.app(scope, counted_receive, send)


def _too_large(size: int, limit: int, so_far: bool = False) -> str:
    return f"request body of {'more than ' if so_far else ''}{size:,} bytes; at most {limit:,} (the service's " \
           "max_queries x max_query_chars)"


def install_error_handlers(app: FastAPI) -> None:
    """Turn FastAPI's validation errors and :class:`BadRequest` into the one error body, naming the field."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid" or not loc:
            # Invalid JSON, or a body that is not an object: the body as a whole is at fault.
            message = "request body is not a JSON object: " + str(first.get("msg", "invalid"))
            return JSONResponse(error_body("body", message), status_code=400)
        field = loc[0] + "".join(f"[{part}]" for part in loc[1:])
        return JSONResponse(error_body(field, str(first.get("msg"))), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own refusals (a body that is not UTF-8 or JSON it cannot parse, an unknown path, a method the
        # path does not take) get the same body as every other error.
        field = {400: "body", 404: "path", 405: "method", 413: "body"}.get(exc.status_code, "request")
        return JSONResponse(error_body(field, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(exc.field, exc.message), status_code=exc.status)

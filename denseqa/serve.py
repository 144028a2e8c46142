"""The search service on Ray Serve: HTTP ingress -> index searcher (encoding its queries) [-> reranker].

Two deployments, three with a reranker, and on GPU clusters a separate query encoder; each scaled on its own
(``autoscaling_config`` in the Serve config file, ``configs/serve.yaml``):

- :class:`SearchAPI`, the FastAPI ingress (``@serve.ingress``): validates requests (:mod:`denseqa.api`) and calls
  the others through ``DeploymentHandle``\\ s, once per group of requests that arrive together (each call
  costs milliseconds of CPU per replica it crosses). Cheap; a fraction of a CPU.
- :class:`IndexSearcher`: the FAISS index, BM25 and docstore of one index folder, loaded through the library's
  :class:`~denseqa.search.Searcher`, so the service answers exactly what the evaluation job measured. By default it
  also holds the bi-encoder the index was built with and encodes its own queries: on CPU a query costs a few
  milliseconds to encode and less to search, so a hop between an encoder and a searcher replica would cost more
  than either. Concurrent queries are encoded together by ``@serve.batch`` (dynamic batching, as in Clipper,
  Crankshaw et al., NSDI 2017), which takes the queries already queued and does not wait for more: under load
  they pile up while a forward pass runs and form the next, fuller batch; a lone query goes straight through.
- :class:`QueryEncoder`, with ``args.separate_encoder: true`` only (``configs/serve-cluster.yaml``): the bi-encoder
  in replicas of its own, so that they can hold GPUs and scale apart from the searchers, which then receive
  vectors.
- :class:`Reranker` (only with ``args.reranker``): a cross-encoder (:mod:`denseqa.rerank`) that re-scores the first
  ``candidates`` hits of a request with ``"rerank": true``; the candidates of concurrent requests share forward
  passes (``@serve.batch``), as the encoder's queries do.

Hot swap: set ``user_config: {index: NEW_FOLDER}`` on ``IndexSearcher`` and deploy the config again. Serve calls
:meth:`IndexSearcher.reconfigure` on the running replicas; each loads the new folder beside the old one and swaps
the reference when it is ready, so no request is dropped (requests already running finish on the old index). A
folder whose manifest names another model than the running encoder is refused: the replica logs why, keeps serving
the old index and reports the refusal in ``GET /info``. A replica that has nothing loaded yet fails its health check
and does not receive traffic. The batching of the encoder is changed the same way, through the ``user_config`` of
the deployment that encodes (``IndexSearcher``, or ``QueryEncoder`` when separate).

Deploy with ``denseqa serve --index DIR`` (:mod:`denseqa.drivers.serve`, with the repository's Serve config), or
with ``serve run`` / ``serve deploy`` of a Serve config file whose ``args.index`` names the folder. Replicas import
this module only; the deploy and swap tooling is the driver's.
"""

# No `from __future__ import annotations` here: Serve's @serve.ingress rewrites each route's signature from
# inspect.signature(), which would leave FastAPI string annotations it cannot resolve (the request body would be
# taken for a query parameter). pyproject.toml exempts this file from the rule that requires the import.
import asyncio
import logging
import os
import time
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from denseqa import auth
from denseqa.api import (
    BadRequest,
    BodyLimit,
    Limits,
    SearchRequest,
    SearchResponse,
    body_limit,
    check_hits,
    checked_candidates,
    checked_queries,
    error_body,
    error_responses,
    install_error_handlers,
    max_body_bytes,
    openapi_with_limits,
    set_body_limit,
)
from denseqa.auth import KEY_ENV, KeyCheck, digest
from denseqa.config import EncoderSettings
from denseqa.errors import DenseqaError, InputError, one_line
from denseqa.index import MANIFEST_FILE, partition_root
from denseqa.redaction import masked, masked_values
from denseqa.search import FUSION_DEPTH, fuse_hits, merge_hits
from denseqa.versions import resolve_index, version_root

logger = logging.getLogger("ray.serve")

APP_NAME = "denseqa"


class SearchAppArgs(Limits):
    """The application's ``args`` in a Serve config file (``import_path: denseqa.serve:build_app``)."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(description="Index folder written by build-index: a path every node reaches, or a URI.")
    reranker: str | None = Field(
        None, description="Cross-encoder folder written by train-reranker (a path every node reaches, or a URI): "
        "enables `rerank: true`. None: no Reranker deployment."
    )
    separate_encoder: bool = Field(
        False, description="Encode queries in a QueryEncoder deployment of their own (its replicas can hold GPUs "
        "and scale apart from the searchers). False: each IndexSearcher replica encodes its own queries, one hop "
        "fewer, which is faster on CPU."
    )
    default_mode: Literal["dense", "bm25", "hybrid"] = Field(
        "dense", description="The search mode of a request that names none (`denseqa run` sets the one its "
        "evaluation found best)."
    )


class SearcherSettings(EncoderSettings):
    """``user_config`` of IndexSearcher: the index folder to serve (default: the application's ``args.index``),
    and the batching of its query encoder (ignored with ``args.separate_encoder``, where QueryEncoder's applies)."""

    index: str | None = None


class AuthSettings(BaseModel):
    """``user_config`` of SearchAPI: which API keys it accepts (:mod:`denseqa.auth`). Changed on running replicas
    without a restart, which is how a key is rotated: the new and the old digest for a while, then the new one."""

    model_config = ConfigDict(extra="forbid")

    auth: bool = Field(True, description="Ask every request but /healthz for an API key (false: --no-auth).")
    api_key_sha256: list[str] = Field(
        default_factory=list, description="SHA-256 (hex) of each key accepted; when empty, the replica's "
        "$DENSEQA_API_KEY is. Never the keys themselves: a Serve config is logged and shown by the dashboard.",
    )

    @model_validator(mode="after")
    def _keys_given(self) -> "AuthSettings":
        bad = next((d for d in self.api_key_sha256 if len(d) != 64 or any(c not in "0123456789abcdefABCDEF"
                                                                            for c in d)), None)
        if bad is not None:
            raise ValueError(f"api_key_sha256 {bad[:12]!r}...: not a SHA-256 hex digest (64 hex characters)")
        from_env = os.environ.get(KEY_ENV, "").strip()
        # The rule `denseqa serve` applies, to a key in use only: with digests listed the variable is never read,
        # and refusing the config for it would stop a key rotation on that node.
        if self.auth and not self.api_key_sha256 and from_env and len(from_env) < auth.MIN_KEY_CHARS:
            raise ValueError(f"${KEY_ENV} on this node: an API key needs at least {auth.MIN_KEY_CHARS} characters, "
                             f"got {len(from_env)}")
        if self.auth and not self.api_key_sha256 and not from_env:
            raise ValueError(f"auth is on and no API key is given: set api_key_sha256 in SearchAPI's user_config "
                             f"(`denseqa serve` does), or ${KEY_ENV} on the nodes, or auth: false to serve without")
        return self

    def key_check(self) -> KeyCheck:
        if not self.auth:
            return KeyCheck([], open=True)
        if self.api_key_sha256:
            # Only these: a key rotation's finish revokes every other, a node's own $DENSEQA_API_KEY included.
            return KeyCheck(self.api_key_sha256)
        from_env = os.environ.get(KEY_ENV, "").strip()  # e.g. a Kubernetes secret (deploy/kuberay/rayservice.yaml)
        return KeyCheck([digest(from_env)])


class RerankerSettings(BaseModel):
    """``user_config`` of Reranker: how queries (each with its candidates) are batched into forward passes."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(8, ge=1, description="Most queries whose candidates are scored in one predict call.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long the first query of a batch waits for others to join it."
    )
    pairs_per_forward: int = Field(64, ge=1, description="(query, passage) pairs per forward pass of the model.")


ENCODER_DEFAULTS = EncoderSettings()
RERANKER_DEFAULTS = RerankerSettings()


HEALTH_QUERY = "health check"  # the test query of each searcher's health check


class IndexNotLoaded(RuntimeError):
    pass


def _validated(name: str, config: dict | None, current: BaseModel | None, settings_cls: type[BaseModel]):
    """A replica's ``user_config`` validated; None (after logging why) when a running replica refuses it."""
    try:
        return settings_cls.model_validate(config or {})
    except ValidationError as e:
        if current is None:  # a new replica: fail, so the deployment reports the bad config
            raise InputError(f"{name} user_config: {one_line(e)}") from None
        # A running replica keeps its settings rather than dying on a typo in a redeployed config.
        logger.error("%s user_config refused (%s); keeping %s", name, one_line(e), current)
        return None


# ------------------------------------------------------------------------------------------------ encoder


class BatchedQueryEncoder:
    """The bi-encoder of a replica: encodes queries with the model an index was built with; the queries of
    concurrent calls share forward passes. Held by QueryEncoder, or by IndexSearcher when it encodes its own."""

    def __init__(self, model: dict) -> None:
        import torch

        from denseqa.model import Encoder, query_model_config

        # Ray sets CUDA_VISIBLE_DEVICES from the replica's num_gpus: a GPU is used exactly when one was requested.
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = Encoder.load(query_model_config(model), device=self.device)
        self.encoder.check_matches(model, model["path"])
        self.settings: EncoderSettings | None = None  # set by reconfigure, which Serve calls right after __init__
        self.batches = 0
        self.batched_queries = 0

    def apply(self, settings: EncoderSettings) -> None:
        self._encode_batch.set_max_batch_size(settings.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.settings = EncoderSettings.model_validate(settings.model_dump(include=set(EncoderSettings.model_fields)))

    @serve.batch(max_batch_size=ENCODER_DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=ENCODER_DEFAULTS.batch_wait_timeout_s)
    async def _encode_batch(self, queries: list[str]) -> list[np.ndarray]:
        self.batches += 1
        self.batched_queries += len(queries)
        # Encoded here, on the replica's event loop, not in a thread: Serve's batcher closes a batch as soon as
        # its wait expires, whatever is running, so with the loop free (a thread) batches stayed at ~1 query under
        # load. Blocking the loop makes the calls that arrive meanwhile pile up and form the next, full batch.
        vectors = self.encoder.encode_queries(queries, len(queries))
        return list(vectors)

    async def encode(self, queries: list[str]) -> np.ndarray:
        """Unit-norm float32 vectors, shape (len(queries), dimension); each query joins a shared batch."""
        return np.stack(await asyncio.gather(*(self._encode_batch(q) for q in queries)))

    def describe(self) -> dict:
        settings = self.settings or ENCODER_DEFAULTS
        return {**self.encoder.describe(), "device": self.device, "batching": settings.model_dump(),
                "batches": self.batches, "batched_queries": self.batched_queries,
                "mean_batch_size": self.batched_queries / self.batches if self.batches else None}


@serve.deployment(name="QueryEncoder", user_config=ENCODER_DEFAULTS.model_dump())
class QueryEncoder:
    """Query encoding in replicas of its own (``args.separate_encoder``), e.g. on GPUs."""

    def __init__(self, model: dict) -> None:
        self.queries = BatchedQueryEncoder(model)

    def reconfigure(self, config: dict | None) -> None:
        settings = _validated("QueryEncoder", config, self.queries.settings, EncoderSettings)
        if settings is not None:
            self.queries.apply(settings)

    async def encode(self, queries: list[str]) -> np.ndarray:
        return await self.queries.encode(queries)

    def describe(self) -> dict:
        return self.queries.describe()


# ------------------------------------------------------------------------------------------------ reranker


@serve.deployment(name="Reranker", user_config=RERANKER_DEFAULTS.model_dump(), max_ongoing_requests=32,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8},
                  ray_actor_options={"num_cpus": 1})
class Reranker:
    """Scores each query's candidates with a cross-encoder; the candidates of concurrent queries share a batch.

    Its defaults (above) apply when the Serve config has no ``Reranker`` entry; configs/serve.yaml shows one.
    """

    def __init__(self, path: str) -> None:
        import torch

        from denseqa.rerank import Reranker as CrossEncoderReranker

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.reranker = CrossEncoderReranker(path, device=self.device)
        self.settings: RerankerSettings | None = None
        self.batches = 0
        self.batched_queries = 0

    def reconfigure(self, config: dict | None) -> None:
        settings = _validated("Reranker", config, self.settings, RerankerSettings)
        if settings is None:
            return
        self._score_batch.set_max_batch_size(settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)
        self.reranker.batch_size = settings.pairs_per_forward
        self.settings = settings

    @serve.batch(max_batch_size=RERANKER_DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=RERANKER_DEFAULTS.batch_wait_timeout_s)
    async def _score_batch(self, requests: list[tuple[str, list[str]]]) -> list[list[float]]:
        self.batches += 1
        self.batched_queries += len(requests)
        # On the event loop, for the reason given in QueryEncoder._encode_batch.
        scores = self.reranker.scores([(query, text) for query, texts in requests for text in texts])
        out, start = [], 0
        for _, texts in requests:
            out.append(scores[start:start + len(texts)].tolist())
            start += len(texts)
        return out

    async def score(self, query: str, texts: list[str]) -> list[float]:
        """The cross-encoder's score of (query, text) for each text, in order."""
        return await self._score_batch((query, texts))

    def describe(self) -> dict:
        settings = self.settings or RERANKER_DEFAULTS
        return {**self.reranker.describe(), "batching": settings.model_dump(), "batches": self.batches,
                "mean_batch_size": self.batched_queries / self.batches if self.batches else None}


# ------------------------------------------------------------------------------------------------ searcher


@serve.deployment(name="IndexSearcher", user_config=SearcherSettings().model_dump())
class IndexSearcher:
    """Holds one loaded index folder; swaps to another on ``reconfigure`` when it matches the encoder. With
    ``encodes_queries``, holds the query encoder too and encodes the queries that come without vectors."""

    def __init__(self, index: str, model: dict, encodes_queries: bool = False) -> None:
        self.default_index = index
        self.model = model  # what every index served here must have been built with
        self.queries = BatchedQueryEncoder(model) if encodes_queries else None
        self.searcher = None
        self.last_change: dict[str, Any] | None = None

    async def reconfigure(self, config: dict | None) -> None:
        try:
            settings = SearcherSettings.model_validate(config or {})
        except ValidationError as e:
            self._refuse(str((config or {}).get("index") or self.default_index), one_line(e))
            return
        if self.queries is not None:
            self.queries.apply(settings)
        target = settings.index or self.default_index
        if self.searcher is not None and target == self.searcher.index_dir:
            return
        try:
            # Loaded beside the one serving, off the event loop: requests keep being answered meanwhile.
            searcher = await asyncio.to_thread(self._load, target)
        except Exception as e:  # any: a truncated index.faiss is a RuntimeError, a damaged parquet a ValueError
            # Any folder that does not load is refused here: raised, it would fail the update, and Serve would
            # stop the replicas serving the index they have (and start new ones that fail the same way).
            self._refuse(target, f"{type(e).__name__}: {one_line(e)}" if not isinstance(e, DenseqaError)
                         else one_line(e))
            return
        previous, self.searcher = self.searcher, searcher
        self.last_change = {"index": target, "status": "serving", "at": time.time(),
                            "previous": previous.index_dir if previous else None}
        logger.info("IndexSearcher serving %s (%d passages)", masked(target), len(searcher))

    def _load(self, index: str):
        from denseqa import storage
        from denseqa.model import check_model_matches
        from denseqa.search import Searcher

        root = version_root(index)
        if root is not None and not storage.exists(storage.join(resolve_index(index), MANIFEST_FILE)):
            # A version that later updates have removed (a new replica started after two updates without a swap):
            # its index's current version instead, rather than no replica at all.
            logger.warning("IndexSearcher: %s is gone (removed by later updates); loading the current version of "
                           "%s", masked(index), masked(root))
            index = root
        searcher = Searcher(index, load_encoder=False)
        check_model_matches(self.model, searcher.manifest["model"], index)
        return searcher

    def _refuse(self, target: str, reason: str) -> None:
        if self.searcher is None:
            # Nothing to fall back on: fail, so Serve reports the deployment as failed with this message.
            raise InputError(masked(f"IndexSearcher cannot load {target}: {reason}"))
        self.last_change = {"index": target, "status": "refused", "reason": reason, "at": time.time(),
                            "serving": self.searcher.index_dir}
        logger.error("%s", masked(f"IndexSearcher refused {target}: {reason}; still serving "
                                  f"{self.searcher.index_dir}"))

    def check_health(self) -> None:
        """Healthy when a test query is answered end to end: encoded (when this replica encodes), searched in the
        FAISS index, its hit read from the docstore. Serve calls this every few seconds and replaces a replica
        whose check fails, and sends no traffic to one that has not passed yet."""
        searcher = self.searcher
        if searcher is None:
            raise IndexNotLoaded("no index loaded")
        if self.queries is not None:  # straight to the model: a health check is not a query to batch or count
            vector = self.queries.encoder.encode_queries([HEALTH_QUERY], 1)
        else:  # the vectors come from a QueryEncoder: any unit vector exercises the index
            vector = np.full((1, searcher.dimension), searcher.dimension ** -0.5, dtype=np.float32)
        hits = searcher.hits(*(row[0] for row in searcher.dense_positions(vector, 1)))
        if len(searcher) and (not hits or not isinstance(hits[0].text, str)):
            raise RuntimeError(masked(f"the test query found nothing in {searcher.index_dir} ({len(searcher)} "
                                      "passages)"))

    async def search(self, queries: list[str], k: int, mode: str, vectors: np.ndarray | None = None) -> dict:
        """The hits of each query; ``vectors`` are the queries' own (None: this replica encodes them)."""
        searcher = self.searcher  # one reference for the whole request, even if a swap happens meanwhile
        if searcher is None:
            raise IndexNotLoaded("no index loaded")
        if vectors is None and mode != "bm25" and self.queries is not None:
            vectors = await self.queries.encode(queries)
        scores, positions = searcher.rank(queries, k, mode, vectors)
        # Positions in the whole index, for the ingress to fuse the hits of partitions as one index would.
        offset = (searcher.manifest.get("partition") or {}).get("positions", [0])[0]
        hits = [[{"id": h.id, "score": h.score, "text": h.text, "position": h.position + offset}
                 for h in searcher.hits(s, p)] for s, p in zip(scores, positions, strict=True)]
        # Index names leave the replica masked: a URI's inline password must not reach a client (/healthz is open).
        return {"index": masked(searcher.index_dir), "hits": hits}

    def describe_encoder(self) -> dict | None:
        return self.queries.describe() if self.queries is not None else None

    def serving(self) -> dict:
        """What this replica serves and its last change, unmasked: for the driver that swaps the index (through a
        deployment handle), never over HTTP, where :meth:`status` masks them."""
        return {"index": self.searcher.index_dir if self.searcher else None, "last_change": self.last_change}

    def status(self) -> dict:
        searcher = self.searcher
        return {"index": masked(searcher.index_dir) if searcher else None, "count": len(searcher) if searcher else 0,
                "bm25": bool(searcher and searcher.bm25 is not None), "last_change": masked_values(self.last_change),
                "manifest": searcher.info() if searcher else None}


# ------------------------------------------------------------------------------------------------ ingress

# /openapi.json and /docs are SearchAPI's own routes: the schema states this deployment's limits (api.py).
http = FastAPI(
    title="denseqa search",
    summary="Semantic search over the passages of a denseqa index: dense, BM25 or hybrid.",
    version="1", openapi_url=None, docs_url=None, redoc_url=None,
)
install_error_handlers(http)
# Documents the scheme in the OpenAPI schema; the check itself is the middleware below, which also covers the
# docs pages (routes FastAPI adds itself, which take no dependencies).
bearer = Security(HTTPBearer(auto_error=False, description="The service's API key (see `denseqa serve`)."))
# /healthz for load balancers' health checks; / is the search page, which holds no data and asks for the key.
OPEN_PATHS = ("/healthz", "/")


http.add_middleware(BodyLimit, max_bytes=body_limit)  # set by the SearchAPI replica from its limits


@http.middleware("http")
async def require_api_key(request: Request, call_next):
    path = request.url.path[len(request.scope.get("root_path", "")):] or "/"
    check = auth.installed()  # this process's SearchAPI replica's; None until it is configured: nothing passes
    if path in OPEN_PATHS or (check is not None and check.allows(request.headers.get("authorization"))):
        return await call_next(request)
    message = "missing or wrong API key: send `Authorization: Bearer <key>` with the service's key (`denseqa " \
              f"serve` printed where it is: ~/.denseqa/api_key on the machine that deployed it, or ${KEY_ENV})"
    return JSONResponse(error_body("authorization", message), status_code=401,
                        headers={"WWW-Authenticate": 'Bearer realm="denseqa"'})


# How long the ingress keeps retrying a call whose replica died: long enough for Serve to start a replacement
# (a searcher loads its model and index in ~10-20 s on 2 cores), short of a client's usual 60 s timeout.
RETRY_DEADLINE_S = 45.0
# After a failure, how long one more attempt may take before it is given up and made again: a call sent to a
# replica on a node that just died can hang until Ray declares the node dead, while the same call made again is
# routed to a live replica (or waits for one). Far above a search's own time, even under load; each attempt that
# times out doubles it for the next (as TCP backs off its retransmission timeout), so that a call slower than it
# on a live replica (re-ranking hundreds of candidates on CPU) still gets its answer within the deadline.
RETRY_ATTEMPT_TIMEOUT_S = 10.0
# A status call (/healthz, /info, the page) waits less: a load balancer's probe gives up after a few seconds.
STATUS_DEADLINE_S = 5.0


class ReplicaUnavailable(RuntimeError):
    """No replica answered a call within the retry deadline (answered 503: the client may try again later)."""

    def as_response(self) -> BadRequest:
        return BadRequest("service", f"{self}; try again later", 503)


async def _awaited(response):
    return await response


async def retried(call, what: str, deadline_s: float = RETRY_DEADLINE_S,
                  attempt_timeout_s: float = RETRY_ATTEMPT_TIMEOUT_S):
    """``await call()``, again while the replica it reached died, is restarting or hangs, until ``deadline_s``.

    Every call retried this way is idempotent (encode, search, score): repeating it on another replica, or on the
    replacement Serve starts, gives the same answer. The handle routes a new call only to live replicas and holds
    it while there are none, so the retry itself waits for the restart. The first attempt runs without a timeout
    (a healthy service pays nothing); the ones after a failure get ``attempt_timeout_s``, doubled after each
    attempt that timed out, and never beyond the deadline. Written here
    because Serve retries a request only when a replica dies before it is assigned, not one a replica was
    working on.
    """
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    deadline, pause, failures, timeout = time.monotonic() + deadline_s, 0.05, 0, attempt_timeout_s
    while True:
        try:
            if not failures:
                return await call()
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(_awaited(call()), timeout=max(0.1, min(timeout, left)))
            except asyncio.TimeoutError:
                timeout *= 2
                raise
        except DeploymentUnavailableError as e:  # it failed to deploy: no retry will reach it (503, not a 500)
            raise ReplicaUnavailable(f"{what}: {e.message}") from e
        except (RayActorError, ReplicaUnavailableError, asyncio.TimeoutError) as e:
            failures += 1
            if time.monotonic() + pause >= deadline:
                raise ReplicaUnavailable(f"{what}: no replica answered within {deadline_s:.0f} s "
                                         f"({failures} attempts; last: {type(e).__name__})") from e
            logger.warning("%s: its replica died, is unreachable or did not answer (%s); retrying", what,
                           type(e).__name__)
            await asyncio.sleep(pause)
            pause = min(2 * pause, 1.0)


def replica_counts(app_name: str = APP_NAME) -> dict[str, dict[str, int]]:
    """Each deployment's replicas by state (RUNNING, STARTING, ...), from the Serve controller. (Defined above the
    ingress: Serve captures what the class refers to when the module defines it.)"""
    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    return {name: {str(getattr(state, "value", state)): count for state, count in d.replica_states.items()}
            for name, d in application.deployments.items()}


def _is(error: Exception, kind: type) -> bool:
    # Serve re-raises a replica's exception as a RayTaskError that is also an instance of the original class.
    return isinstance(error, kind) or isinstance(getattr(error, "cause", None), kind)


@serve.deployment(name="SearchAPI", user_config=AuthSettings.model_construct().model_dump())  # no key: refused
@serve.ingress(http)
class SearchAPI:
    def __init__(self, encoder: DeploymentHandle | None, searcher: DeploymentHandle | list[DeploymentHandle],
                 limits: dict, reranker: DeploymentHandle | None = None, default_mode: str = "dense") -> None:
        # encoder: the QueryEncoder deployment (args.separate_encoder), or None: the searcher encodes.
        # searcher: one IndexSearcher, or one per partition of a partitioned index (their hits are merged here).
        self.encoder = encoder
        self.searchers = searcher if isinstance(searcher, list) else [searcher]
        self.reranker = reranker
        self.limits = Limits.model_validate(limits)
        set_body_limit(max_body_bytes(self.limits))  # read by the app's BodyLimit, as the key check by the auth one
        self.default_mode = default_mode  # of a request that names no mode
        self.auth: AuthSettings | None = None  # set by reconfigure, which Serve calls right after __init__

    def reconfigure(self, config: dict | None) -> None:
        settings = _validated("SearchAPI", config, self.auth, AuthSettings)
        if settings is None:
            return
        auth.install(settings.key_check())
        self.auth = settings
        if not settings.auth:
            logger.warning("SearchAPI: authentication is off; anyone who reaches the port can search and read /info")

    @http.post("/search", response_model=SearchResponse, response_model_exclude_none=True, dependencies=[bearer],
               responses=error_responses(
                   400, 401, 413, 422, 503,
                   s400="Invalid JSON, a mode the index cannot answer, or rerank without a reranker",
                   s401="No API key, or not one the service accepts",
                   s413="Too many queries, a query too long, too many candidates to re-rank, too many hits "
                        "(queries x k), or a body larger than those limits allow",
                   s422="A field is missing or invalid; the body names it",
                   s503="No index loaded yet, or no replica answered within the retry deadline"))
    async def search(self, request: SearchRequest):
        """Search the index: the hits of each query, best first; with ``rerank``, the first ``candidates`` hits
        re-ranked by the cross-encoder and the best ``k`` of them returned."""
        started = time.perf_counter()
        queries = checked_queries(request, self.limits)
        candidates = checked_candidates(request, self.limits, self.reranker is not None)
        check_hits(request, queries, candidates, self.limits)
        mode = request.mode or self.default_mode
        answer = await self._answer((queries, candidates or request.k, mode))
        if isinstance(answer, Exception):
            if _is(answer, InputError):  # e.g. bm25 asked of an index built without it
                raise BadRequest("mode", masked(one_line(getattr(answer, "cause", None) or answer)), 400)
            if _is(answer, IndexNotLoaded):
                raise BadRequest("index", "no index loaded yet", 503)
            if isinstance(answer, ReplicaUnavailable):  # raised here, by this replica's retries
                raise answer.as_response()
            raise answer
        hits = answer["hits"]
        reranked = None
        if candidates is not None:
            # What was re-ranked, not what was asked: a small index or a narrow search finds fewer candidates.
            reranked = max((len(h) for h in hits), default=0)
            try:
                hits = await asyncio.gather(*(self._rerank(q, h, request.k)
                                              for q, h in zip(queries, hits, strict=True)))
            except ReplicaUnavailable as e:
                raise e.as_response() from None
        results = [{"query": q, "hits": h} for q, h in zip(queries, hits, strict=True)]
        return SearchResponse(results=results, mode=mode, k=request.k, index=answer["index"],
                              reranked_candidates=reranked, took_ms=(time.perf_counter() - started) * 1000)

    async def _rerank(self, query: str, hits: list[dict], k: int) -> list[dict]:
        """The best ``k`` of ``hits`` by the cross-encoder's score, each with its score and its search rank."""
        from denseqa.rerank import rerank_order

        scores = await retried(partial(self.reranker.score.remote, query, [h["text"] for h in hits]), "re-ranking")
        return [{**hits[i], "rerank_score": scores[i], "retrieval_rank": int(i) + 1}
                for i in rerank_order(np.asarray(scores))[:k]]

    # Requests that arrive together share one encoder call and one searcher call per (mode, k): every handle
    # call costs a few milliseconds of CPU in each replica it passes, more than FAISS spends on a query. A batch
    # takes the requests already queued and does not wait for more (under load they queue up on their own while
    # the loop is busy). Several batches may be in flight: Serve forms a batch before it waits for a free slot, so a
    # low limit would queue small batches here instead of letting the encoder merge them into full ones. 32 x 8 is
    # the ingress's max_ongoing_requests (256 in configs/serve*.yaml): Serve warns when a replica's batches could
    # hold more requests than it is sent. The encoder's batch is 32, so a larger batch here would only be split
    # (BENCHMARKS.md: 64 x 64 measured no better at 1, 8 or 32 clients).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0, max_concurrent_batches=8)
    async def _answer(self, requests: list[tuple[list[str], int, str]]) -> list[dict | Exception]:
        dense = [q for queries, _, mode in requests if mode != "bm25" for q in queries]
        try:
            # Without a QueryEncoder deployment the searcher encodes the queries it receives without vectors.
            vectors = await retried(partial(self.encoder.encode.remote, dense), "encoding") \
                if dense and self.encoder is not None else None
        except Exception as e:
            return [e] * len(requests)
        rows, start = [], 0  # each request's rows in `vectors`
        for queries, _, mode in requests:
            rows.append(slice(start, start + len(queries)) if mode != "bm25" else None)
            start += len(queries) if mode != "bm25" else 0
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (_, k, mode) in enumerate(requests):
            groups.setdefault((mode, k), []).append(i)
        calls = []
        for (mode, k), members in groups.items():
            queries = [q for i in members for q in requests[i][0]]
            group_vectors = None if vectors is None or mode == "bm25" else \
                np.concatenate([vectors[rows[i]] for i in members])
            calls.append(self._search(queries, k, mode, group_vectors))
        answers = await asyncio.gather(*calls, return_exceptions=True)
        out: list[dict | Exception] = [None] * len(requests)
        for members, answer in zip(groups.values(), answers, strict=True):
            offset = 0
            for i in members:
                n = len(requests[i][0])
                out[i] = answer if isinstance(answer, Exception) else \
                    {"index": answer["index"], "hits": answer["hits"][offset:offset + n]}
                offset += n
        return out

    async def _search(self, queries: list[str], k: int, mode: str, vectors: np.ndarray | None) -> dict:
        """One searcher call, or a scatter-gather over the partitions: each one's k best merged by score; for
        hybrid, each ranking merged (as deep as fusion reads it), then fused here."""
        if len(self.searchers) == 1:
            answer = await retried(partial(self.searchers[0].search.remote, queries, k, mode, vectors), "search")
        else:
            answer = await self._partitioned(queries, k, mode, vectors)
        return {"index": answer["index"], "hits": [[{key: value for key, value in hit.items() if key != "position"}
                                                    for hit in hits] for hits in answer["hits"]]}

    async def _partitioned(self, queries: list[str], k: int, mode: str, vectors: np.ndarray | None) -> dict:
        """The partitions' answers as one index's. During a hot swap each partition's replicas switch versions one
        by one, so one call may reach the old version of one partition and the new of another (or, for hybrid,
        dense and BM25 on different replicas): merged, positions of two versions would be fused as one passage.
        Such an answer is asked again until every part comes from one version, as it does once the swap ends."""
        deadline = time.monotonic() + RETRY_DEADLINE_S  # in all: within the replicas' graceful shutdown
        while True:
            if mode == "hybrid":
                depth = max(k, FUSION_DEPTH)
                dense, lexical = await asyncio.gather(self._gathered(queries, depth, "dense", vectors, deadline),
                                                      self._gathered(queries, depth, "bm25", None, deadline))
                versions = dense["versions"] | lexical["versions"]
                answer = {"index": dense["index"], "hits": [fuse_hits(d, b, k) for d, b in
                                                            zip(dense["hits"], lexical["hits"], strict=True)]}
            else:
                answer = await self._gathered(queries, k, mode, vectors, deadline)
                versions = answer["versions"]
            if len(versions) == 1:
                return answer
            if time.monotonic() > deadline:
                raise ReplicaUnavailable(f"search: the index partitions still answer from {len(versions)} "
                                         f"different versions (a swap that did not finish)")
            await asyncio.sleep(0.2)

    async def _gathered(self, queries: list[str], k: int, mode: str, vectors: np.ndarray | None,
                        deadline: float) -> dict:
        left = max(0.1, deadline - time.monotonic())
        answers = await asyncio.gather(*(retried(partial(s.search.remote, queries, k, mode, vectors), "search",
                                                 deadline_s=left) for s in self.searchers))
        return {"index": partition_root(answers[0]["index"]),
                "versions": {partition_root(a["index"]) for a in answers},
                "hits": [merge_hits([a["hits"][i] for a in answers], k) for i in range(len(queries))]}

    async def _status(self) -> dict:
        """The searcher's status; of a partitioned index, the partitions' together (counts summed)."""
        # Retried as a search is: one searcher replaced (a rolling update, a scale-down, a death) must not turn
        # /healthz into a 503 and have a load balancer drop a healthy ingress. Bounded as a whole: a retry's first
        # attempt has no timeout of its own, and a hung searcher must not hang the probe.
        statuses = await asyncio.wait_for(asyncio.gather(*(
            retried(s.status.remote, "status", deadline_s=STATUS_DEADLINE_S) for s in self.searchers)),
            timeout=STATUS_DEADLINE_S)
        if len(statuses) == 1:
            return statuses[0]
        loaded = all(status["index"] for status in statuses)
        return {"index": partition_root(statuses[0]["index"]) if loaded else None,
                "count": sum(status["count"] for status in statuses),
                "bm25": all(status["bm25"] for status in statuses), "partitions": statuses,
                "last_change": statuses[0]["last_change"]}

    @http.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        """The OpenAPI schema, with this deployment's limits and what its index and reranker can answer."""
        try:
            has_bm25 = (await self._status())["bm25"]
        except Exception:  # no searcher reachable: state what an index with BM25 answers
            has_bm25 = True
        spec = openapi_with_limits(request.app.openapi(), self.limits, self.reranker is not None, has_bm25,
                                   self.default_mode)
        request.app.openapi_schema = None  # patched per call: the next call starts again from the routes
        return JSONResponse(spec)

    @http.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json",
                                   title="denseqa search")

    @http.get("/", include_in_schema=False)
    async def page(self, request: Request) -> HTMLResponse:
        """The search page (see :mod:`denseqa.search_page`)."""
        from denseqa.search_page import content_security_policy, search_page

        try:
            has_bm25 = (await self._status())["bm25"]
        except Exception:  # no searcher reachable yet: the page's searches will say so
            has_bm25 = True
        page = search_page(request.scope.get("root_path", ""), self.default_mode,
                           ["dense", "bm25", "hybrid"] if has_bm25 else ["dense"], self.reranker is not None,
                           self.auth is None or self.auth.auth)
        return HTMLResponse(page, headers={"Content-Security-Policy": content_security_policy(page),
                                           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    @http.get("/healthz", responses={503: {"description": "No index loaded, or the searcher is unreachable"}})
    async def healthz(self, request: Request) -> JSONResponse:
        """200 when an index is loaded and answering, 503 otherwise. Without the key it says only that (it answers
        load balancers); with it, also the index served and its passage count."""
        try:
            status = await self._status()
        except Exception as e:
            # The error (a node's address, a replica's traceback) goes to the log, not to whoever asks: this is open.
            logger.warning("healthz: no searcher answered: %s", masked(one_line(e)))
            return JSONResponse({"status": "unavailable", "reason": "no searcher answered"}, status_code=503)
        if not status["index"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        check = auth.installed()
        if check is None or not check.allows(request.headers.get("authorization")):
            return JSONResponse({"status": "ok"})  # an index URI names a bucket and a run: for key holders only
        return JSONResponse({"status": "ok", "index": status["index"], "count": status["count"]})

    @http.get("/info", dependencies=[bearer], responses=error_responses(401, s401="No API key, or a wrong one"))
    async def info(self) -> dict:
        """The model, the index manifest, the last index change (swap or refusal), the reranker (null if none) and
        the input limits."""
        encoder = self.encoder.describe.remote() if self.encoder is not None else \
            self.searchers[0].describe_encoder.remote()
        model, status = await asyncio.gather(encoder, self._status())
        reranker = await self.reranker.describe.remote() if self.reranker is not None else None
        return {"model": model, "index": status, "reranker": reranker, "limits": self.limits.model_dump(),
                "default_mode": self.default_mode,
                "replicas": await asyncio.to_thread(replica_counts)}


def build_app(args: dict) -> serve.Application:
    """The application for a Serve config's ``import_path`` (``denseqa.serve:build_app``) and ``args``."""
    from denseqa import storage
    from denseqa.search import read_manifest

    try:
        parsed = SearchAppArgs.model_validate(args)
    except ValidationError as e:
        raise InputError(f"Serve application args: {one_line(e)}") from None
    for key in ("index", "reranker"):
        path = getattr(parsed, key)
        if path is not None and not storage.is_uri(path) and not os.path.isabs(path):
            raise InputError(f"Serve application args.{key} {path!r}: give an absolute path or a URI; replicas "
                             "do not run in your working directory")
    manifest = read_manifest(parsed.index)
    if parsed.default_mode != "dense" and not manifest.get("bm25"):
        raise InputError(f"Serve application args.default_mode {parsed.default_mode}: the index {parsed.index} was "
                         "built without BM25 and answers dense search only")
    model = manifest["model"]  # the encoder is the one the initial index was built with
    partitions = manifest["index"].get("partitions")
    if partitions:  # one searcher deployment per partition; queries are encoded once, before the scatter
        folder = resolve_index(parsed.index)
        searchers = [IndexSearcher.options(name=name).bind(storage.join(folder, *part["folder"].split("/")), model)
                     for name, part in zip(searcher_names(args), partitions, strict=True)]
        reranker = Reranker.bind(parsed.reranker) if parsed.reranker else None
        return SearchAPI.bind(QueryEncoder.bind(model), searchers,
                              parsed.model_dump(include=set(Limits.model_fields)), reranker, parsed.default_mode)
    if parsed.separate_encoder:
        encoder, searcher = QueryEncoder.bind(model), IndexSearcher.bind(parsed.index, model)
    else:
        encoder, searcher = None, IndexSearcher.bind(parsed.index, model, encodes_queries=True)
    reranker = Reranker.bind(parsed.reranker) if parsed.reranker else None
    return SearchAPI.bind(encoder, searcher, parsed.model_dump(include=set(Limits.model_fields)), reranker,
                          parsed.default_mode)


def partition_count(args: dict) -> int:
    """How many partitions the index of these ``args`` has (1: not partitioned, or no index there yet: a config
    file's placeholder; deploying it fails on the folder, in one line)."""
    from denseqa.search import read_manifest

    try:
        return len(read_manifest(args["index"])["index"].get("partitions") or [None]) if args.get("index") else 1
    except (InputError, OSError):  # OSError: a URI that cannot be reached from here
        return 1


def searcher_names(args: dict) -> list[str]:
    """``IndexSearcher``, or ``IndexSearcher-<i>`` for each partition of a partitioned index."""
    count = partition_count(args)
    return ["IndexSearcher"] if count == 1 else [f"IndexSearcher-{i}" for i in range(count)]


def deployment_names(args: dict) -> list[str]:
    """The deployments the application of these ``args`` has (a Serve config may not name any other)."""
    searchers = searcher_names(args)
    separate = args.get("separate_encoder") or len(searchers) > 1
    return ["SearchAPI", *searchers, *(["QueryEncoder"] if separate else []),
            *(["Reranker"] if args.get("reranker") else [])]


def encoding_deployment(args: dict) -> str:
    """The deployment whose ``user_config`` sets the query encoder's batching."""
    return "QueryEncoder" if "QueryEncoder" in deployment_names(args) else "IndexSearcher"




# ------------------------------------------------------------------------------------------------ command

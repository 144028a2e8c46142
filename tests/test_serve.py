"""The Ray Serve search application over real HTTP on a local Ray: results, bad input, load, hot swap, re-ranking.

Three real index folders are built by the indexing job's function: A and B with the bundled all-MiniLM-L6-v2 over
different real Debian answers, C with the tiny random BERT (a model that does not match the running encoder).
The application is deployed with the repository's configs/serve.yaml (one replica per deployment, so the test
is deterministic on 2 CPUs) through the same `deploy()` that `denseqa serve` uses: the searcher encodes its own
queries, as on CPU by default; one test runs the separate QueryEncoder deployment that GPU clusters use.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from denseqa.config import JobConfig

from .conftest import _free_port, real_pairs

pytestmark = pytest.mark.slow

SECTIONS = ("corpus", "model", "embed", "index")
TEST_KEY = "denseqa-test-key-0123456789abcdef"  # the service's API key in these tests
AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


def _build(tmp, name: str, pairs, model: dict | None = None, **index) -> str:
    from denseqa.drivers.build_index import run_build_index

    pq.write_table(pairs, tmp / f"{name}.parquet")
    run_build_index(JobConfig.from_dict({
        "corpus": {"path": str(tmp / f"{name}.parquet"), "from_answers": True},
        "model": model or {},
        "index": {"output": str(tmp / name), **index},
    }, sections=SECTIONS))
    return str(tmp / name)


@pytest.fixture(scope="module")
def indexes(ray_local, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("serve")
    pairs_a, pairs_b = real_pairs(300, seed=11), real_pairs(200, seed=12)
    return {
        "A": _build(tmp, "A", pairs_a), "B": _build(tmp, "B", pairs_b),
        "C": _build(tmp, "C", real_pairs(60, seed=13), {"model": tiny_model_dir}),
        "D": _build(tmp, "D", real_pairs(40, seed=14), bm25=False),
        "E": _build(tmp, "E", real_pairs(60, seed=15)),
        "P": _build(tmp, "P", pairs_a, partitions=3),  # A's passages in 3 partitions
        "questions": pairs_a.column("question").to_pylist(), "questions_b": pairs_b.column("question").to_pylist(),
    }


def _test_config(index: str, port: int, searcher_index: str | None = None, separate_encoder: bool = False) -> dict:
    from denseqa.drivers import serve as deploying
    from denseqa.serve import deployment_names

    config = deploying.with_overrides(deploying.load_serve_config(), index=index, host="127.0.0.1", port=port,
                                      separate_encoder=separate_encoder)
    app = deploying.application(config)
    # Serve logs every request at INFO (access log): thousands of lines in a load test.
    app["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
    for name in deployment_names(app["args"]):
        entry = deploying.deployment(config, name)
        entry.setdefault("autoscaling_config", {}).update(min_replicas=1, max_replicas=1)
        entry.setdefault("ray_actor_options", {}).setdefault("num_cpus", 0.5)  # QueryEncoder: not in serve.yaml
    searcher = deploying.deployment(config, "IndexSearcher")
    searcher["user_config"] = {**(searcher.get("user_config") or {}), "index": searcher_index}
    return deploying.with_auth(config, TEST_KEY)


@pytest.fixture(scope="module")
def service(indexes):
    from ray import serve

    from denseqa.drivers import serve as deploying

    port = _free_port()
    url = deploying.deploy(_test_config(indexes["A"], port))
    yield {"url": url, "port": port}
    serve.shutdown()


def post(url: str, body=None, data: str | None = None, timeout: float = 60, headers: dict = AUTH) -> requests.Response:
    if data is not None:
        return requests.post(f"{url}/search", data=data, headers={"content-type": "application/json", **headers},
                             timeout=timeout)
    return requests.post(f"{url}/search", json=body, headers=headers, timeout=timeout)


def get(url: str, timeout: float = 30, headers: dict = AUTH) -> requests.Response:
    return requests.get(url, headers=headers, timeout=timeout)


def _assert_same_hits(response_hits: list[dict], expected) -> None:
    assert [h["id"] for h in response_hits] == [h.id for h in expected]
    assert [h["text"] for h in response_hits] == [h.text for h in expected]
    np.testing.assert_allclose([h["score"] for h in response_hits], [h.score for h in expected], atol=1e-5)


def test_results_equal_the_library_searcher(service, indexes):
    from denseqa.search import Searcher

    searcher = Searcher(indexes["A"])
    questions = indexes["questions"][:24]
    for mode in ("dense", "bm25", "hybrid"):
        expected = searcher.search(questions, k=10, mode=mode)
        many = post(service["url"], {"queries": questions, "k": 10, "mode": mode})
        assert many.status_code == 200, many.text
        body = many.json()
        assert body["index"] == indexes["A"] and body["mode"] == mode and body["took_ms"] > 0
        assert [r["query"] for r in body["results"]] == questions
        for result, hits in zip(body["results"], expected, strict=True):
            _assert_same_hits(result["hits"], hits)
        for question, hits in zip(questions[:5], expected[:5], strict=True):
            one = post(service["url"], {"query": question, "k": 10, "mode": mode}).json()
            _assert_same_hits(one["results"][0]["hits"], hits)
    # Dense results really are nearest neighbours: the question's own answer is found for most questions
    answers = {h["text"] for r in post(service["url"], {"queries": questions, "k": 10}).json()["results"]
               for h in r["hits"][:1]}
    assert len(answers) > 12


def test_a_separate_query_encoder_answers_the_same(service, indexes):
    """args.separate_encoder (configs/serve-cluster.yaml, for GPU replicas): a QueryEncoder deployment encodes and
    the searcher receives vectors; the answers are the library's, as with the searcher encoding its own."""
    from denseqa.drivers import serve as deploying
    from denseqa.search import Searcher

    searcher = Searcher(indexes["A"])
    questions = indexes["questions"][:8]
    try:
        deploying.deploy(_test_config(indexes["A"], service["port"], separate_encoder=True))
        for mode in ("dense", "hybrid"):
            body = post(service["url"], {"queries": questions, "k": 10, "mode": mode}).json()
            for result, hits in zip(body["results"], searcher.search(questions, k=10, mode=mode), strict=True):
                _assert_same_hits(result["hits"], hits)
        model = get(f"{service['url']}/info", timeout=30).json()["model"]
        assert model["batched_queries"] >= 16 and model["device"] == "cpu"
    finally:
        deploying.deploy(_test_config(indexes["A"], service["port"]))
    assert post(service["url"], {"query": questions[0]}).status_code == 200


def test_serve_config_keeps_only_the_deployments_the_application_has(indexes):
    """`denseqa serve` drops a config's entries for deployments the application lacks (Serve refuses them) and
    puts the batching flags on the deployment that encodes."""
    from denseqa.drivers import serve as deploying

    def config_for(**serve) -> dict:
        app = deploying.application(deploying.serve_config_for(JobConfig.from_dict(
            {"serve": {"index": indexes["A"], **serve}}, sections=("serve",))))
        return {d["name"]: d for d in app["deployments"]}

    assert set(config_for()) == {"SearchAPI", "IndexSearcher"}
    assert config_for(max_batch_size=8)["IndexSearcher"]["user_config"]["max_batch_size"] == 8
    cluster_config = str(deploying.DEFAULT_SERVE_CONFIG.with_name("serve-cluster.yaml"))
    assert set(config_for(serve_config=cluster_config)) == {"SearchAPI", "QueryEncoder", "IndexSearcher"}
    assert set(config_for(serve_config=cluster_config, separate_encoder=False)) == \
        {"SearchAPI", "IndexSearcher"}
    assert config_for(separate_encoder=True, max_batch_size=8)["QueryEncoder"]["user_config"] == \
        {"max_batch_size": 8}


BAD_INPUTS = [
    # (raw body, status, field)
    ("{not json", 400, "body"),
    ("", 400, "body"),
    ("[1, 2]", 400, "body"),
    ("{}", 422, "query"),
    ('{"k": 5}', 422, "query"),
    ('{"query": "a", "queries": ["b"]}', 422, "query"),
    ('{"query": ""}', 422, "query"),
    ('{"query": "   \\n\\t"}', 422, "query"),
    ('{"query": 42}', 422, "query"),
    ('{"query": null, "queries": null}', 422, "query"),
    ('{"queries": []}', 422, "queries"),
    ('{"queries": "not a list"}', 422, "queries"),
    ('{"queries": ["fine", 3]}', 422, "queries[1]"),
    ('{"queries": ["fine", " "]}', 422, "queries[1]"),
    ('{"query": "\\ud800 lone surrogate"}', 422, "query"),  # valid JSON, not encodable text
    ('{"queries": ["fine", "x\\udc00"]}', 422, "queries[1]"),
    ('{"query": "x", "k": 0}', 422, "k"),
    ('{"query": "x", "k": 1001}', 422, "k"),
    ('{"query": "x", "k": -3}', 422, "k"),
    ('{"query": "x", "k": "10"}', 422, "k"),
    ('{"query": "x", "k": 2.5}', 422, "k"),
    ('{"query": "x", "mode": "semantic"}', 422, "mode"),
    ('{"query": "x", "top_k": 3}', 422, "top_k"),
    ('{"query": "x", "rerank": true}', 400, "rerank"),  # this service has no reranker
    ('{"query": "x", "rerank": "yes"}', 422, "rerank"),
    ('{"query": "x", "candidates": 20}', 422, "candidates"),  # only with rerank
    ('{"queries": [' + ", ".join(['"q"'] * 65) + "]}", 413, "queries"),
    ('{"queries": [' + ", ".join(['"q"'] * 64) + '], "k": 1000}', 413, "k"),  # 64,000 hits: beyond max_hits
    ('{"query": "' + "x" * 2001 + '"}', 413, "query"),
    ('{"queries": ["ok", "' + "y" * 2001 + '"]}', 413, "queries[1]"),
]


def test_every_bad_input_gets_a_4xx_naming_the_field(service, indexes):
    from denseqa.search import read_manifest

    url = service["url"]
    for raw, status, field in BAD_INPUTS:
        response = post(url, data=raw)
        assert response.status_code == status, (raw[:80], response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["field"] == field, (raw[:80], error)
        assert error["message"]
    # A body larger than any request within the limits can be: refused before it is read whole
    huge = post(url, data='{"query": "' + "x" * 2_000_000 + '"}')
    assert huge.status_code == 413 and huge.json()["error"]["field"] == "body", huge.text[:300]
    assert get(f"{url}/search", timeout=30).status_code == 405
    assert requests.post(f"{url}/nowhere", json={"query": "x"}, headers=AUTH, timeout=30).status_code == 404
    # The limits are inclusive, and the server still answers after all of that
    assert post(url, {"queries": ["q"] * 64, "k": 156}).status_code == 200  # 9,984 hits
    ok = post(url, {"queries": ["q"] * 10, "k": 1000})  # 10,000 hits: max_hits
    assert ok.status_code == 200 and len(ok.json()["results"]) == 10
    assert len(ok.json()["results"][0]["hits"]) == read_manifest(indexes["A"])["count"]  # k beyond the corpus
    assert post(url, {"query": "z" * 2000, "k": 1}).status_code == 200


def test_health_info_and_openapi(service, indexes):
    from denseqa.search import read_manifest

    url = service["url"]
    health = get(f"{url}/healthz", timeout=30)
    manifest = read_manifest(indexes["A"])
    assert health.status_code == 200 and health.json() == {"status": "ok", "index": indexes["A"],
                                                           "count": manifest["count"]}
    info = get(f"{url}/info", timeout=30).json()
    assert info["model"]["weights_sha256"] == manifest["model"]["weights_sha256"]
    assert info["model"]["device"] == "cpu" and info["model"]["batching"]["max_batch_size"] == 32
    assert info["index"]["manifest"]["count"] == manifest["count"] and info["index"]["bm25"] is True
    assert info["limits"] == {"max_queries": 64, "max_query_chars": 2000, "max_candidates": 200, "max_hits": 10000}
    assert info["replicas"] == {"SearchAPI": {"RUNNING": 1}, "IndexSearcher": {"RUNNING": 1}}
    assert info["reranker"] is None and info["default_mode"] == "dense"
    docs = get(f"{url}/docs", timeout=30)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = get(f"{url}/openapi.json", timeout=30).json()
    assert {"/search", "/healthz", "/info"} <= set(spec["paths"])
    # The schema states the limits the server enforces, the error bodies, and the API key
    request = spec["components"]["schemas"]["SearchRequest"]
    assert request["properties"]["queries"]["maxItems"] == 64 and request["properties"]["queries"]["minItems"] == 1
    assert request["properties"]["query"]["maxLength"] == 2000 and request["properties"]["k"]["maximum"] == 1000
    assert request["oneOf"] == [{"required": ["query"]}, {"required": ["queries"]}]
    assert request["properties"]["rerank"]["enum"] == [False] and "candidates" not in request["properties"]
    # a request naming no mode gets the deployment's default mode, which the schema states (null is refused)
    assert {k: request["properties"]["mode"][k] for k in ("type", "enum", "default")} == \
        {"type": "string", "enum": ["dense", "bm25", "hybrid"], "default": "dense"}
    assert post(url, {"query": "a text editor", "k": 2}).json()["mode"] == "dense"
    assert post(url, {"query": "a text editor", "mode": None}).status_code == 422
    search = spec["paths"]["/search"]["post"]
    assert {"400", "401", "413", "422", "503"} <= set(search["responses"])
    assert search["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert search["security"] == [{"HTTPBearer": []}]


def test_the_openapi_contract_holds_against_the_live_service(service, tmp_path):
    """schemathesis, a real OpenAPI client, with all its checks against the live schema: valid requests are
    answered 200, invalid ones refused with a documented 4xx, every response matches its schema, and a request
    without the key is refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    st = Path(sys.executable).with_name("st")
    result = subprocess.run(
        [str(st), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
         f"{service['url']}/openapi.json", "--checks", "all", "--header", f"Authorization: Bearer "
         f"{TEST_KEY}", "--max-examples", "25", "--seed", "7", "--request-timeout", "60", "--max-failures", "5"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path)  # where it keeps its examples database
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or "passed" in result.stdout, result.stdout[-3000:]


def test_every_endpoint_but_healthz_needs_the_api_key(service):
    """No key, a wrong key, the right key in another scheme: 401 with the usual error body; the right key: 200.
    /healthz answers load balancers without one, and / (the search page, which holds no data) loads without one.
    The key itself is nowhere in the deployed config."""
    from denseqa.auth import digest
    from denseqa.drivers import serve as deploying

    url = service["url"]
    refused = [("POST", "/search", {}), ("GET", "/info", {}), ("GET", "/docs", {}), ("GET", "/openapi.json", {}),
               ("GET", "/redoc", {}), ("POST", "/search", {"Authorization": "Bearer wrong-key-0123456789abcdef"}),
               ("POST", "/search", {"Authorization": f"Basic {TEST_KEY}"}),
               ("POST", "/search", {"Authorization": TEST_KEY}), ("POST", "/search", {"Authorization": "Bearer "})]
    for method, path, headers in refused:
        r = requests.request(method, f"{url}{path}", json={"query": "an editor"}, headers=headers, timeout=30)
        assert r.status_code == 401, (method, path, headers, r.status_code)
        assert r.json()["error"]["field"] == "authorization" and "Bearer" in r.json()["error"]["message"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert post(url, {"query": "an editor"}).status_code == 200
    for path in ("/info", "/docs", "/openapi.json"):
        assert get(f"{url}{path}").status_code == 200, path
    keyless = get(f"{url}/healthz", headers={})  # it answers, and names what it serves only to key holders
    assert keyless.status_code == 200 and keyless.json() == {"status": "ok"}, keyless.text
    running = str(deploying.running_config())
    assert TEST_KEY not in running and digest(TEST_KEY) in running


def test_no_auth_serves_anyone_and_says_so(service, indexes, caplog, tmp_path):
    """--no-auth is a choice the driver warns about; the replicas then let requests through without a key."""
    from denseqa.drivers import serve as deploying

    cfg = JobConfig.from_dict({"serve": {"index": indexes["A"], "auth": False,
                                         "api_key_file": str(tmp_path / "never")}}, sections=("serve",))
    with caplog.at_level("WARNING"):
        config = deploying.serve_config_for(cfg)
    assert "--no-auth: the service answers anyone" in caplog.text and not (tmp_path / "never").exists()
    assert deploying.deployment(config, "SearchAPI")["user_config"] == {"auth": False, "api_key_sha256": []}
    deploying.deploy(deploying.with_auth(_test_config(indexes["A"], service["port"]), None))
    try:
        assert post(service["url"], {"query": "an editor"}, headers={}).status_code == 200
        assert get(f"{service['url']}/info", headers={}).status_code == 200
    finally:
        deploying.deploy(_test_config(indexes["A"], service["port"]))
    assert post(service["url"], {"query": "an editor"}, headers={}).status_code == 401


def test_key_rotation_under_load_fails_no_request(service, indexes, tmp_path):
    """rotate_key start: the new key and the old are accepted while clients move over; finish: only the new one.
    The running SearchAPI replica is reconfigured, not restarted, and no request of the clients fails."""
    from denseqa import auth
    from denseqa.drivers import serve as deploying

    url, key_file = service["url"], tmp_path / "api_key"
    auth.write_key(key_file, TEST_KEY)
    load = Load(url, indexes["questions"], clients=4)
    try:
        time.sleep(1)
        started = deploying.rotate_key("start", str(key_file))
        new_key = auth.read_key_file(key_file)
        assert new_key != TEST_KEY and started == {"stage": "start", "keys_accepted": 2, "key": str(key_file)}
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        for key in (TEST_KEY, new_key):  # both keys work during the change
            assert post(url, {"query": "an editor"}, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        load.headers["Authorization"] = f"Bearer {new_key}"  # the clients move to the new key
        time.sleep(1)
        assert deploying.rotate_key("finish", str(key_file))["keys_accepted"] == 1
        time.sleep(1)
    finally:
        load.finish()
    assert not load.errors and len(load.outcomes) > 10, (load.errors[:3], len(load.outcomes))
    assert post(url, {"query": "an editor"}).status_code == 401  # the old key no longer
    assert post(url, {"query": "an editor"}, headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    deploying.deploy(_test_config(indexes["A"], service["port"]))  # back to the tests' key
    assert post(url, {"query": "an editor"}).status_code == 200


class Load:
    """Clients that post real questions in a loop and keep every outcome (status, index that answered)."""

    def __init__(self, url: str, questions: list[str], clients: int = 16, requests_each: int | None = None,
                 queries_per_request: int = 1):
        self.url, self.questions, self.requests_each = url, questions, requests_each
        self.queries_per_request = queries_per_request
        # (sent at, answered at, 200 or 0, index that answered)
        self.outcomes: list[tuple[float, float, int, str | None]] = []
        self.answers: list[tuple[str, str, list[str]]] = []  # (question, mode, hit ids) of each 200
        self.errors: list[str] = []
        self.headers = dict(AUTH)  # the key the clients send; a test may change it while they run
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(clients)
        self.futures = [self.pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        with requests.Session() as session:
            n = 0
            while not self.stop.is_set() and (self.requests_each is None or n < self.requests_each):
                question = self.questions[(i * 7919 + n) % len(self.questions)]
                mode = ("dense", "hybrid", "bm25", "dense")[n % 4]
                sent = time.monotonic()
                body = {"query": question, "k": 5, "mode": mode} if self.queries_per_request == 1 else \
                    {"queries": [question] * self.queries_per_request, "k": 5, "mode": mode}
                try:
                    r = session.post(f"{self.url}/search", json=body, headers=dict(self.headers), timeout=120)
                    ok = r.status_code == 200 and all(len(result["hits"]) >= 1 for result in r.json()["results"])
                    index = r.json().get("index") if r.status_code == 200 else None
                    if ok:
                        with self.lock:
                            self.answers.append((question, mode, [h["id"] for h in r.json()["results"][0]["hits"]]))
                    if not ok:
                        with self.lock:
                            self.errors.append(f"{r.status_code} {r.text[:200]}")
                except Exception as e:  # a dropped connection is a failed request too
                    with self.lock:
                        self.errors.append(repr(e))
                    index, ok = None, False
                with self.lock:
                    self.outcomes.append((sent, time.monotonic(), 200 if ok else 0, index))
                n += 1

    def finish(self) -> None:
        """Wait for every client: after its requests_each, or (unbounded) once told to stop."""
        if self.requests_each is None:
            self.stop.set()
        for f in self.futures:
            f.result()
        self.pool.shutdown()


def test_encoder_batching_is_reconfigured_live(service, indexes):
    """user_config of the deployment that encodes changes the running replica's batching; a bad one is logged and
    ignored there, and fails a new replica (which has no settings to keep)."""
    from denseqa import serve as ds
    from denseqa.drivers import serve as deploying
    from denseqa.errors import InputError
    from denseqa.search import read_manifest

    def deploy_with(settings: dict) -> dict:
        config = _test_config(indexes["A"], service["port"])
        deploying.deployment(config, ds.encoding_deployment(deploying.application(config)["args"]))["user_config"] = \
            settings
        deploying.deploy(config)
        return get(f"{service['url']}/info", timeout=30).json()["model"]

    batches_at_start = deploy_with({"max_batch_size": 32, "batch_wait_timeout_s": 0.005})["batches"]
    model = deploy_with({"max_batch_size": 4, "batch_wait_timeout_s": 0.001})
    assert model["batching"] == {"max_batch_size": 4, "batch_wait_timeout_s": 0.001}
    before = model["batches"]
    assert before >= batches_at_start  # the same replica: its counters were not reset by a restart
    assert post(service["url"], {"queries": indexes["questions"][:12], "k": 3}).status_code == 200
    after = get(f"{service['url']}/info", timeout=30).json()["model"]
    assert after["batches"] - before >= 3  # 12 queries, at most 4 per forward pass
    assert deploy_with({"max_batch_size": 0})["batching"]["max_batch_size"] == 4  # refused, kept
    assert deploy_with(ds.EncoderSettings().model_dump())["batching"]["max_batch_size"] == 32

    model = read_manifest(indexes["A"])["model"]
    with pytest.raises(InputError, match="max_batch_siz"):
        ds.QueryEncoder.func_or_class(model).reconfigure({"max_batch_siz": 8})
    with pytest.raises(InputError, match="max_batch_siz"):
        asyncio.run(ds.IndexSearcher.func_or_class(indexes["A"], model, encodes_queries=True)
                    .reconfigure({"max_batch_siz": 8}))


def test_concurrent_load_has_no_errors(service, indexes):
    load = Load(service["url"], indexes["questions"], clients=16, requests_each=32)
    load.finish()
    assert len(load.outcomes) == 512 and not load.errors, load.errors[:5]
    # Concurrent queries were encoded together: more than one query per forward pass on average
    info = get(f"{service['url']}/info", timeout=30).json()
    assert info["model"]["mean_batch_size"] > 1.5, info["model"]


class ReplicaCounts(threading.Thread):
    """A deployment's RUNNING replicas twice a second, from the Serve controller: (seconds since start, count,
    replicas starting)."""

    def __init__(self, deployment: str):
        super().__init__(daemon=True)
        self.deployment, self.started, self.seen, self.done = deployment, time.monotonic(), [], threading.Event()

    def run(self):
        from denseqa.serve import replica_counts

        while not self.done.is_set():
            states = replica_counts().get(self.deployment, {})
            self.seen.append((round(time.monotonic() - self.started, 1), states.get("RUNNING", 0),
                              states.get("STARTING", 0)))
            self.done.wait(0.5)

    def now(self) -> tuple[int, int]:
        return self.seen[-1][1:] if self.seen else (0, 0)

    def wait_for(self, test, timeout_s: float) -> bool:
        """Until test(running, starting) holds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not test(*self.now()):
            time.sleep(0.5)
        return test(*self.now())

    def changes(self) -> list[tuple[float, int, int]]:
        return [seen for i, seen in enumerate(self.seen) if i == 0 or self.seen[i - 1][1:] != seen[1:]]


def test_the_query_encoder_scales_out_under_load_and_back_without_failing_a_request(service, indexes):
    """Serve's autoscaler on the QueryEncoder of configs/serve-cluster.yaml, with 0.25 CPU per replica so 3 fit
    beside the searcher and the ingress on 2 CPUs, and a target of 1 query in flight per replica (the shipped
    target is for GPU replicas, which 2 cores cannot load). 16 clients sending 8 queries a request make it add
    replicas; 1 client afterwards lets it remove them while requests still flow. Every request is answered."""
    from denseqa.drivers import serve as deploying

    config = _test_config(indexes["A"], service["port"], separate_encoder=True)
    shipped = deploying.deployment(deploying.load_serve_config(
        str(deploying.DEFAULT_SERVE_CONFIG.with_name("serve-cluster.yaml"))), "QueryEncoder")["autoscaling_config"]
    encoder = deploying.deployment(config, "QueryEncoder")
    encoder["ray_actor_options"]["num_cpus"] = 0.25
    # Load reported every second, not every 10 s (a deprecated option, the one that still sets it for one
    # deployment), and short delays, so the test takes a minute and not the shipped minutes
    encoder["autoscaling_config"] = {**shipped, "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                                     "metrics_interval_s": 1, "look_back_period_s": 3, "upscale_delay_s": 2,
                                     "downscale_delay_s": 8}
    replicas = ReplicaCounts("QueryEncoder")
    try:
        deploying.deploy(config)
        replicas.start()
        assert replicas.wait_for(lambda running, starting: running == 1 and not starting, 60), replicas.changes()
        heavy = Load(service["url"], indexes["questions"], clients=16, queries_per_request=8)
        try:
            scaled_out = replicas.wait_for(lambda running, starting: running >= 2, 90)
            time.sleep(4)  # the load goes on a while with the replicas added
        finally:
            heavy.finish()
        loaded_until = round(time.monotonic() - replicas.started, 1)
        light = Load(service["url"], indexes["questions"], clients=1)
        try:
            scaled_in = replicas.wait_for(lambda running, starting: running == 1 and not starting, 90)
        finally:
            light.finish()
    finally:
        replicas.done.set()
        deploying.deploy(_test_config(indexes["A"], service["port"]))
    print(f"QueryEncoder replicas (s, RUNNING, STARTING): {replicas.changes()}; {len(heavy.outcomes)} requests "
          f"under load until {loaded_until} s, {len(light.outcomes)} after")
    assert scaled_out and scaled_in, replicas.changes()
    assert max(n for t, n, _ in replicas.seen if t <= loaded_until) >= 2 and replicas.seen[-1][1:] == (1, 0)
    assert not heavy.errors and not light.errors, (heavy.errors + light.errors)[:5]
    assert len(light.outcomes) > 10


def _replica_pid(deployment: str) -> int:
    """The process of the deployment's one replica, found as an operator would: Ray titles it
    ``ray::ServeReplica:<app>:<deployment>``."""
    import psutil

    title = f"ServeReplica:denseqa:{deployment}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith(f"ray::{title}"):
            found.append(process.pid)
    assert len(found) == 1, found
    return found[0]


def test_a_replica_killed_under_load_loses_no_request(service, indexes):
    """8 clients for 30 s; the replica that encodes and searches is SIGKILLed twice. The ingress retries the calls
    that replica held on its replacement, so every request is answered 200, with the library Searcher's hits."""
    import os
    import signal

    from denseqa.search import Searcher

    load = Load(service["url"], indexes["questions"], clients=8)
    started, killed = time.monotonic(), []
    try:
        for at in (5, 18):
            time.sleep(max(0.0, started + at - time.monotonic()))
            pid = _replica_pid("IndexSearcher")
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            while _replica_pid_or_none("IndexSearcher") in (None, pid):  # until Serve runs its replacement
                time.sleep(0.5)
        time.sleep(max(0.0, started + 30 - time.monotonic()))
    finally:
        load.finish()
    assert not load.errors, (len(load.errors), load.errors[:3])
    assert all(status == 200 for _, _, status, _ in load.outcomes) and len(load.outcomes) > 100
    stall = max(answered - sent for sent, answered, _, _ in load.outcomes)
    print(f"replica kills {killed}: {len(load.outcomes)} requests, all 200; longest wait {stall:.1f} s")
    assert len(set(killed)) == 2
    searcher = Searcher(indexes["A"])
    for mode in ("dense", "bm25", "hybrid"):
        asked = sorted({q for q, m, _ in load.answers if m == mode})
        expected = dict(zip(asked, ([h.id for h in row] for row in searcher.search(asked, k=5, mode=mode)),
                            strict=True))
        assert all(ids == expected[q] for q, m, ids in load.answers if m == mode), mode


def _replica_pid_or_none(deployment: str) -> int | None:
    try:
        return _replica_pid(deployment)
    except AssertionError:
        return None


def test_hot_swap_under_load_then_a_mismatched_index_is_refused(service, indexes):
    from denseqa.drivers import serve as deploying
    from denseqa.errors import InputError
    from denseqa.search import Searcher

    url = service["url"]
    load = Load(url, indexes["questions"] + indexes["questions_b"], clients=16)
    try:
        time.sleep(3)
        swap_at = time.monotonic()
        status = deploying.swap_index(indexes["B"], timeout_s=120)  # what `denseqa serve --index B --swap` runs
        # B's version 1, by a name that later updates of B do not move (versions.pinned_version)
        pinned_b = f"{indexes['B']}/versions/000001"
        assert status["index"] == pinned_b and status["last_change"]["previous"] == indexes["A"]
        swapped_at = time.monotonic()
        time.sleep(3)
        # An index built with another model: `--swap` refuses it before touching the deployment ...
        with pytest.raises(InputError, match="index was built with dimension 32"):
            deploying.swap_index(indexes["C"], timeout_s=120)
        assert get(f"{url}/info", timeout=30).json()["index"]["last_change"]["index"] == pinned_b
        # ... and a Serve config edited by hand to point at it is refused by the replicas: B keeps serving
        deploying.deploy(_test_config(indexes["A"], service["port"], searcher_index=indexes["C"]))
        deadline = time.monotonic() + 120
        while (get(f"{url}/info", timeout=30).json()["index"]["last_change"] or {}).get("status") != \
                "refused":
            assert time.monotonic() < deadline, "the mismatched index was neither served nor refused"
            time.sleep(0.2)
        time.sleep(2)
    finally:
        load.finish()
    assert not load.errors, load.errors[:5]
    answered_by = Counter(index for *_, index in load.outcomes)
    assert set(answered_by) == {indexes["A"], pinned_b}, answered_by
    # Answered before the swap began: by A; sent after it returned: by B (one replica). A request sent before the
    # swap may still be queued at the replica when it reconfigures, so its answer may come from either index.
    assert all(index == indexes["A"] for _, answered, _, index in load.outcomes if answered < swap_at)
    assert all(index == pinned_b for sent, _, _, index in load.outcomes if sent > swapped_at)
    assert len(load.outcomes) > 200

    info = get(f"{url}/info", timeout=30).json()["index"]
    assert info["index"] == pinned_b
    assert info["last_change"]["index"] == indexes["C"] and info["last_change"]["serving"] == pinned_b
    assert "index was built with dimension" in info["last_change"]["reason"]
    # Results now come from B, equal to the library's
    questions = indexes["questions_b"][:10]
    expected = Searcher(indexes["B"]).search(questions, k=5)
    body = post(url, {"queries": questions, "k": 5}).json()
    for result, hits in zip(body["results"], expected, strict=True):
        _assert_same_hits(result["hits"], hits)
    assert get(f"{url}/healthz", timeout=30).json()["index"] == pinned_b


def test_a_swap_to_a_damaged_index_is_refused_and_the_config_goes_back(service, indexes, tmp_path):
    """A folder whose manifest matches but whose index file is cut short (a copy that stopped half-way): the
    replicas refuse it and keep serving, and the deployed config names the served folder again, so a replica
    started later loads that one instead of failing on the damaged one."""
    import shutil

    from denseqa.drivers import serve as deploying
    from denseqa.errors import InputError
    from denseqa.index import INDEX_FILE
    from denseqa.versions import resolve_index

    url = service["url"]
    serving = get(f"{url}/info", timeout=30).json()["index"]["index"]
    damaged = tmp_path / "damaged"
    shutil.copytree(resolve_index(serving), damaged)
    index_file = damaged / INDEX_FILE
    index_file.write_bytes(index_file.read_bytes()[:100])
    # When it is swapped in, Then the replicas refuse it, naming faiss's error, and keep serving the same index
    with pytest.raises(InputError, match=r"damaged: refused by the running searcher: RuntimeError"):
        deploying.swap_index(str(damaged), timeout_s=120)
    assert get(f"{url}/healthz", timeout=30).json()["index"] == serving
    assert post(url, {"query": "a package", "k": 3}).status_code == 200
    # And the running config names the served folder again
    running = deploying.running_config()
    assert deploying.deployment(running, "IndexSearcher")["user_config"]["index"] == serving


def test_a_deploy_to_another_address_than_the_running_serve_is_refused(service, indexes):
    from denseqa.drivers import serve as deploying
    from denseqa.errors import InputError

    # Serve keeps the address it started on and would ignore the new one: refused, naming both
    port = service["port"]
    with pytest.raises(InputError, match=rf"listening on 127\.0\.0\.1:{port}, and a running Serve cannot move "
                                         rf"to 127\.0\.0\.1:{port + 1}"):
        deploying.deploy(_test_config(indexes["A"], port + 1))
    with pytest.raises(InputError, match=r"cannot move to 0\.0\.0\.0"):
        deploying.deploy(deploying.with_overrides(_test_config(indexes["A"], port), host="0.0.0.0"))


def test_an_update_published_under_load_is_swapped_in_and_its_deletes_vanish(service, indexes, tmp_path):
    """`denseqa build-index --update E --upsert ... --delete ... --swap` while clients search E: no request fails,
    the new version serves, the deleted passages are gone and the new one is found."""
    from denseqa.drivers import serve as deploying
    from denseqa.drivers.update_index import run_update_index
    from denseqa.search import Searcher
    from denseqa.texts import text_id

    url, root = service["url"], indexes["E"]
    assert deploying.swap_index(root, timeout_s=120)["index"] == f"{root}/versions/000001"
    before = Searcher(root)
    victims = before.docstore.column("id").to_pylist()[:5]
    victim_texts = before.docstore.column("text").to_pylist()[:5]
    new_pairs = real_pairs(10, seed=99)
    pq.write_table(new_pairs, tmp_path / "new.parquet")
    pq.write_table(pa.table({"id": victims}), tmp_path / "delete.parquet")
    load = Load(url, before.docstore.column("text").to_pylist()[5:], clients=8)
    try:
        time.sleep(2)
        manifest = run_update_index(JobConfig.from_dict({"index": {
            "update": root, "upsert": str(tmp_path / "new.parquet"), "delete": str(tmp_path / "delete.parquet"),
            "swap": True}}, sections=SECTIONS))
        swapped_at = time.monotonic()
        time.sleep(2)
    finally:
        load.finish()
    assert not load.errors, load.errors[:5]
    version = f"{root}/versions/000002"
    assert manifest["version"] == 2 and manifest["update"]["deleted"] == 5
    assert all(index == version for sent, _, _, index in load.outcomes if sent > swapped_at)
    assert {index for *_, index in load.outcomes} == {f"{root}/versions/000001", version}
    info = get(f"{url}/info", timeout=30).json()["index"]
    assert info["index"] == version and info["count"] == manifest["count"] == len(before) - 5 + manifest[
        "update"]["new"]
    for mode in ("dense", "bm25", "hybrid"):
        body = post(url, {"queries": victim_texts, "k": 50, "mode": mode}).json()
        assert not {h["id"] for r in body["results"] for h in r["hits"]} & set(victims), mode
    answer = new_pairs.column("answer")[0].as_py()
    assert post(url, {"query": answer, "k": 1}).json()["results"][0]["hits"][0]["id"] == text_id(answer)
    deploying.swap_index(indexes["B"], timeout_s=120)  # back to what the tests after this one expect


def test_a_mode_the_index_cannot_answer_is_a_400(service, indexes):
    from denseqa.drivers import serve as deploying

    deploying.deploy(_test_config(indexes["A"], service["port"], searcher_index=indexes["D"]))  # built with --no-bm25
    deadline = time.monotonic() + 120
    while get(f"{service['url']}/healthz", timeout=30).json()["index"] != indexes["D"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for mode in ("bm25", "hybrid"):
        response = post(service["url"], {"query": "a terminal text editor", "mode": mode})
        assert response.status_code == 400 and response.json()["error"]["field"] == "mode", response.text
        assert "built without BM25" in response.json()["error"]["message"]
    assert post(service["url"], {"query": "a terminal text editor", "mode": "dense"}).status_code == 200


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory) -> str:
    """A cross-encoder folder: the bundled all-MiniLM-L6-v2 with a new (seeded, untrained) one-score head. The test
    below checks the service against the model itself, which needs a deterministic model, not a good one."""
    import torch
    from sentence_transformers import CrossEncoder

    from denseqa.model import bundled_model_path

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cross-encoder")
    CrossEncoder(str(bundled_model_path()), num_labels=1, max_length=128).save(str(path))
    return str(path)


def _deploy_with_reranker(index: str, port: int, cross_encoder_dir: str) -> str:
    from denseqa.drivers import serve as deploying

    config = _test_config(index, port)
    deploying.application(config)["args"]["reranker"] = cross_encoder_dir
    deploying.deployment(config, "Reranker").update(autoscaling_config={"min_replicas": 1, "max_replicas": 1},
                                             ray_actor_options={"num_cpus": 0.25})  # 2 CPUs for 3 deployments
    return deploying.deploy(config)


def test_rerank_returns_the_candidates_reordered_by_the_cross_encoder(service, indexes, cross_encoder_dir):
    from sentence_transformers import CrossEncoder

    url = _deploy_with_reranker(indexes["A"], service["port"], cross_encoder_dir)
    model = CrossEncoder(cross_encoder_dir)
    questions = indexes["questions"][:3]
    for mode in ("dense", "hybrid"):
        for question in questions:
            candidates = post(url, {"query": question, "k": 20, "mode": mode}).json()["results"][0]["hits"]
            assert all("rerank_score" not in h for h in candidates)  # a plain search is unchanged
            response = post(url, {"query": question, "k": 5, "mode": mode, "rerank": True, "candidates": 20})
            assert response.status_code == 200, response.text
            assert response.json()["reranked_candidates"] == 20
            hits = response.json()["results"][0]["hits"]
            # The CrossEncoder called directly on the same candidates gives the same order and scores
            expected = model.predict([(question, h["text"]) for h in candidates], batch_size=64)
            order = np.argsort(-expected, kind="stable")[:5]
            assert [h["id"] for h in hits] == [candidates[i]["id"] for i in order]
            np.testing.assert_allclose([h["rerank_score"] for h in hits], expected[order], rtol=1e-5, atol=1e-6)
            assert [h["retrieval_rank"] for h in hits] == [int(i) + 1 for i in order]
            assert [h["score"] for h in hits] == [candidates[i]["score"] for i in order]  # both scores
    body = post(url, {"queries": questions, "k": 3, "rerank": True}).json()  # several queries; 50 by default
    assert body["reranked_candidates"] == 50 and [len(r["hits"]) for r in body["results"]] == [3, 3, 3]
    for request, status, field in (({"k": 10, "candidates": 5}, 422, "candidates"),
                                   ({"candidates": 201}, 413, "candidates"), ({"candidates": 0}, 422, "candidates"),
                                   ({"k": 300}, 413, "k")):  # k sets the default candidates: k is what was sent
        response = post(url, {"query": questions[0], "rerank": True, **request})
        assert response.status_code == status, (request, response.text)
        assert response.json()["error"]["field"] == field, response.text
    info = get(f"{url}/info", timeout=30).json()["reranker"]
    assert info["path"] == cross_encoder_dir and info["mean_batch_size"] >= 1


def _chromium():
    """Debian's chromium, headless, driven by its chromium-driver (scripts/test.sh installs both)."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=options)


def test_the_search_page_in_a_real_browser(service, indexes, cross_encoder_dir, tmp_path):
    """The page at / in headless chromium: it asks for the key, shows the API's hits for the query in its URL and
    for a typed one (mode and rerank chosen), shows a 4xx's message, and asks again after a 401."""
    import os
    from pathlib import Path
    from urllib.parse import parse_qs, quote, urlparse

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = _deploy_with_reranker(indexes["A"], service["port"], cross_encoder_dir)
    page = requests.get(f"{url}/", timeout=30)  # no key needed for the page: it holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    # The page's one script runs by its hash, no other inline script would (the browser below runs it)
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    assert indexes["questions"][0] not in page.text

    def api_ids(body: dict) -> list[str]:
        response = post(url, body)
        assert response.status_code == 200, response.text
        return [h["id"] for h in response.json()["results"][0]["hits"]]

    def page_ids() -> list[str]:
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.hit") or d.find_element(By.ID, "error").text)
        return [li.get_attribute("data-id") for li in browser.find_elements(By.CSS_SELECTOR, "li.hit")]

    browser = _chromium()
    wait = WebDriverWait(browser, 60)
    try:
        question = indexes["questions"][5]
        browser.get(f"{url}/?q={quote(question)}&mode=bm25")  # a search is a link...
        key_box = browser.find_element(By.ID, "key-box")
        wait.until(lambda d: key_box.is_displayed())  # ...that first asks for the key
        assert "needs its API key" in browser.find_element(By.ID, "error").text
        browser.find_element(By.ID, "key").send_keys(TEST_KEY)
        browser.find_element(By.ID, "key-save").click()
        assert page_ids() == api_ids({"query": question, "k": 10, "mode": "bm25"})
        assert browser.execute_script("return sessionStorage.getItem('denseqa_api_key')") == TEST_KEY

        # Typing a query, hybrid, re-ranked: the API's hits, and the URL now holds the search.
        typed = "edit text files in a terminal"
        box = browser.find_element(By.ID, "q")
        box.clear()
        box.send_keys(typed)
        Select(browser.find_element(By.ID, "mode")).select_by_value("hybrid")
        browser.find_element(By.ID, "rerank").click()
        browser.find_element(By.ID, "go").click()
        wait.until(ready.url_contains("rerank=1"))
        shown = page_ids()
        assert shown == api_ids({"query": typed, "k": 10, "mode": "hybrid", "rerank": True})
        assert "rerank" in browser.find_element(By.CSS_SELECTOR, "li.hit .score").text
        assert parse_qs(urlparse(browser.current_url).query) == {"q": [typed], "mode": ["hybrid"], "rerank": ["1"]}
        screenshots = Path(os.environ.get("DENSEQA_SCREENSHOTS", tmp_path))
        browser.save_screenshot(str(screenshots / "search-page.png"))

        # A 4xx shows the service's own message: a query longer than the limit is a 413 naming the query.
        expected = post(url, {"query": "x" * 2001, "k": 10, "mode": "hybrid", "rerank": True})
        assert expected.status_code == 413
        browser.execute_script("document.getElementById('q').value = 'x'.repeat(2001)")
        browser.find_element(By.ID, "go").click()
        error = wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert error == f"413 query: {expected.json()['error']['message']}"
        assert browser.find_elements(By.CSS_SELECTOR, "li.hit") == []

        # A wrong key: the 401's message, the key forgotten, and the page asks for it again.
        browser.execute_script("sessionStorage.setItem('denseqa_api_key', 'not-the-key')")
        box = browser.find_element(By.ID, "q")
        box.clear()
        box.send_keys(typed)
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: key_box.is_displayed())
        assert browser.find_element(By.ID, "error").text.startswith("401 authorization: missing or wrong API key")
        assert browser.execute_script("return sessionStorage.getItem('denseqa_api_key')") is None

        # Two searches in flight: the slower earlier reply is dropped, not added to the newer search's hits.
        browser.execute_script("sessionStorage.setItem('denseqa_api_key', arguments[0])", TEST_KEY)
        browser.find_element(By.ID, "rerank").click()  # off: plain hybrid searches
        browser.execute_script("""
            const real = window.fetch;
            window.fetch = async (url, init) => {
              const slow = init.body.includes('slow first');
              if (slow) await new Promise((wake) => setTimeout(wake, 2000));
              const response = await real(url, init);
              if (slow) setTimeout(() => { window.slowReplied = true; }, 1000);
              return response;
            };""")
        for query in ("slow first", typed):
            box.clear()
            box.send_keys(query)
            browser.find_element(By.ID, "go").click()
        wait.until(lambda d: d.execute_script("return window.slowReplied === true"))
        assert page_ids() == api_ids({"query": typed, "k": 10, "mode": "hybrid"})

        # A score JSON could not carry (the service sends a non-finite one as null) does not stop the list.
        browser.execute_script("""
            const hits = [{id: "a", text: "first", score: null, rerank_score: null, retrieval_rank: 2},
                          {id: "b", text: "second", score: 0.5, rerank_score: 0.25, retrieval_rank: 1}];
            const body = {results: [{query: "q", hits}], mode: "hybrid", k: 10, reranked_candidates: 2, index: "i",
                          took_ms: 1};
            window.fetch = async () => new Response(JSON.stringify(body),
                                                    {headers: {"content-type": "application/json"}});""")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("2 hits"))
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "li.hit .score")] == [
            "rerank n/a (search n/a)", "rerank 0.250 (search 0.500)"]

        # A link naming a mode this deployment lacks opens with the default mode instead of an empty choice.
        browser.get(f"{url}/?q=x&mode=nosuch")
        assert Select(browser.find_element(By.ID, "mode")).first_selected_option.get_attribute("value") == \
            get(f"{url}/info", timeout=30).json()["default_mode"]
    finally:
        browser.quit()


def test_searcher_replica_logic_without_serve(indexes):
    """The IndexSearcher class itself: unhealthy until loaded, a first bad index fails, later ones are refused."""
    from denseqa.errors import InputError
    from denseqa.search import read_manifest
    from denseqa.serve import IndexNotLoaded, IndexSearcher

    model = read_manifest(indexes["A"])["model"]
    replica = IndexSearcher.func_or_class(indexes["A"], model)
    with pytest.raises(IndexNotLoaded):
        replica.check_health()
    with pytest.raises(InputError, match="cannot load .*C.*index was built with dimension"):
        asyncio.run(replica.reconfigure({"index": indexes["C"]}))
    asyncio.run(replica.reconfigure({"index": None}))  # the application's args.index
    replica.check_health()
    assert replica.status()["index"] == indexes["A"]
    asyncio.run(replica.reconfigure({"index": "/no/such/folder"}))
    asyncio.run(replica.reconfigure({"indx": indexes["B"]}))
    assert replica.status()["index"] == indexes["A"]
    assert replica.last_change["status"] == "refused" and "indx" in replica.last_change["reason"]
    asyncio.run(replica.reconfigure({"index": indexes["B"]}))
    assert replica.status()["index"] == indexes["B"] and replica.last_change["previous"] == indexes["A"]
    # An index at a URI with an inline password (here one that fails at once, refused): what leaves the replica
    # (/healthz is open) names it masked
    asyncio.run(replica.reconfigure({"index": "nosuch://AKIAEXAMPLE:wJalrSECRET@bucket/index"}))
    status = str(replica.status())
    assert "wJalrSECRET" not in status and "nosuch://AKIAEXAMPLE:***@bucket/index" in status
    assert replica.last_change["status"] == "refused"
    # Health is a test query answered end to end, not just "loaded": a searcher whose index stops answering, or
    # whose encoder fails, is unhealthy (and Serve replaces it)
    encoding = IndexSearcher.func_or_class(indexes["A"], model, encodes_queries=True)
    asyncio.run(encoding.reconfigure({}))
    encoding.check_health()
    batches = encoding.queries.batches
    encoding.check_health()
    assert encoding.queries.batches == batches  # health checks are not counted as queries

    class BrokenIndex:
        d, ntotal = replica.searcher.index.d, replica.searcher.index.ntotal

        def search(self, vectors, k):
            return np.zeros((len(vectors), k), np.float32), np.full((len(vectors), k), -1, np.int64)

    replica.searcher.index = BrokenIndex()
    with pytest.raises(RuntimeError, match="the test query found nothing"):
        replica.check_health()
    encoding.queries.encoder = None
    with pytest.raises(AttributeError):
        encoding.check_health()


def test_shipped_serve_config_is_valid_and_autoscales():
    from ray.serve.schema import ServeDeploySchema

    from denseqa import serve as ds
    from denseqa.drivers import serve as deploying

    config = deploying.load_serve_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "denseqa.serve:build_app"
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == set(ds.deployment_names(app.args)) == {"SearchAPI", "IndexSearcher"}
    for name in ("SearchAPI", "IndexSearcher"):
        scaling = deployments[name].autoscaling_config
        assert scaling["max_replicas"] > scaling["min_replicas"] >= 1 and scaling["target_ongoing_requests"] > 0
    searcher = deployments["IndexSearcher"]  # it encodes: its queries in flight are what batches are made of
    assert searcher.max_ongoing_requests >= searcher.user_config["max_batch_size"]
    settings = ds.SearcherSettings.model_validate(searcher.user_config)
    assert settings.index is None and settings.batch_wait_timeout_s == 0
    # The GPU cluster's config: a QueryEncoder deployment of its own, batched the same way
    cluster = ServeDeploySchema.model_validate(deploying.load_serve_config(
        str(deploying.DEFAULT_SERVE_CONFIG.with_name("serve-cluster.yaml"))))
    (cluster_app,) = cluster.applications
    cluster_deployments = {d.name: d for d in cluster_app.deployments}
    assert set(cluster_deployments) == set(ds.deployment_names(cluster_app.args))
    encoder = cluster_deployments["QueryEncoder"]
    assert encoder.max_ongoing_requests >= encoder.user_config["max_batch_size"]
    assert ds.EncoderSettings.model_validate(encoder.user_config).model_dump() == \
        settings.model_dump(include=set(ds.EncoderSettings.model_fields))


def test_a_deployment_waiting_for_resources_is_named_in_one_line():
    """What `denseqa serve` says while, and when, the application does not start: Serve's own message on the
    deployment whose replicas cannot be scheduled (e.g. a Reranker asking for a CPU the cluster does not have)."""
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatus,
        DeploymentStatusOverview,
        DeploymentStatusTrigger,
    )

    from denseqa.drivers import serve as deploying

    def deployment(status, message: str) -> DeploymentStatusOverview:
        return DeploymentStatusOverview(status=status, status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_STARTED,
                                        replica_states={}, message=message)

    waiting = ("Deployment 'Reranker' in application 'denseqa' has 1 replicas that have taken more than 30s to be "
               "scheduled.\\nResources required for each replica: {\"CPU\": 1.0}, total resources available: "
               "{\"CPU\": 0.25}.")
    state = ApplicationStatusOverview(
        status=ApplicationStatus.DEPLOYING, message="", last_deployed_time_s=0.0,
        deployments={"QueryEncoder": deployment(DeploymentStatus.HEALTHY, ""),
                     "IndexSearcher": deployment(DeploymentStatus.UPDATING, ""),
                     "Reranker": deployment(DeploymentStatus.UPDATING, waiting)})
    (reason,) = deploying._waiting_reasons(state)
    assert "\n" not in reason and reason.startswith("Deployment 'Reranker'")
    assert 'Resources required for each replica: {"CPU": 1.0}, total resources available: {"CPU": 0.25}' in reason
    assert deploying._waiting_reasons(None) == []


def test_retried_calls_outlast_a_dead_or_hanging_replica_and_then_give_up():
    """The ingress' retry without Serve: a call that fails with an actor error, then hangs (a replica on a node
    that just died), is made again until it answers; one that never answers ends in ReplicaUnavailable (503)."""
    from ray.exceptions import ActorUnavailableError

    from denseqa.serve import ReplicaUnavailable, retried

    attempts = []

    async def flaky():
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise ActorUnavailableError("the replica's node died", b"0" * 16)
        if len(attempts) == 2:
            await asyncio.sleep(60)  # routed to the dead replica again: hangs until the attempt's timeout
        return "hits"

    assert asyncio.run(retried(flaky, "search", deadline_s=5, attempt_timeout_s=0.3)) == "hits"
    assert len(attempts) == 3 and attempts[2] - attempts[1] < 1.5

    async def dead():
        raise ActorUnavailableError("gone", b"0" * 16)

    started = time.monotonic()
    with pytest.raises(ReplicaUnavailable, match=r"search: no replica answered within 1 s \(\d+ attempts"):
        asyncio.run(retried(dead, "search", deadline_s=1, attempt_timeout_s=0.3))
    assert time.monotonic() - started < 2

    slow_attempts = []

    async def slow_on_a_live_replica():  # fails once, then takes longer than one attempt's timeout, every time
        slow_attempts.append(time.monotonic())
        if len(slow_attempts) == 1:
            raise ActorUnavailableError("the replica's node died", b"0" * 16)
        await asyncio.sleep(0.5)
        return "scores"

    # An attempt that times out doubles the next one's timeout (0.3, 0.6): a slow call answers within the deadline
    assert asyncio.run(retried(slow_on_a_live_replica, "re-ranking", deadline_s=5, attempt_timeout_s=0.3)) == "scores"
    assert len(slow_attempts) == 3

    async def bad_request():  # anything but a replica failure is not retried
        attempts.append(0)
        raise ValueError("mode bm25: this index has no BM25")

    before = len(attempts)
    with pytest.raises(ValueError):
        asyncio.run(retried(bad_request, "search"))
    assert len(attempts) == before + 1


# ------------------------------------------------------------------------------------------ a partitioned index


def test_partitions_answering_from_two_versions_mid_swap_are_asked_again():
    """During a hot swap one partition's replica may still serve the old version while another serves the new:
    merged, the same position would name two passages. The ingress asks again until all parts agree."""
    from denseqa.serve import SearchAPI

    class Partition:  # a deployment handle's shape: .search.remote(...) is awaited
        def __init__(self, part: int, versions: list[int]):
            self.part, self.versions, self.search = part, versions, self

        async def remote(self, queries, k, mode, vectors):
            version = self.versions.pop(0) if len(self.versions) > 1 else self.versions[0]
            return {"index": f"s3://b/idx/versions/00000{version}/partitions/part-{self.part}",
                    "hits": [[{"id": f"v{version}-p{self.part}", "score": 1.0 - self.part / 10,
                               "text": "t", "position": self.part}] for _ in queries]}

    api = object.__new__(SearchAPI.func_or_class)
    for mode in ("dense", "hybrid"):
        # partition 1 answers from version 1 twice (the dense and BM25 calls of hybrid), then from version 2
        api.searchers = [Partition(0, [2]), Partition(1, [1, 1, 2])]
        answer = asyncio.run(api._search(["q"], 2, mode, None))
        assert answer["index"] == "s3://b/idx/versions/000002", mode
        assert {h["id"] for h in answer["hits"][0]} == {"v2-p0", "v2-p1"}, mode


def test_a_partitioned_index_served_by_three_searchers_equals_the_whole_one(service, indexes, monkeypatch):
    """A's passages built as 3 partitions: 3 searcher deployments, the ingress merging their hits. Dense results
    (exact search) equal the unpartitioned index's; every mode equals the library's partitioned Searcher; each
    searcher holds a third of the passages; one killed under load costs no request. Runs last: it redeploys."""
    import os
    import signal

    from denseqa.config import ServeConfig
    from denseqa.drivers import serve as deploying
    from denseqa.errors import InputError
    from denseqa.search import Searcher
    from denseqa.serve import deployment_names

    root = indexes["P"]
    monkeypatch.setenv("DENSEQA_API_KEY", TEST_KEY)
    config = deploying.serve_config_for(JobConfig(serve=ServeConfig(index=root, host="127.0.0.1",
                                                                    port=service["port"]), used=("serve",)))
    app = deploying.application(config)
    app["logging_config"] = {"log_level": "WARNING", "enable_access_log": False}
    names = [e["name"] for e in app["deployments"]]
    assert sorted(names) == sorted(deployment_names(app["args"])) == sorted(
        ["SearchAPI", "QueryEncoder", "IndexSearcher-0", "IndexSearcher-1", "IndexSearcher-2"])
    for name in deployment_names(app["args"]):  # 2 CPUs here: a quarter each, one replica
        entry = deploying.deployment(config, name)
        entry.setdefault("autoscaling_config", {}).update(min_replicas=1, max_replicas=1)
        entry.setdefault("ray_actor_options", {})["num_cpus"] = 0.25
    url = deploying.deploy(config)

    whole, partitioned = Searcher(indexes["A"]), Searcher(root)
    questions = indexes["questions"][:20]
    body = post(url, {"queries": questions, "k": 10}).json()
    assert body["index"] == root
    for result, hits in zip(body["results"], whole.search(questions, k=10), strict=True):
        _assert_same_hits(result["hits"], hits)
        assert [h["score"] for h in result["hits"]] == pytest.approx([h.score for h in hits], abs=1e-5)
    for mode in ("bm25", "hybrid"):
        body = post(url, {"queries": questions, "k": 10, "mode": mode}).json()
        for result, hits in zip(body["results"], partitioned.search(questions, k=10, mode=mode), strict=True):
            _assert_same_hits(result["hits"], hits)
    with pytest.raises(InputError, match="1 partition.s., the running application has 3 searcher"):
        deploying.swap_index(indexes["A"], timeout_s=60)  # another shape of deployment: deploy, not swap
    info = get(f"{url}/info").json()["index"]
    counts = [p["count"] for p in info["partitions"]]
    assert info["count"] == len(whole) == sum(counts) and max(counts) - min(counts) <= 1

    load = Load(url, indexes["questions"], clients=8)
    try:
        time.sleep(3)
        pid = _replica_pid("IndexSearcher-1")
        os.kill(pid, signal.SIGKILL)
        while _replica_pid_or_none("IndexSearcher-1") in (None, pid):
            time.sleep(0.5)
        time.sleep(3)
    finally:
        load.finish()
    assert not load.errors, (len(load.errors), load.errors[:3])
    assert len(load.outcomes) > 50

"""Serving benchmark for BENCHMARKS.md (issue 4): the Ray Serve application against one plain FastAPI process.

Both serve the same index folder (the bundled all-MiniLM-L6-v2 over real Debian English answers) with the same
encoder and FAISS index, on this machine, in the same run:

- serve: ``configs/serve.yaml`` deployed by ``denseqa.drivers.serve.deploy`` on a local Ray (HTTP proxy -> SearchAPI ->
  IndexSearcher, which encodes its queries with ``@serve.batch``); the ``separate-encoder`` variant runs the
  topology of GPU clusters instead (SearchAPI -> QueryEncoder -> IndexSearcher, ``args.separate_encoder``).
  ``--encoder-cpus`` overrides the CPUs of the replica that encodes (which is also its torch / ONNX Runtime
  thread count: Ray sets OMP_NUM_THREADS from it).
- baseline: the same request model and checks (:mod:`denseqa.api`) in one FastAPI app under one uvicorn process;
  each request encodes its query and searches on its own (FastAPI's thread pool, torch's default threads).

Closed-loop load: N clients (threads with keep-alive connections), each sending real held-out questions one
request at a time (``{"query": q, "k": 10}``, dense) for ``--duration`` seconds after a warm-up. Reported per
system and client count: requests/s, p50/p99 latency, errors; and the serve/baseline ratios.

A third part (``floor``) measures what Ray Serve itself costs here: one client against an app that does no work,
answered by the ingress replica alone and after one handle call to a second replica (the hop the default
topology has between SearchAPI and IndexSearcher), behind Serve's Python proxy and behind its HAProxy ingress
(configs/serve.yaml's default).

A second part measures the bare encoder (no HTTP, no Ray) by torch threads and batch size: what batching can
buy on this machine.

    python bench/bench_serve.py --clients 1,8,32 --duration 20            # both parts
    python bench/bench_serve.py --parts encoder                          # one part; the file keeps the others
    python bench/bench_serve.py --parts floor

Needs ../shared/data. Results go to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "debian-packages-en.parquet"

# At module level: FastAPI resolves the route's (string) annotations in this module's globals.
from denseqa.api import Limits, SearchRequest, SearchResponse, checked_queries, install_error_handlers  # noqa: E402

BENCH_KEY = "denseqa-benchmark-key-0123456789"  # the serve side checks it on every request, as by default
BENCH_AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}  # the baseline ignores it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ data and index


def build_index(work: Path, corpus_size: int, queries: int) -> tuple[str, list[str]]:
    """An index over ``corpus_size`` distinct real answers (reused if present) and ``queries`` of their questions."""
    table = pq.read_table(DATA)
    rng = np.random.default_rng(0)
    order = rng.permutation(table.num_rows)
    seen, rows = set(), []
    for i in order:
        answer = table["answer"][int(i)].as_py()
        if answer.strip() and answer not in seen:
            seen.add(answer)
            rows.append(int(i))
        if len(rows) == corpus_size:
            break
    pairs = table.take(pa.array(rows))
    questions = pairs.column("question").to_pylist()
    order = rng.permutation(len(questions))[:queries]
    questions = [questions[i] for i in order]
    index = work / f"index-{corpus_size}"
    if not (index / "manifest.json").exists():
        from denseqa.config import JobConfig
        from denseqa.drivers.build_index import run_build_index

        pq.write_table(pairs, work / f"pairs-{corpus_size}.parquet")
        run_build_index(JobConfig.from_dict({
            "corpus": {"path": str(work / f"pairs-{corpus_size}.parquet"), "from_answers": True},
            "index": {"output": str(index), "overwrite": True},
        }, sections=("corpus", "model", "embed", "index")))
        import ray

        ray.shutdown()  # the job started a local Ray; each server below starts its own
    return str(index), questions


# ------------------------------------------------------------------------------------------ the two servers


def baseline_app(index: str):
    """One process: FastAPI + the library Searcher (encoder and FAISS index in memory), no batching."""
    from fastapi import FastAPI

    from denseqa.search import Searcher

    searcher = Searcher(index)
    limits = Limits()
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/search", response_model=SearchResponse)
    def search(request: SearchRequest):  # a plain def: FastAPI runs it in its thread pool
        started = time.perf_counter()
        queries = checked_queries(request, limits)
        mode = request.mode or "dense"  # a request naming no mode gets the service's default, dense as shipped
        hits = searcher.search(queries, request.k, mode)
        results = [{"query": q, "hits": [{"id": h.id, "score": h.score, "text": h.text} for h in row]}
                   for q, row in zip(queries, hits, strict=True)]
        return SearchResponse(results=results, mode=mode, k=request.k, index=index,
                              took_ms=(time.perf_counter() - started) * 1000)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def run_baseline_server(index: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(index), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_baseline(index: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--baseline-server", index, "--port", str(port)],
                               start_new_session=True)
    url = f"127.0.0.1:{port}"
    wait_healthy(url, process)
    return process, url


def start_serve(index: str, encoder_cpus: float | None, ray_cpus: int, throughput_optimized: bool,
                separate_encoder: bool = False, haproxy: bool = False) -> str:
    import ray

    from denseqa.drivers import serve as deploying
    from denseqa.serve import encoding_deployment

    # Ray Serve's throughput-optimized mode (fewer threads and log writes per request, gRPC between the proxy
    # and the replicas) is an environment variable of every Serve process: set before Ray starts them.
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1" if throughput_optimized else "0"
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False)
    port = free_port()
    config = deploying.with_overrides(deploying.load_serve_config(), index=index, host="127.0.0.1", port=port,
                                      separate_encoder=separate_encoder or None)
    app = deploying.application(config)
    if separate_encoder:  # configs/serve.yaml has no QueryEncoder entry: its options are those of the searcher
        searcher = deploying.deployment(config, "IndexSearcher")
        app["deployments"].append({"name": "QueryEncoder", "user_config": {
            k: v for k, v in searcher["user_config"].items() if k != "index"}, "ray_actor_options": {"num_cpus": 1}})
        searcher["user_config"] = {"index": None}
        searcher["ray_actor_options"]["num_cpus"] = 0.5
    if haproxy:  # the opt-in HAProxy ingress, as README says to set it: the controller and the application
        config["controller_options"] = {"runtime_env": {"env_vars": {deploying.HA_PROXY_ENV: "1"}}}
        app["runtime_env"] = {"env_vars": {deploying.HA_PROXY_ENV: "1"}}
    if encoder_cpus is not None:
        entry = deploying.deployment(config, encoding_deployment(app["args"]))
        entry["ray_actor_options"]["num_cpus"] = encoder_cpus
    deploying.deploy(deploying.with_auth(config, BENCH_KEY))  # on by default, so measured with it
    url = f"127.0.0.1:{port}"
    wait_healthy(url)
    return url


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            conn = http.client.HTTPConnection(url, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout_s} s")


# ------------------------------------------------------------------------------------------ load


def load(url: str, questions: list[str], clients: int, duration_s: float, warmup_s: float) -> dict:
    """Closed loop: each client sends its next question as soon as the previous answer arrives."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = time.monotonic()
    measure_from, stop_at = start + warmup_s, start + warmup_s + duration_s

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(url, timeout=120)
        n = i * 9973
        while True:
            sent = time.monotonic()
            if sent >= stop_at:
                break
            body = json.dumps({"query": questions[n % len(questions)], "k": 10})
            n += 1
            try:
                conn.request("POST", "/search", body, {"content-type": "application/json", **BENCH_AUTH})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"hits"' in payload
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(url, timeout=120)
            done = time.monotonic()
            if sent >= measure_from:
                if ok:
                    latencies[i].append(done - sent)
                else:
                    errors[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_latencies = np.array([x for row in latencies for x in row]) * 1000
    return {
        "clients": clients, "requests": int(all_latencies.size), "errors": int(sum(errors)),
        "qps": round(all_latencies.size / duration_s, 1),
        "p50_ms": round(float(np.percentile(all_latencies, 50)), 1),
        "p99_ms": round(float(np.percentile(all_latencies, 99)), 1),
    }


def encoder_counters(url: str) -> tuple[int, int]:
    """(forward passes, queries encoded) of the encoder replica so far, from GET /info."""
    conn = http.client.HTTPConnection(url, timeout=30)
    conn.request("GET", "/info", headers=BENCH_AUTH)
    model = json.loads(conn.getresponse().read())["model"]
    return model["batches"], model["batched_queries"]


def serve_load(url: str, questions: list[str], clients: int, duration_s: float, warmup_s: float) -> dict:
    """:func:`load`, plus the encoder's mean batch over the run (warm-up included)."""
    batches, queries = encoder_counters(url)
    run = load(url, questions, clients, duration_s, warmup_s)
    batches_after, queries_after = encoder_counters(url)
    run["encoder_mean_batch"] = round((queries_after - queries) / max(1, batches_after - batches), 2)
    return run


def encoder_alone(questions: list[str], threads: tuple[int, ...] = (1, 2), batches: tuple[int, ...] = (1, 32),
                  n: int = 256) -> list[dict]:
    """Queries/s of the bare encoder (no HTTP, no Ray) by torch threads and batch size: what batching can buy."""
    import torch

    from denseqa.config import ModelConfig
    from denseqa.model import Encoder

    encoder = Encoder.load(ModelConfig(), device="cpu")
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        for b in batches:
            encoder.encode_queries(questions[:b], b)  # warm-up
            started = time.perf_counter()
            for i in range(0, n, b):
                encoder.encode_queries(questions[i:i + b], b)
            rows.append({"threads": t, "batch": b, "qps": round(n / (time.perf_counter() - started), 1)})
            print("encoder alone", rows[-1], flush=True)
    return rows


def serve_floor(ray_cpus: int, ingress: str, requests: int = 1000, warmup: int = 100) -> list[dict]:
    """Latency at 1 client of a Serve app that does no work: the ingress alone, and one handle call further.

    ``ingress``: ``proxy`` (Serve's proxy actor) or ``haproxy`` (RAY_SERVE_ENABLE_HA_PROXY in the controller and
    the replicas, as configs/serve.yaml sets it).
    """
    import ray
    from fastapi import FastAPI
    from ray import serve

    from denseqa.drivers.serve import HA_PROXY_ENV

    runtime_env = {"env_vars": {HA_PROXY_ENV: "1" if ingress == "haproxy" else "0"}}
    echo = FastAPI()

    @serve.deployment(name="Echo", ray_actor_options={"num_cpus": 0.5, "runtime_env": runtime_env})
    class Echo:
        async def echo(self, body: dict) -> dict:
            return body

    @serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.25, "runtime_env": runtime_env})
    @serve.ingress(echo)
    class Ingress:
        def __init__(self, leaf) -> None:
            self.leaf = leaf

        @echo.post("/ingress")
        async def ingress(self, body: dict) -> dict:
            return body

        @echo.post("/hop")
        async def hop(self, body: dict) -> dict:
            return await self.leaf.echo.remote(body)

    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options={"runtime_env": runtime_env})
    serve.run(Ingress.bind(Echo.bind()), name="floor",
              logging_config={"log_level": "WARNING", "enable_access_log": False})
    rows = []
    body = json.dumps({"query": "read PDF files from the command line", "k": 10})
    for path in ("/ingress", "/hop"):
        conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=30)
        latencies = []
        for i in range(warmup + requests):
            sent = time.perf_counter()
            conn.request("POST", path, body, {"content-type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            if i >= warmup:
                latencies.append((time.perf_counter() - sent) * 1000)
        rows.append({"ingress": ingress, "path": path, "requests": requests,
                     "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                     "p99_ms": round(float(np.percentile(latencies, 99)), 1)})
        print("floor", rows[-1], flush=True)
    serve.shutdown()
    ray.shutdown()
    return rows


def http_part(args, index: str, questions: list[str], clients: list[int]) -> dict:
    result = {"duration_s": args.duration, "encoder_cpus": args.encoder_cpus, "ray_cpus": args.ray_cpus,
              "baseline": [], "serve": []}
    # The two systems run one after the other, never together: they share the same two cores.
    process, url = start_baseline(index)
    try:
        for c in clients:
            result["baseline"].append(load(url, questions, c, args.duration, args.warmup))
            print("baseline", result["baseline"][-1], flush=True)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait()

    import ray
    from ray import serve

    for variant in args.variants.split(","):
        url = start_serve(index, args.encoder_cpus, args.ray_cpus, variant == "throughput-optimized",
                          variant == "separate-encoder", variant == "haproxy")
        runs = [serve_load(url, questions, c, args.duration, args.warmup) for c in clients]
        for run in runs:
            print(variant, run, flush=True)
        result["serve"].append({
            "variant": variant, "runs": runs,
            "ratios": [{"clients": b["clients"], "qps": round(s["qps"] / b["qps"], 2),
                        "p50": round(s["p50_ms"] / b["p50_ms"], 2), "p99": round(s["p99_ms"] / b["p99_ms"], 2)}
                       for b, s in zip(result["baseline"], runs, strict=True)],
        })
        print(variant, json.dumps(result["serve"][-1]["ratios"]), flush=True)
        serve.shutdown()
        ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="http,encoder",
                        help="http: the two servers under load; encoder: the bare encoder by threads and batch; "
                        "floor: Serve's own latency, an app that does no work")
    parser.add_argument("--corpus-size", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--encoder-cpus", type=float, default=None,
                        help="CPUs (= torch threads) of the encoder replica; default: configs/serve.yaml's")
    parser.add_argument("--variants", default="default,separate-encoder",
                        help="Serve runs: default, separate-encoder (a QueryEncoder deployment, as on GPU clusters), "
                        "haproxy (the opt-in HAProxy ingress) and/or throughput-optimized "
                        "(RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", default=str(REPO / "bench" / ".work"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "serve.json"))
    parser.add_argument("--baseline-server", metavar="INDEX", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(args.baseline_server, args.port)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]
    index, questions = build_index(work, args.corpus_size, args.queries)
    output = Path(args.output)
    result = json.loads(output.read_text()) if output.exists() else {}  # a part run alone keeps the others
    result.update({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "index": index, "corpus_size": args.corpus_size,
    })
    parts = args.parts.split(",")
    if "http" in parts:
        result.update(http_part(args, index, questions, clients))
    if "encoder" in parts:
        result["encoder_alone"] = encoder_alone(questions)
    if "floor" in parts:
        result["serve_floor"] = [row for ingress in ("proxy", "haproxy")
                                 for row in serve_floor(args.ray_cpus, ingress)]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

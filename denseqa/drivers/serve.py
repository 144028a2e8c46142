"""The serve job and its tooling: deploy a Serve config on the connected cluster as ``serve deploy`` would, wait
until it runs (saying why while it does not), hot-swap the running index, and ``denseqa serve`` itself.

What the replicas run (the deployments and the FastAPI app) is :mod:`denseqa.serve`; nothing here is imported by
a replica. The private Ray calls deploying needs are :mod:`denseqa.ray_private`'s.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ray import serve

from denseqa import auth, ray_private, storage
from denseqa.cluster import connect
from denseqa.errors import DenseqaError, InputError, one_line
from denseqa.redaction import masked
from denseqa.serve import APP_NAME, deployment_names, encoding_deployment, searcher_names
from denseqa.versions import pinned_version, resolve_index

logger = logging.getLogger(__name__)

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "serve.yaml"


def load_serve_config(path: str | None = None) -> dict:
    """A Serve config file (default: the repository's ``configs/serve.yaml``), as a dict."""
    from ray.serve.schema import ServeDeploySchema

    from denseqa.config import load_yaml

    path = str(path or DEFAULT_SERVE_CONFIG)
    config = load_yaml(path)  # one-line errors for a missing file or invalid YAML
    if not config.get("applications"):
        raise InputError(f"{path}: a Serve config needs an `applications` list; pass --serve-config")
    try:  # Serve's own schema, now: what the overrides and the checks below read must have its shape
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise InputError(f"{path}: not a Serve config: {one_line(e)}") from None
    check_ingress_mode(config, path)
    return config


def application(config: dict, name: str = APP_NAME) -> dict:
    for app in config.get("applications", []):
        if app.get("name") == name:
            return app
    names = ", ".join(repr(app.get("name")) for app in config.get("applications", []))
    raise InputError(f"Serve config has no application named {name!r} (it has {names or 'none'})")


def deployment(config: dict, name: str, app_name: str = APP_NAME) -> dict:
    """The entry of deployment ``name`` in the config (created if absent), for overriding its options."""
    deployments = application(config, app_name).setdefault("deployments", [])
    for entry in deployments:
        if entry.get("name") == name:
            return entry
    deployments.append({"name": name})
    return deployments[-1]


def with_overrides(config: dict, index: str | None = None, host: str | None = None, port: int | None = None,
                   **args: Any) -> dict:
    """A copy of a Serve config with the index, HTTP address and application args replaced where given."""
    config = copy.deepcopy(config)
    app = application(config)
    app.setdefault("args", {})
    if index is not None:
        app["args"]["index"] = index
    app["args"].update({k: v for k, v in args.items() if v is not None})
    http_options = config.setdefault("http_options", {})
    if host is not None:
        http_options["host"] = host
    if port is not None:
        http_options["port"] = port
    return config


def deploy(config: dict, timeout_s: float = 600) -> str:
    """Deploy a Serve config on the connected Ray cluster, as ``serve deploy`` would; wait until it runs.

    Returns the HTTP address. Raises DenseqaError with Serve's message if an application fails to deploy.
    """
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    # A Serve config is declarative: applications missing from it are deleted. Keep the ones already running.
    running = running_config()
    if not running:  # Serve starts with this config's controller_options (a running controller keeps its own)
        check_ingress_mode(config)
    if running:
        ours = {app["name"] for app in config["applications"]}
        config = {**config, "applications": [*config["applications"],
                                             *(a for a in running["applications"] if a["name"] not in ours)]}
    try:
        schema = ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        raise InputError(f"Serve config: {one_line(e)}") from None
    check_http_options(schema.http_options.host, schema.http_options.port)
    # What `serve run CONFIG` does (Ray 2.60): the controller builds each application from its import path and
    # args and applies the per-deployment options, so a redeploy that only changes a user_config reconfigures
    # the running replicas instead of restarting them (that is how an index is hot-swapped).
    controller = ray_private.serve_controller(http_options=schema.http_options.model_dump(),
                                              proxy_location=schema.proxy_location,
                                              grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
                                              controller_options=schema.controller_options)
    ray_private.deploy_apps(controller, schema)
    wait_until_running([app.name for app in schema.applications], timeout_s)
    host = schema.http_options.host
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{schema.http_options.port}"


def check_http_options(host: str, port: int) -> None:
    """Refuse an address a running Serve does not listen on: Serve keeps the HTTP options it started with and
    ignores a new config's (it only logs so), so the service would not be where the caller says it is, and a
    narrow host asked for (127.0.0.1) could be served on every interface."""
    details = ray_private.serve_details()
    live = (details or {}).get("http_options") or {}
    if live and (live.get("host"), live.get("port")) != (host, port):
        raise InputError(f"Serve already runs on this cluster listening on {live.get('host')}:{live.get('port')}, "
                         f"and a running Serve cannot move to {host}:{port}: deploy with --host "
                         f"{live.get('host')} --port {live.get('port')}, or stop it first (`serve shutdown -y`)")


# Ray Serve reads this in each of its processes: the controller starts HAProxy in place of its proxy actors, and
# an ingress replica serves HTTP itself. One without the other leaves HAProxy with nothing to forward to.
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


def check_ingress_mode(config: dict, source: str = "Serve config") -> None:
    """Refuse a Serve config whose controller and applications disagree on Serve's HAProxy ingress."""
    def env_value(section: dict | None) -> str:
        return str((((section or {}).get("runtime_env") or {}).get("env_vars") or {}).get(HA_PROXY_ENV, "0"))

    controller = env_value(config.get("controller_options"))
    for app in config.get("applications", []):
        if env_value(app) != controller:
            raise InputError(
                f"{source}: {HA_PROXY_ENV} is {controller!r} in controller_options.runtime_env.env_vars but "
                f"{env_value(app)!r} in application {app.get('name')!r}'s runtime_env.env_vars; set it the same "
                "in both (the controller runs HAProxy, the replicas the HTTP servers it forwards to)")


def running_config() -> dict | None:
    """The Serve config of the applications deployed from config files on the connected cluster; None if none."""
    details = ray_private.serve_details()
    if details is None:
        return None
    applications = [copy.deepcopy(app["deployed_app_config"]) for app in details.get("applications", {}).values()
                    if app.get("deployed_app_config")]
    if not applications:
        return None
    return {"proxy_location": details.get("proxy_location"), "http_options": details.get("http_options") or {},
            "applications": applications}


def with_auth(config: dict, key: str | None, app_name: str = APP_NAME) -> dict:
    """The config with SearchAPI accepting ``key`` (its digest only: the config is logged), or none (None)."""
    entry = deployment(config, "SearchAPI", app_name)
    entry["user_config"] = {**(entry.get("user_config") or {}), "auth": key is not None,
                            "api_key_sha256": [auth.digest(key)] if key is not None else []}
    return config


def api_key_for(cfg) -> tuple[str | None, str | None]:
    """The serve section's API key and where it is (a file or $DENSEQA_API_KEY), created on first use; (None, None)
    with --no-auth."""
    if not cfg.serve.auth:
        return None, None
    return auth.resolve_key(cfg.serve.api_key_file)


def check_serving_inputs(cfg) -> None:
    """What a deploy will read, checked before the work that comes first (``denseqa run``): the Serve config, and
    the API key where one is given (a key file readable by others, a too-short ``$DENSEQA_API_KEY``). A key file
    not there yet is fine: the deploy creates it."""
    load_serve_config(cfg.serve.serve_config)
    if cfg.serve.auth and (os.environ.get(auth.KEY_ENV) or Path(cfg.serve.api_key_file).expanduser().exists()):
        auth.resolve_key(cfg.serve.api_key_file, create=False)


def curl_line(url: str, key_source: str | None) -> str:
    """A curl command for the service, the key passed by reference (:func:`denseqa.auth.curl_header`)."""
    return (f"curl -s {url}/search{auth.curl_header(key_source)} -H 'content-type: application/json' "
            "-d '{\"query\": \"...\", \"k\": 5}'")


def _running_app(app_name: str, doing: str) -> dict:
    """The running Serve config, for a change of one application's user_config; refused if it is not running."""
    running = running_config()
    app = next((a for a in (running or {}).get("applications", []) if a["name"] == app_name), None)
    if app is None:
        raise InputError(f"no running Serve application {app_name!r} to {doing}; deploy one first with "
                         "`denseqa serve --index DIR`")
    return running


def rotate_key(stage: str, key_file: str, timeout_s: float = 600, app_name: str = APP_NAME) -> dict:
    """Rotate the running application's API key without downtime, through the same live reconfigure as a hot swap.

    ``start``: a new key (``$DENSEQA_API_KEY`` if set, else a random one written to ``key_file``) is accepted beside
    the keys accepted now; ``finish``: only the current key (the environment's or the file's) is. Returns what the
    ingress accepts afterwards: how many keys, and where the current one is.
    """
    running = _running_app(app_name, "rotate the key of")
    entry = deployment(running, "SearchAPI", app_name)
    settings = entry.get("user_config") or {}
    if not settings.get("auth", True):
        raise InputError("the running application serves without authentication (--no-auth); deploy it with a "
                         "key first")
    accepted = list(settings.get("api_key_sha256") or [])
    if not accepted:
        # The replicas take their key from $DENSEQA_API_KEY on their nodes (a Kubernetes secret), which this
        # machine does not know: a list with the new key alone would lock out every client at once.
        raise InputError("the running application takes its key from $DENSEQA_API_KEY on its nodes (its "
                         "api_key_sha256 is empty): rotate it there (change the secret, then redeploy), or deploy "
                         "with `denseqa serve`, whose key can be rotated here")
    from_env = bool(os.environ.get(auth.KEY_ENV))
    if stage == "start":
        key = auth.resolve_key(key_file, create=False)[0] if from_env else auth.new_key()
        accepted = [auth.digest(key), *(d for d in accepted if d != auth.digest(key))]
    else:
        key = auth.resolve_key(key_file, create=False)[0]
        accepted = [auth.digest(key)]
    entry["user_config"] = {**settings, "auth": True, "api_key_sha256": accepted}
    deploy(running, timeout_s)
    if from_env:
        source = f"${auth.KEY_ENV}"
    elif stage == "start":
        # The new key reaches the file only once the service accepts it: clients that read the file never hold a
        # key the service refuses.
        source = str(auth.write_key(key_file, key))
    else:
        source = str(Path(key_file).expanduser())
    return {"stage": stage, "keys_accepted": len(accepted), "key": source}


def swap_index(index: str, timeout_s: float = 600, app_name: str = APP_NAME) -> dict:
    """Hot-swap the running application to another index folder; returns the searcher's status once it serves it.

    The folder is checked against the running encoder's model here first, so a mismatch is refused before the
    deployment is touched; the replicas check it again when they load it (the config can also be edited by hand).
    An updated index is swapped to its current version's folder (:mod:`denseqa.versions`): the replicas load that
    one, and a later update of the same folder is a new swap.
    """
    from denseqa.model import check_model_matches
    from denseqa.search import read_manifest

    running = _running_app(app_name, "hot-swap")
    app = application(running, app_name)
    check_model_matches(read_manifest(app["args"]["index"])["model"], read_manifest(index)["model"], index)
    index = storage.absolute(index)
    partitions = read_manifest(index)["index"].get("partitions") or [None]
    # One version, named so that replicas started later load it too (versions.pinned_version)
    index = resolve_index(index) if partitions[0] is not None else pinned_version(index)
    names = searcher_names(app["args"])
    if len(partitions) != len(names):
        raise InputError(f"{index}: {len(partitions)} partition(s), the running application has {len(names)} "
                         "searcher deployment(s); deploy it with `denseqa serve --index` instead of swapping")
    # Each searcher (one per partition) gets its folder; Serve reconfigures them all from this one deploy.
    targets = {name: index if part is None else storage.join(index, *part["folder"].split("/"))
               for name, part in zip(names, partitions, strict=True)}
    # What each searcher serves now: where the config goes back to if the new folder is not served (not what the
    # config names, which may be a folder the replicas refused).
    served = {name: serve.get_deployment_handle(name, app_name).serving.remote().result()["index"] for name in names}
    for name, target in targets.items():
        entry = deployment(running, name, app_name)
        entry["user_config"] = {**(entry.get("user_config") or {}), "index": target}
    deploy(running, timeout_s)
    deadline = time.monotonic() + timeout_s
    statuses = {}
    for name, target in targets.items():
        handle = serve.get_deployment_handle(name, app_name)
        while True:
            serving = handle.serving.remote().result()
            change = serving["last_change"] or {}
            if serving["index"] == target:
                statuses[name] = handle.status.remote().result()  # masked: what is printed
                break
            refused = change.get("index") == target and change.get("status") == "refused"
            if refused or time.monotonic() > deadline:
                # The deployed config goes back to the folders being served: left naming the refused one, every
                # replica started later (scale-up, a replacement) would load it, fail, and never serve.
                for back, folder in served.items():
                    deployment(running, back, app_name)["user_config"]["index"] = folder
                deploy(running, timeout_s)
                folder = resolve_index(target)  # the folder the user gave, not version 1's name for it
                if refused:
                    raise InputError(masked(f"{folder}: refused by the running searcher: {change['reason']}"))
                raise DenseqaError(f"{folder}: not served after {timeout_s:.0f} s; see the {name} logs (the "
                                   "running config is back on the index it had)")
            time.sleep(0.5)
    if len(statuses) == 1:
        return statuses[names[0]]
    return {"index": index, "count": sum(s["count"] for s in statuses.values()),
            "last_change": {"previous": statuses[names[0]]["last_change"].get("previous")},
            "partitions": list(statuses.values())}


def _waiting_reasons(state) -> list[str]:
    """Serve's own messages on the deployments of an application that are not running yet, one line each: e.g. a
    replica that cannot be scheduled names the resources it needs and those the cluster has."""
    if state is None:
        return []
    return [" ".join(d.message.split()) for d in state.deployments.values()
            if d.status != "HEALTHY" and d.message.strip()]


def wait_until_running(names: list[str], timeout_s: float) -> None:
    """Wait until every named application runs; say why while it does not (replicas waiting for CPUs wait for the
    cluster to grow, which on a fixed-size cluster never happens)."""
    deadline = time.monotonic() + timeout_s
    said: set[str] = set()
    while True:
        applications = serve.status().applications
        states = {name: applications.get(name) for name in names}
        reasons = [r for s in states.values() for r in _waiting_reasons(s)]
        for reason in reasons:
            if reason not in said:
                said.add(reason)
                logger.warning("still deploying: %s", reason)
        failed = {n: s for n, s in states.items() if s is not None and s.status == "DEPLOY_FAILED"}
        if failed:
            name, state = next(iter(failed.items()))
            message = state.message.strip().splitlines()
            raise DenseqaError(f"Serve application {name!r} failed to deploy: "
                               f"{next((m for m in reversed(message) if m.strip()), 'see the Serve logs')}")
        if all(s is not None and s.status == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            raise DenseqaError(f"Serve applications not running after {timeout_s:.0f} s: "
                               + ", ".join(f"{n}={s.status if s else 'absent'}" for n, s in states.items())
                               + (f" ({reasons[0]})" if reasons else ""))
        time.sleep(0.5)


def serve_config_for(cfg) -> dict:
    """The Serve config file of a ``serve`` section, with the section's index, address and limits filled in."""
    from denseqa.search import read_manifest

    s = cfg.serve
    if not s.index:
        raise InputError("no index to serve: pass --index (a folder written by build-index)")
    index = storage.absolute(s.index)  # replicas do not run in this working directory
    manifest = read_manifest(index)  # a missing or unfinished index fails here, in one line, before any deploy
    if s.default_mode not in (None, "dense") and not manifest.get("bm25"):
        raise InputError(f"--default-mode {s.default_mode}: {s.index} was built without BM25 and answers dense "
                         "search only")
    reranker = None
    if s.reranker:
        from denseqa.rerank import resolve_reranker

        reranker = storage.absolute(s.reranker)
        resolve_reranker(reranker)  # likewise for a folder that is not a cross-encoder
    config = with_overrides(load_serve_config(s.serve_config), index=index, host=s.host, port=s.port,
                            max_queries=s.max_queries, max_query_chars=s.max_query_chars,
                            max_candidates=s.max_candidates, max_hits=s.max_hits, reranker=reranker,
                            separate_encoder=s.separate_encoder, default_mode=s.default_mode)
    app = application(config)
    http_options = config.get("http_options", {})
    present = deployment_names(app["args"])
    names = searcher_names(app["args"])
    if len(names) > 1:  # a partitioned index: the IndexSearcher entry's options go to each partition's searcher
        deployments = app.setdefault("deployments", [])
        template = next((e for e in deployments if e.get("name") == "IndexSearcher"), {})
        given = {e.get("name") for e in deployments}
        # They search only (the QueryEncoder encodes): a GPU the entry asks for is the encoder's, not theirs.
        searcher = {**copy.deepcopy(template), "ray_actor_options": {
            k: v for k, v in (template.get("ray_actor_options") or {}).items() if k != "num_gpus"}}
        app["deployments"] = [e for e in deployments if e.get("name") != "IndexSearcher"] + [
            {**copy.deepcopy(searcher), "name": name} for name in names if name not in given]
        if "QueryEncoder" not in given:  # the queries are encoded once, before the scatter: as a searcher did
            app["deployments"].append({"name": "QueryEncoder", **copy.deepcopy(
                {k: v for k, v in template.items() if k in ("ray_actor_options", "autoscaling_config")})})
    for entry in app.get("deployments", []):
        # Serve refuses options for a deployment the application does not have (no reranker: no Reranker; the
        # searchers encoding their own queries: no QueryEncoder), so a shared config file's extra entries go.
        if entry.get("name") not in present:
            logger.warning("the Serve config's %s entry is left out: this application has no %s deployment "
                           "(args: reranker=%s, separate_encoder=%s)", entry.get("name"), entry.get("name"),
                           app["args"].get("reranker"), bool(app["args"].get("separate_encoder")))
    app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") in present]
    batching = {"max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s}
    if any(v is not None for v in batching.values()):
        entry = deployment(config, encoding_deployment(app["args"]))
        entry["user_config"] = {**(entry.get("user_config") or {}),
                                **{k: v for k, v in batching.items() if v is not None}}
    if not manifest["index"].get("partitions"):
        # The replicas serve the version current now, named in their user_config (version 1 too): one started
        # later (a scale-up, a replacement) loads the same version as the others, not one an update published
        # since; deploying again after an update changes only that name, and Serve swaps it on the running replicas.
        # (A partitioned index is never updated: its searchers are bound to its partitions' folders.)
        entry = deployment(config, "IndexSearcher")
        entry["user_config"] = {**(entry.get("user_config") or {}), "index": pinned_version(index)}
    if not s.auth:
        logger.warning("--no-auth: the service answers anyone who reaches %s:%s, without an API key",
                       http_options.get("host"), http_options.get("port"))
    return with_auth(config, api_key_for(cfg)[0])


def run_serve(cfg) -> str:
    """``denseqa serve``: deploy on the running Ray cluster and return; or, with none, on a local one, and block.

    A cluster keeps a deployed application after this process exits (stop it with ``serve shutdown``); a local
    Ray instance started here would take the application down with it, so then this command stays in the
    foreground until interrupted. With ``--swap``, hot-swap the running application's index instead.
    """
    from denseqa.search import read_manifest

    if cfg.serve.rotate_key:
        connect(may_start_local=False)
        print(json.dumps(rotate_key(cfg.serve.rotate_key, cfg.serve.api_key_file, cfg.serve.timeout_s), indent=2),
              flush=True)
        return None
    if cfg.serve.swap:
        if not cfg.serve.index:
            raise InputError("--swap needs --index: the new index folder")
        index = storage.absolute(cfg.serve.index)
        read_manifest(index)
        connect(may_start_local=False)
        status = swap_index(index, cfg.serve.timeout_s)
        print(masked(json.dumps({"index": status["index"], "count": status["count"], "previous":
                                 status["last_change"]["previous"]}, indent=2)), flush=True)
        return index

    config = serve_config_for(cfg)
    key_source = api_key_for(cfg)[1]
    started_here = connect(may_start_local=True)
    url = deploy(config, cfg.serve.timeout_s)
    print(masked(json.dumps({
        "url": url, "docs": f"{url}/docs", "index": application(config)["args"]["index"],
        "reranker": application(config)["args"].get("reranker"),
        "api_key": key_source or "none (--no-auth)", "try": curl_line(url, key_source),
    }, indent=2)), flush=True)
    if started_here:
        serve_until_interrupted()
    return url


def serve_until_interrupted() -> None:
    """Keep this process, and so the local Ray instance it started and the application on it, alive until Ctrl-C."""
    print("serving from a local Ray instance started by this command; Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()

"""The search service as a Ray Serve application (SPEC section 7).

    HTTP -> SearchIngress (FastAPI via @serve.ingress): decode + encode the query with the
            snapshot's model, pin ONE snapshot name for the request, fan out through
            DeploymentHandles, merge the partitions' top-k (label and uri come from the parts:
            a search never reads the source bucket; /thumb reads one row group of one column)
         -> Partition0 .. Partition{P-1} (one deployment each, `replicas_per_partition`
            replicas): a share of the parts merged into one in-memory index (partition.py)

Both kinds of replica watch CURRENT (holder.py / the ingress watcher). The ingress moves its
pin to a new snapshot only after every partition answered `prepare` for it and the query
encoder's codebook checksum matched it; a replica that does not hold the pinned name yet
answers 'not ready', and the ingress then answers from the previous pin, so no answer mixes
snapshots and no request fails during a swap. A partition that fails (a replica died) makes
the request a 503 with the reason: an answer never silently omits a partition.

`build_app(args)` is the Serve application builder (`serve run` / `serve deploy`, see
configs/serve.yaml); `start_local` is what jobs/serve.py, the demo and the tests call. The
deployments live in ingress.py and partition_server.py, their run-time settings in runtime.py.
"""

import dataclasses
import logging
import os
from typing import Optional

from ray import serve

from sscq_dist import storage
from sscq_dist.config import Config, load_config
from sscq_dist.errors import SSCQError
from sscq_dist.failpoints import forwarded_env
from sscq_dist.serving.auth import Secret, decide_auth, load_token
from sscq_dist.tracking import absolute_store_uri, tracking_uri
from sscq_dist.serving.ingress import SearchIngress
from sscq_dist.serving.partition_server import PartitionServer
from sscq_dist.serving.runtime import APP_NAME, INGRESS_NAME, RUNTIME_FIELDS, apply_runtime, partition_name, runtime_settings  # noqa: F401 (the app's API)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- building and running


def build_application(index_root: str, cfg: Config, model_uri: Optional[str] = None,
                      token: Optional[Secret] = None):
    """The bound application: P partition deployments and the ingress that fans out to them
    (the ingress enforces `token` when one is given; see auth.py)."""
    sv = cfg.serve
    storage.validate_uri(index_root)
    if not storage.resolve(index_root, cfg.storage).is_s3:
        index_root = os.path.abspath(index_root)  # replicas need not share the caller's working directory
    if sv.cache_dir and "://" not in sv.cache_dir:
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(sv, cache_dir=os.path.abspath(sv.cache_dir)))
        sv = cfg.serve
    # The ingress loads the query encoder from the registry: resolve the store here, not in the replica's cwd.
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, tracking_uri=absolute_store_uri(tracking_uri(cfg.tracking))))
    health = {"health_check_period_s": sv.health_check_period_s, "health_check_timeout_s": sv.health_check_timeout_s,
              "graceful_shutdown_wait_loop_s": sv.graceful_shutdown_wait_loop_s,
              "graceful_shutdown_timeout_s": sv.graceful_shutdown_timeout_s}
    runtime = runtime_settings(sv)
    # Failpoints the tests set reach the replicas (unset in production: no runtime_env added).
    env = {"runtime_env": {"env_vars": failpoints}} if (failpoints := forwarded_env()) else {}
    parts = [PartitionServer.options(name=partition_name(i), num_replicas=sv.replicas_per_partition,
                                     ray_actor_options={"num_cpus": sv.partition_cpus, **env}, user_config=runtime,
                                     max_ongoing_requests=32, **health).bind(i, sv.partitions, index_root, cfg)
             for i in range(sv.partitions)]
    return SearchIngress.options(name=INGRESS_NAME, num_replicas=sv.ingress_replicas,
                                 ray_actor_options={"num_cpus": sv.ingress_cpus, **env}, user_config=runtime,
                                 max_ongoing_requests=max(100, sv.max_in_flight + 8),  # room for the guard's 503s
                                 max_queued_requests=sv.max_queued_requests,
                                 **health).bind(parts, index_root, cfg, model_uri, token)


def build_app(args: dict):
    """Serve application builder: `serve run sscq_dist.serving.app:build_app index_root=...`, or
    `import_path` in a Serve config file. args: index_root (required), config (YAML path,
    default configs/digits.yaml), model (optional model URI), overrides (list of key=value)."""
    args = dict(args or {})
    if not args.get("index_root"):
        raise SSCQError("build_app: 'index_root' is required (the index root URI to serve)")
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    cfg = load_config(_local_path(args.get("config") or "configs/digits.yaml"), list(overrides))
    # Serve's http_options hold the bind, not this builder: serve.host must name it (0.0.0.0 on Kubernetes).
    token = decide_auth(cfg.serve.host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)
    return build_application(_local_path(args["index_root"]), cfg, args.get("model") or None, token)


def _local_path(path: str) -> str:
    """A relative local path as given when it exists in the working directory, else relative to
    the checkout that holds sscq_dist (Serve may build the app in a process started elsewhere)."""
    if "://" in path or os.path.isabs(path) or os.path.exists(path):
        return path
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(checkout, path)


def start_local(index_root: str, cfg: Config, model_uri: Optional[str] = None, host: Optional[str] = None,
                port: Optional[int] = None, name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Deploy the service on the connected Ray (Serve's HTTP proxy on host:port); returns its URL.

    Returns once every replica is up (each loaded its partition of CURRENT). A non-loopback
    host needs a token (SSCQ_SERVE_TOKEN or serve.token_file) unless serve.insecure_no_auth."""
    host = host or cfg.serve.host
    port = int(port or cfg.serve.port)
    token = decide_auth(host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)  # before any start
    serve.start(http_options={"host": host, "port": port})
    # A Serve instance already running on this cluster keeps its proxy's bind (Serve ignores new
    # http_options): answer with the real address, and decide auth on the real bind host.
    from ray.serve.context import _get_global_client

    bound = _get_global_client().http_config
    if (bound.host, int(bound.port)) != (host, port):
        log.warning("Ray Serve already runs here with its HTTP proxy on %s:%s; serving there, not on %s:%s",
                    bound.host, bound.port, host, port)
        host, port = bound.host, int(bound.port)
        token = decide_auth(host, load_token(cfg.serve.token_file), cfg.serve.insecure_no_auth)
    serve.run(build_application(index_root, cfg, model_uri, token), name=name, route_prefix=route_prefix)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}/"

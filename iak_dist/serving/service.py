"""Online scoring: a Ray Serve deployment around `Predictor`, with dynamic batching.

Endpoints (HTTP, JSON):

- `POST /score` with `{"rows": [{"domain": "a", "user_id": 7, ...}, ...]}` (each row holds the
  artefact schema's domain, sparse and dense columns) answers
  `{"p_ctr": [...], "p_cvr": [...], "p_ctcvr": [...], "unknown_domain_rows": n}` in the rows' order
  (float32 scores written as JSON numbers: they read back as the same float32).
- `GET /healthz`: the service answers (`{"status": "alive"}`).
- `GET /ready`: the artefact is loaded: its manifest (without the file and shard lists), the replica's
  count of rows of unknown domains so far.

A bad request gets a 4xx with `{"error": one line naming the field, "field": ...}` and the service
keeps serving: malformed JSON or a body that is not `{"rows": [...]}` (400, field `body` /
`rows`), a missing column, a value of the wrong type, an unknown domain when refusing (400, from
`Predictor.check_rows`), more rows than `max_request_rows` or more bytes than `max_request_bytes`
(413). Requests are checked one by one *before* they join a batch: one bad request never fails
the others coalesced with it.

Dynamic batching: `@serve.batch` coalesces the requests that reach one replica within
`batch_wait_timeout_s` into one `Predictor.score` call of at most `max_batch_size` *rows* (not
requests: `batch_size_fn` counts rows), scored in a worker thread so that the replica keeps
accepting requests (and answering `/healthz`) while a batch runs.

Ray: an embedded local Ray of our own by default (own temp folder and GCS port, never another
instance: `EmbeddedRay`), or a cluster with `address=`. The HTTP proxy binds 127.0.0.1 unless
`host` says otherwise. A replica that dies is replaced by Serve's controller; requests routed to it
fail (5xx) rather than hang: `request_timeout_s` bounds every request at the proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from iak_dist.errors import UserError
from iak_dist.runtime import say

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

SCORE_KEYS = ("p_ctr", "p_cvr", "p_ctcvr")
APP_NAME = "iak-dist"


@dataclass(frozen=True)
class ServeConfig:
    """Every setting of the service, with its default (the CLI's flags map onto these fields)."""

    host: str = "127.0.0.1"
    """Interface the HTTP proxy binds; `0.0.0.0` exposes the service to the network."""
    port: int = 8000
    """HTTP port of the proxy."""
    address: str | None = None
    """Ray cluster to run on (`HOST:PORT`, `ray://HOST:PORT`, `auto`); None: an embedded Ray of our own."""
    replicas: int = 1
    """Replicas of the deployment, each with its own copy of the predictor."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves per replica; also its torch threads (at least one)."""
    max_batch_size: int = 1024
    """Most rows one `Predictor.score` call coalesces from concurrent requests."""
    batch_wait_timeout_s: float = 0.005
    """How long a replica waits for more requests after the first of a batch arrived."""
    max_request_rows: int | None = None
    """Most rows one request may carry (413 above); at most `max_batch_size`; None: `max_batch_size`."""
    max_request_bytes: int = 16 << 20
    """Most bytes one request body may have (413 above), checked before it is read whole."""
    request_timeout_s: float = 30.0
    """The proxy answers 408 / 5xx after this long: no request waits forever (a dead replica)."""
    unknown_domain: Literal["backbone", "refuse"] = "backbone"
    """A row of a domain the artefact does not know: scored by the plain backbone, or refused (400)."""
    device: str = "cpu"
    """Where each replica scores (`cpu`, `cuda`); `cuda` reserves one GPU per replica."""
    access_log: bool = False
    """Serve's per-request log lines (off: one line per request drowns everything else)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise UserError(f"serve: replicas must be >= 1, got {self.replicas}")
        if self.max_request_rows is None:
            object.__setattr__(self, "max_request_rows", self.max_batch_size)  # frozen: set once, here
        if self.max_batch_size < 1 or self.max_request_rows < 1:
            raise UserError("serve: max_batch_size and max_request_rows must be >= 1")
        if self.max_request_rows > self.max_batch_size:
            # Serve's batcher fails a single item larger than its batch outright
            raise UserError(f"serve: max_request_rows ({self.max_request_rows}) must be <= max_batch_size "
                            f"({self.max_batch_size}): one request is never split across batches")
        if self.batch_wait_timeout_s < 0:
            raise UserError(f"serve: batch_wait_timeout_s must be >= 0, got {self.batch_wait_timeout_s}")
        if self.unknown_domain not in ("backbone", "refuse"):
            raise UserError(f"serve: unknown_domain must be backbone or refuse, got {self.unknown_domain!r}")


class BadRequest(Exception):
    """A request the service refuses: HTTP `status`, the offending `field`, a one-line message."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _rows_in(requests: list[list[dict]]) -> int:
    """Serve's batch size of a list of requests: their rows."""
    return sum(len(rows) for rows in requests)


class ScoringService:
    """One replica: a loaded `Predictor` behind `/score`, `/healthz` and `/ready`."""

    def __init__(self, artefact: str, config: ServeConfig) -> None:
        import torch
        from ray import serve

        from iak_dist.serving.predictor import Predictor

        torch.set_num_threads(max(1, int(config.replica_cpus)))
        self.config = config
        self.predictor = Predictor.load(artefact, device=config.device, unknown_domain=config.unknown_domain)
        self.known_domains = set(self.predictor.domains)
        self.domain_column = self.predictor.schema.domain
        # batched here, not by a decorator on the class: the batch settings come from the config, and
        # this module (ServeConfig: the CLI's defaults) imports without Ray
        self.score_batch = serve.batch(self.score_requests, max_batch_size=config.max_batch_size,
                                       batch_wait_timeout_s=config.batch_wait_timeout_s, batch_size_fn=_rows_in)

    async def __call__(self, request: Request) -> Response:
        from starlette.responses import JSONResponse

        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz":
            return JSONResponse({"status": "alive"})
        if path == "/ready":
            return JSONResponse(self.readiness())
        if path != "/score":
            return _error(BadRequest(404, "path", f"path: no endpoint {path} (POST /score, GET /healthz, GET /ready)"))
        if request.method != "POST":
            return _error(BadRequest(405, "method", f"method: /score takes POST, not {request.method}"))
        try:
            rows = self.parse(await self.read_body(request))
        except BadRequest as bad:
            return _error(bad)
        unknown = sum(1 for row in rows if str(row[self.domain_column]) not in self.known_domains)
        scores = await self.score_batch(rows) if rows else {key: [] for key in SCORE_KEYS}
        return JSONResponse({**scores, "unknown_domain_rows": unknown})

    def readiness(self) -> dict[str, Any]:
        manifest = {k: v for k, v in self.predictor.manifest.items() if k not in ("files", "tables")}  # long lists
        return {"ready": True, "manifest": manifest, "unknown_rows": self.predictor.unknown_rows}

    async def read_body(self, request: Request) -> bytes:
        """The body, refused before it is read whole when its declared size is too large."""
        limit = self.config.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BadRequest(413, "body", f"body: {declared} bytes, at most {limit} (max_request_bytes)")
        body = bytearray()
        async for chunk in request.stream():  # chunked uploads declare no length
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, "body", f"body: more than {limit} bytes (max_request_bytes)")
        return bytes(body)

    def parse(self, body: bytes) -> list[dict]:
        """`{"rows": [...]}` -> the rows, every one checked by the predictor; else `BadRequest`."""
        from iak_dist.serving.predictor import RequestError

        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(400, "body", f"body: not valid JSON ({exc})") from None
        if not isinstance(payload, dict) or "rows" not in payload:
            raise BadRequest(400, "body", 'body: expected a JSON object {"rows": [{...}, ...]}')
        rows = payload["rows"]
        if not isinstance(rows, list):
            raise BadRequest(400, "rows", f"rows: expected a list of row objects, got {type(rows).__name__}")
        if len(rows) > self.config.max_request_rows:
            raise BadRequest(413, "rows", f"rows: {len(rows)} rows in one request, at most "
                                          f"{self.config.max_request_rows} (max_request_rows)")
        try:
            self.predictor.check_rows(rows)
        except RequestError as exc:
            raise BadRequest(400, exc.field, str(exc).splitlines()[0]) from None
        return rows

    async def score_requests(self, requests: list[list[dict]]) -> list[dict[str, list[float]]]:
        """Score coalesced requests in one `Predictor.score` call, then split the scores back."""
        rows = [row for request in requests for row in request]
        # a worker thread: the event loop keeps collecting the next batch and answering /healthz
        scores = await asyncio.to_thread(self.predictor.score, rows)
        out, start = [], 0
        for request in requests:
            end = start + len(request)
            out.append({key: scores[key][start:end].tolist() for key in SCORE_KEYS})
            start = end
        return out


def _error(bad: BadRequest) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": str(bad), "field": bad.field}, status_code=bad.status)


def check_resources(config: ServeConfig, have: dict[str, float]) -> None:
    """Raise UserError when the Ray cluster (`have`: `ray.cluster_resources()`) cannot place every replica:
    Serve would wait forever for a replica no node can place (ray-project/ray#50426)."""
    need = {"CPU": config.replicas * config.replica_cpus}
    if config.device.startswith("cuda"):
        need["GPU"] = float(config.replicas)
    short = [f"{n:g} {kind}" for kind, n in need.items() if have.get(kind, 0.0) < n]
    if short:
        raise UserError(f"serve: {config.replicas} replica(s) need {' and '.join(short)}, the Ray cluster has "
                        f"{', '.join(f'{have.get(k, 0.0):g} {k}' for k in need)}; lower --replicas or add nodes")


def build_app(artefact: str | Path, config: ServeConfig):
    """The Serve application: `ScoringService` with the config's replicas, CPUs and batching."""
    from ray import serve as ray_serve

    actor_options: dict[str, Any] = {"num_cpus": config.replica_cpus}
    if config.device.startswith("cuda"):
        actor_options["num_gpus"] = 1
    deployment = ray_serve.deployment(
        ScoringService,
        name="ScoringService",
        num_replicas=config.replicas,
        ray_actor_options=actor_options,
        # every request holds at least one row, so a batch never needs more requests than rows
        max_ongoing_requests=config.max_batch_size,
        # a replica whose constructor fails (a broken artefact, ...) fails the start in seconds, not after
        # Serve's retries; one that cannot be placed (no GPU / CPU left) never runs it: `serve` checks first
        max_constructor_retry_count=1,
        health_check_period_s=2.0,
    )
    return deployment.bind(str(Path(artefact).resolve()), config)


@dataclass
class ServiceHandle:
    """A running service (from `serve(..., blocking=False)`); `stop()` ends it and the Ray it started."""

    url: str
    config: ServeConfig
    embedded: Any = None  # the EmbeddedRay this service started, or None on a cluster

    def stop(self) -> None:
        import ray
        from ray import serve as ray_serve

        try:
            if self.embedded is not None:
                ray_serve.shutdown()
            else:
                ray_serve.delete(APP_NAME)  # a cluster's Serve may run other applications: only ours goes
        finally:
            if self.embedded is not None:
                self.embedded.stop()
            elif ray.is_initialized():
                ray.shutdown()


def serve(artefact: str | Path, config: ServeConfig | None = None, *, blocking: bool = True,
          **overrides: Any) -> ServiceHandle | None:
    """Start the scoring service on `artefact`; `overrides` replace `config`'s fields by name.

    blocking=True (the CLI) serves until interrupted (Ctrl-C / SIGTERM), then shuts down;
    blocking=False returns a `ServiceHandle` once every replica has loaded the artefact.

        handle = serve("export/artefact", port=8123, replicas=2, blocking=False)
        ...  # POST http://127.0.0.1:8123/score
        handle.stop()
    """
    config = dataclasses.replace(config or ServeConfig(), **overrides)
    artefact = Path(artefact)
    from iak_dist.serving.predictor import Predictor

    # a broken artefact: the predictor's one line naming the file, here and before Ray starts (in a
    # replica, Serve would only say the deployment failed); tables are memory-mapped, not read whole
    Predictor.load(artefact, unknown_domain=config.unknown_domain)
    import ray
    from ray import serve as ray_serve

    from iak_dist.orchestration.ray_pipeline import EmbeddedRay, connect_ray

    embedded = None
    if config.address:
        connect_ray(config.address)
    elif ray.is_initialized():  # EmbeddedRay would stop a Ray this process did not start for us
        raise UserError("serve: Ray is already running in this process; pass its address (--address) or serve "
                        "from a fresh process")
    else:
        # logical CPUs enough for every replica: Ray would otherwise never place the last ones
        embedded = EmbeddedRay.start(max(os.cpu_count() or 1, math.ceil(config.replicas * config.replica_cpus)))
    handle = ServiceHandle(f"http://{config.host}:{config.port}", config, embedded)
    try:
        check_resources(config, ray.cluster_resources())
        # Serve's INFO lines (controller, proxy, replicas, this driver) say nothing a user acts on
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        quiet = {"log_level": "WARNING", "enable_access_log": config.access_log}
        ray_serve.start(http_options={"host": config.host, "port": config.port,
                                      "request_timeout_s": config.request_timeout_s}, logging_config=quiet)
        try:
            ray_serve.run(build_app(artefact, config), name=APP_NAME, route_prefix="/", logging_config=quiet)
        except RuntimeError as exc:  # Serve's "deployment failed to start" carries the replica's traceback
            last = [line for line in str(exc).splitlines() if line.strip()][-1:]
            raise UserError(f"{artefact}: the scoring service did not start: {last[0] if last else exc}") from exc
    except BaseException:
        handle.stop()
        raise
    say(f"[serve] scoring at {handle.url}/score ({config.replicas} replica(s), batches of up to "
        f"{config.max_batch_size} rows, {config.batch_wait_timeout_s * 1000:g} ms wait); /healthz, /ready")
    if not blocking:
        return handle
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop ends it like Ctrl-C
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("[serve] interrupted; shutting down")
    finally:
        signal.signal(signal.SIGTERM, previous)
        handle.stop()
    return None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt

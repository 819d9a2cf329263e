"""The sampling service: a Ray Serve deployment with a FastAPI ingress over one finished run root.

Each replica loads the Generator (flow, latent scaler, PCA decoder) once. ``POST /v1/sample`` requests go
through one ``@serve.batch`` helper that merges concurrent requests into one ODE solve and one decode per
(solver, steps, label, guidance), then splits the result; each request's source noise comes from its own seed,
so batching never changes an answer beyond float rounding. Entry points: ``build_app`` (a Serve config file's
``import_path: dwf_ray.serve.app:build_app``), ``make_app`` (Python) and ``serve_main`` (``dwf serve``).
"""
# No `from __future__ import annotations`: the route closures travel to replicas by value, and FastAPI must see
# their parameter types as classes, not as names it cannot look up there.
import asyncio
import hashlib
import hmac
import ipaddress
import os
import secrets
import signal
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import ray
from ray import serve

from dwf_ray import store
from dwf_ray.serve.config import AppArgs, ServeConfig
from dwf_ray.serve.quota import QuotaExceeded, ServedQuota, Usage, uri_bytes_bound
from dwf_ray.serve.wire import CHUNK_BYTES, SOLVERS, SampleRequest, encode_header, max_models, stream_safetensors

TOKEN_ENV = "DWF_SERVE_TOKEN"
APP_NAME = "dwf"
OPEN_PATHS = ("/healthz",)          # reachable without the token (load balancers, probes)
SERVED = "served"                   # format=uri writes under <root>/served/<request id>/
OCTET = "application/octet-stream"


class ApiError(Exception):
    """A request the service refuses: HTTP status, the field at fault (or None), a message, and for refusals a
    client acts on by kind a ``code`` with the numbers behind it (``details``)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None,
                 code: Optional[str] = None, details: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers
        self.code, self.details = code, details or {}


@dataclass(frozen=True)
class Job:
    """One request, validated and with its defaults filled in: what the batch helper solves."""
    n: int
    seed: int
    temperature: float
    solver: str
    steps: int
    label: Optional[int]
    guidance: float

    @property
    def group(self) -> tuple:
        """Requests with the same group share one ODE solve."""
        return self.solver, self.steps, self.label, self.guidance


def token_digest(token: Optional[str]) -> Optional[str]:
    """sha256 of a bearer token: replicas keep and compare only this, so the token never sits in Serve's config."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def read_token(token_file: Optional[str]) -> Optional[str]:
    """The service token: from ``token_file`` (local or s3://) when given, else $DWF_SERVE_TOKEN, else None."""
    if token_file:
        token = store.read_bytes(token_file).decode().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class BearerAuth:
    """ASGI middleware: every path except OPEN_PATHS needs ``Authorization: Bearer <token>``; 401 otherwise."""

    def __init__(self, app, digest: Optional[str]):
        self.app, self.digest = app, digest

    async def __call__(self, scope, receive, send):
        if self.digest is None or scope["type"] != "http" or _route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token_digest(given.strip()) or "", self.digest):
            return await self.app(scope, receive, send)
        message = "missing bearer token" if not auth else "invalid bearer token"
        await _error_response(ApiError(401, f"{message}: send 'Authorization: Bearer <token>'", "authorization",
                                       {"WWW-Authenticate": "Bearer"}))(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def _error_response(err: ApiError):
    from fastapi.responses import JSONResponse
    return JSONResponse({"status": err.status, "field": err.field, "error": err.message, "code": err.code}
                        | err.details, status_code=err.status, headers=err.headers)


def _validation_error(exc) -> ApiError:
    """FastAPI's RequestValidationError as one ApiError naming the first field at fault."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})",
                        "body")
    if not loc:
        return ApiError(400, f"request body must be a JSON object with at least 'n' ({first['msg']})", "body")
    field = ".".join(loc)
    msg = "unknown field" if first.get("type") == "extra_forbidden" else first["msg"]
    if first.get("type") == "literal_error" and loc == ["solver"]:
        msg = f"unknown solver {first.get('input')!r}; use one of {list(SOLVERS)}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ApiError(422, f"{field}: {msg}{more}", field)


@serve.deployment(name="SampleService")
@serve.ingress()
class SampleService:
    """One replica: the run root's Generator, the request limits and the FastAPI routes."""

    def __init__(self, root: str, cfg_json: str, token_sha256: Optional[str] = None):
        import torch
        from dwf_ray.runtime import task_device
        from dwf_ray.sample.generator import Generator
        from dwf_ray.weights import WeightLayout

        self.cfg = ServeConfig.model_validate_json(cfg_json)
        torch.set_num_threads(self.cfg.threads())
        self.root, self.digest = root, token_sha256
        self.gen = Generator.load(root, device=task_device())
        self.layouts = {label: WeightLayout.from_arch(dec.arch)
                        for label, dec in zip(self._labels(), self.gen.decoders)}
        d_max = max(lay.size for lay in self.layouts.values())
        entries = max(self.layouts.values(), key=lambda lay: lay.size).entries
        fit = max_models([(e.name, e.shape) for e in entries], d_max, self.cfg.max_response_bytes)
        self.max_n = min(fit, self.cfg.max_n) if self.cfg.max_n else fit
        run_cfg = _read_optional_json(store.join(root, "config.json")) or {}
        sample = run_cfg.get("sample", {})
        self.defaults = {"solver": self.cfg.default_solver or sample.get("solver", "rk4"),
                         "steps": self.cfg.default_steps or int(sample.get("steps", 100)),
                         "temperature": float(sample.get("temperature", 1.0)), "guidance": 1.0}
        self.info = self._build_info(run_cfg, _read_optional_json(store.join(root, "report", "metrics.json")))
        self._last_solve_s = 0.0
        self.quota = ServedQuota(store.join(root, SERVED), self.cfg.max_served_bytes, self.cfg.max_served_models)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def _labels(self) -> list[Optional[int]]:
        return list(range(len(self.gen.decoders))) if self.gen.conditional else [None]

    def _build_info(self, run_cfg: dict, metrics: Optional[dict]) -> dict:
        arch = self.gen.decoders[0].arch
        acc = (metrics or {}).get("accuracy", {})
        c = self.cfg
        return {
            "root": self.root,
            "arch": {"family": arch.family, "args": arch.args},
            "archs": [{"family": d.arch.family, "args": d.arch.args} for d in self.gen.decoders]
            if self.gen.conditional else None,
            "n_params": self.layouts[self._labels()[0]].size,
            "latent_dim": self.gen.dim,
            "pca_k": self.gen.decoders[0].pca.k,
            "dataset": run_cfg.get("zoo", {}).get("dataset"),
            "accuracy": {k: ({"mean": acc[k].get("mean"), "std": acc[k].get("std"), "n": acc[k].get("n"),
                              "unit": "percent"} if isinstance(acc.get(k), dict) else None)
                         for k in ("zoo", "generated")},
            "conditional": self.gen.conditional,
            "classes": self.gen.class_names,
            "defaults": self.defaults,
            "limits": {"n": [1, self.max_n], "steps": [1, c.max_steps], "solvers": list(SOLVERS),
                       "temperature": [0, c.max_temperature], "guidance": [-c.max_abs_guidance, c.max_abs_guidance],
                       "seed": [0, 2 ** 63 - 1], "max_response_bytes": c.max_response_bytes,
                       "max_batch_size": c.max_batch_size, "batch_wait_timeout_s": c.batch_wait_timeout_s,
                       "max_ongoing_requests": c.max_ongoing_requests,
                       "max_queued_requests": c.max_queued_requests, "retry_after_s": c.retry_after_s,
                       "max_served_bytes": c.max_served_bytes, "max_served_models": c.max_served_models},
            "auth": self.digest is not None,
        }

    # -- requests ---------------------------------------------------------------------------------------------

    def job(self, req: SampleRequest) -> Job:
        """The request checked against this run's limits, its defaults filled in; ApiError 422 names the field."""
        c = self.cfg
        if req.n > self.max_n:
            raise ApiError(422, f"n: {req.n} models exceed this service's limit of {self.max_n} per request "
                                f"({c.max_response_bytes} bytes of response); ask in several requests", "n")
        if req.steps is not None and req.steps > c.max_steps:
            raise ApiError(422, f"steps: {req.steps} is above the limit of {c.max_steps}", "steps")
        if req.temperature is not None and req.temperature > c.max_temperature:
            raise ApiError(422, f"temperature: {req.temperature} is above the limit of {c.max_temperature}",
                           "temperature")
        if req.guidance is not None and abs(req.guidance) > c.max_abs_guidance:
            raise ApiError(422, f"guidance: |{req.guidance}| is above the limit of {c.max_abs_guidance}", "guidance")
        if self.gen.conditional:
            k = len(self.gen.decoders)
            if req.label is None or req.label >= k:
                got = "none given" if req.label is None else f"got {req.label}"
                raise ApiError(422, f"label: this conditional flow needs a label in 0..{k - 1} "
                                    f"({', '.join(self.gen.class_names)}); {got}", "label")
        else:
            if req.label is not None:
                raise ApiError(422, "label: this flow is unconditional; leave label out", "label")
            if req.guidance is not None and req.guidance != 1.0:
                raise ApiError(422, "guidance: needs a conditional flow (and a label)", "guidance")
        d = self.defaults
        return Job(n=req.n, seed=secrets.randbits(63) if req.seed is None else req.seed,
                   temperature=d["temperature"] if req.temperature is None else req.temperature,
                   solver=req.solver or d["solver"], steps=req.steps or d["steps"], label=req.label,
                   guidance=d["guidance"] if req.guidance is None else req.guidance)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[Job]) -> list:
        """The one batching point: concurrent requests -> (flat weights, requests in this batch, requests in
        its ODE solve) each, or the exception of its group. Runs in a thread so that the event loop keeps
        answering (health checks, info, other streams) meanwhile.

        Serve forms the next batch as soon as its first request arrives, not when this one is done; with
        ``fill_while_busy`` the next batch keeps filling for as long as the last solve took (instead of
        ``batch_wait_timeout_s``) while this one runs, so a busy replica solves full batches, not a queue of
        small ones, and an idle one still answers a lone request after ``batch_wait_timeout_s``.
        """
        cfg = self.cfg
        if cfg.fill_while_busy:
            self._batched.set_batch_wait_timeout_s(max(cfg.batch_wait_timeout_s, self._last_solve_s))
        start = time.perf_counter()
        try:
            return await asyncio.to_thread(self.solve_batch, jobs)
        finally:
            self._last_solve_s = min(time.perf_counter() - start, cfg.max_fill_wait_s)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def solve_batch(self, jobs: list[Job]) -> list:
        import torch
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            groups[job.group].append(i)
        out: list = [None] * len(jobs)
        for (solver, steps, label, guidance), idx in groups.items():
            # dopri5 adapts its steps to the whole batch: solve each of its requests alone to keep answers fixed
            parts = [[i] for i in idx] if solver == "dopri5" else [idx]
            for part in parts:
                try:
                    x0 = torch.cat([self.gen.source(jobs[i].n, jobs[i].seed, jobs[i].temperature) for i in part])
                    flat = self.gen.decode(self.gen.solve(x0, solver, steps, label, guidance), label)
                    bounds = np.cumsum([0] + [jobs[i].n for i in part])
                    for i, a, b in zip(part, bounds[:-1], bounds[1:]):
                        out[i] = (flat[a:b], len(jobs), len(part))
                except Exception as exc:  # one bad group fails its own requests, never the batch
                    for i in part:
                        out[i] = exc
        return out

    async def sample(self, req: SampleRequest):
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        job = self.job(req)
        if req.format == "uri":   # refused before the solve too; the write checks again under the lock
            await asyncio.to_thread(self.quota.check, self._uri_need(job))
        result = await self._batched(job)
        if isinstance(result, Exception):
            raise ApiError(500, f"sampling failed: {type(result).__name__}: {result}")
        flat, batch_size, solve_size = result
        arch = self.gen.arch(job.label)
        meta = {"arch": arch.to_json(), "n": str(job.n), "seed": str(job.seed), "temperature": repr(job.temperature),
                "solver": job.solver, "steps": str(job.steps), "label": "" if job.label is None else str(job.label),
                "guidance": repr(job.guidance), "n_params": str(flat.shape[1]), "format": "dwf-ray.samples.v1"}
        headers = {"X-Batch-Size": str(batch_size), "X-Solve-Size": str(solve_size), "X-Seed": str(job.seed),
                   "X-Models": str(job.n)}
        if req.format == "uri":
            try:
                body = await asyncio.to_thread(self._write_uris, flat, job, meta)
            except OSError as exc:
                raise ApiError(500, f"writing under {store.join(self.root, SERVED)} failed: {exc}", "format") from exc
            return JSONResponse(body | {"batch_size": batch_size}, headers=headers)
        layout = self.layouts[job.label]
        header = encode_header([(e.name, e.shape, e.offset) for e in layout.entries], job.n, layout.size, meta)
        headers |= {"Content-Disposition": f'attachment; filename="dwf-{job.seed}.safetensors"'}
        if len(header) + flat.nbytes <= CHUNK_BYTES:   # small: one message through the proxy is cheaper
            return Response(b"".join(stream_safetensors(header, flat)), media_type=OCTET, headers=headers)

        async def body():   # chunks straight from the (n, d) array: the payload is never copied whole
            for chunk in stream_safetensors(header, flat):
                yield chunk
        headers["Content-Length"] = str(len(header) + flat.nbytes)
        return StreamingResponse(body(), media_type=OCTET, headers=headers)

    def _uri_need(self, job: Job) -> Usage:
        """An upper bound of what ``job`` writes with format=uri: bytes, and its checkpoints."""
        layout, arch = self.layouts[job.label], self.gen.arch(job.label)
        return Usage(uri_bytes_bound(job.n, layout, arch, self.quota.served), job.n)

    def _write_uris(self, flat: np.ndarray, job: Job, meta: dict) -> dict:
        out_dir = store.join(self.root, SERVED, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        with self.quota.admit(self._uri_need(job)):
            manifest = self.gen.write(out_dir, flat, job.label)
            store.write_json(store.join(out_dir, "request.json"), meta)
        return {"uris": [str(u) for u in manifest["uri"]], "manifest": store.join(out_dir, "manifest.parquet"),
                "dir": out_dir, "n": job.n, "seed": job.seed, "temperature": job.temperature,
                "arch": meta["arch"]}

    def __serve_build_asgi_app__(self):
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from starlette.exceptions import HTTPException

        api = FastAPI(title="dwf-ray sampler", version="1",
                      description="New neural-network weights from a finished DeepWeightFlow run.")
        api.add_middleware(BearerAuth, digest=self.digest)

        @api.exception_handler(ApiError)
        async def _api_error(_: Request, exc: ApiError):
            return _error_response(exc)

        @api.exception_handler(QuotaExceeded)
        async def _quota(_: Request, exc: QuotaExceeded):
            return _error_response(_quota_error(exc))

        @api.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError):
            return _error_response(_validation_error(exc))

        @api.exception_handler(HTTPException)
        async def _http(_: Request, exc: HTTPException):
            return _error_response(ApiError(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None)))

        @api.post("/v1/sample", responses={
            200: {"content": {"application/octet-stream": {}, "application/json": {}},
                  "description": "safetensors file of n models (format=safetensors), or their URIs (format=uri)"}})
        async def sample(req: SampleRequest):
            """n new models as one safetensors file (tensors "<i>.<param>"), or written under <root>/served/."""
            return await self.sample(req)

        @api.get("/v1/info")
        async def info():
            """Architecture, sizes, accuracies from the run's report, classes, defaults and limits."""
            return self.info

        @api.get("/healthz")
        async def healthz():
            return {"status": "ok"}

        return api


def _quota_error(exc: QuotaExceeded) -> ApiError:
    """507 Insufficient Storage, code quota_exceeded, with the bytes and models used, needed and allowed."""
    used, need, quota = exc.used, exc.need, exc.quota
    details = {"used_bytes": used.nbytes, "request_bytes": need.nbytes, "quota_bytes": quota.nbytes,
               "used_models": used.models, "request_models": need.models, "quota_models": quota.models}
    return ApiError(507, str(exc), "format", code="quota_exceeded", details=details)


def _read_optional_json(uri: str) -> Optional[dict]:
    return store.read_json(uri) if store.exists(uri) else None


# -- building and running the application ---------------------------------------------------------------------

def make_app(root: str, cfg: Optional[ServeConfig] = None, token: Optional[str] = None):
    """The Serve application over ``root`` (checked to hold a trained flow) with ``cfg``'s deployment options."""
    from dwf_ray.store import RunStore
    cfg = cfg or ServeConfig()
    root = RunStore(root).root
    if not store.exists(store.join(root, "flow", "model.pt")):
        raise FileNotFoundError(f"{root}: no flow/model.pt; serve a run root whose flow stage is complete")
    return SampleService.options(**cfg.deployment_options()).bind(root, cfg.model_dump_json(), token_digest(token))


def build_app(args: dict):
    """Application builder for a Serve config file (``import_path: dwf_ray.serve.app:build_app``).

    ``args``: ``root`` (required), ``token_file`` (else $DWF_SERVE_TOKEN where the app is built), and any
    ServeConfig field (num_replicas or autoscaling_config, max_ongoing_requests, max_queued_requests,
    max_batch_size, batch_wait_timeout_s, num_cpus, num_gpus, ...). Unknown keys are an error.
    """
    parsed = AppArgs.model_validate(args)
    return make_app(parsed.root, parsed.serve_config(), read_token(parsed.token_file))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None


def serve_main(root: str, host: str = "127.0.0.1", port: int = 8000, token_file: Optional[str] = None,
               insecure: bool = False, overrides: tuple[str, ...] | list[str] = (),
               log: Callable[[str], None] = print, block: bool = True) -> str:
    """``dwf serve``: start the app over ``root`` on ``host:port``, print its URL and block until Ctrl-C.

    Refuses a non-loopback host without a token ($DWF_SERVE_TOKEN or ``token_file``) unless ``insecure``.
    ``overrides``: ServeConfig ``key=value`` items. Raises ValueError for a bad option. Returns the URL
    (``block=False`` returns at once and leaves the app running).
    """
    from dwf_ray.runtime import ensure_ray
    cfg = ServeConfig().with_overrides(list(overrides))
    token = read_token(token_file)
    if not is_loopback(host) and not token and not insecure:
        raise ValueError(f"refusing to serve on {host} (not loopback) without a token: set ${TOKEN_ENV} or "
                         "--token-file, or pass --insecure to expose it unauthenticated")
    app = make_app(root, cfg, token)
    external = bool(os.environ.get("RAY_ADDRESS"))
    if not external:
        _check_port_free(host, port)
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    log(f"serving {root} at {url}  (POST {url}/v1/sample, GET {url}/v1/info, docs {url}/docs)"
        + ("; bearer token required" if token else ""))
    if not block:
        return url
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():   # Ctrl-C, and SIGTERM from a supervisor
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
        log("stopping")
    finally:
        if external:
            serve.delete(APP_NAME)   # leave the cluster's Serve (and its other apps) running
        else:
            serve.shutdown()
            ray.shutdown()
    return url

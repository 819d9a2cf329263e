"""The sampling service's deployment: a Ray Serve replica with a FastAPI ingress over one finished run root.

Each replica loads the Generator (flow, latent scaler, PCA decoder) once. ``POST /v1/sample`` requests go
through one ``@serve.batch`` helper that merges concurrent requests into one ODE solve and one decode per
(solver, steps, label, guidance), then splits the result; each request's source noise comes from its own seed,
so batching never changes an answer beyond float rounding. Each answer's ``Server-Timing`` header says where
its time went in the replica.
"""
# No `from __future__ import annotations`: the route closures travel to replicas by value, and FastAPI must see
# their parameter types as classes, not as names it cannot look up there.
import asyncio
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
from ray import serve

from dwf_ray import store
from dwf_ray.config import SOLVERS
from dwf_ray.sample.generator import RequestError
from dwf_ray.serve.auth import BearerAuth
from dwf_ray.serve.config import ServeConfig
from dwf_ray.serve.errors import ApiError, error_response, quota_error, validation_error
from dwf_ray.serve.quota import QuotaExceeded, ServedQuota, Usage, uri_bytes_bound
from dwf_ray.serve.wire import (CHUNK_BYTES, SampleRequest, encode_header, format_server_timing, max_models,
                                stream_safetensors)

SERVED = "served"                   # format=uri writes under <root>/served/<request id>/
OCTET = "application/octet-stream"


@dataclass(frozen=True)
class SampleCall:
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


@dataclass(frozen=True)
class Solved:
    """One request's answer from its batch: its rows of the batch's flat weights, how many requests the batch
    and its ODE solve held, and when the solve started and how long its solve and decode took (seconds)."""
    flat: np.ndarray
    batch_size: int
    solve_size: int
    timing: dict

    def server_timing(self, queued: float, **done: float) -> str:
        """An HTTP ``Server-Timing`` value (milliseconds) of one request: ``wait`` (in the batch queue, from
        ``queued`` to the start of its solve), ``solve``, ``decode``, then each stage of ``done`` (its name and
        the time it ended, after the decode) and ``replica`` (the whole time in the handler after validation)."""
        t = self.timing
        parts = [("wait", t["started"] - queued), ("solve", t["solve"]), ("decode", t["decode"])]
        last = t["started"] + t["solve"] + t["decode"]
        for name, end in done.items():
            parts.append((name, end - last))
            last = end
        parts.append(("replica", last - queued))
        return format_server_timing(parts)


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

    def check_request(self, req: SampleRequest) -> SampleCall:
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
        d = self.defaults
        guidance = d["guidance"] if req.guidance is None else req.guidance
        try:
            self.gen.check_request(req.label, guidance)
        except RequestError as exc:
            raise ApiError(422, str(exc), exc.field) from None
        return SampleCall(n=req.n, seed=secrets.randbits(63) if req.seed is None else req.seed,
                          temperature=d["temperature"] if req.temperature is None else req.temperature,
                          solver=req.solver or d["solver"], steps=req.steps or d["steps"], label=req.label,
                          guidance=guidance)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def _batched(self, calls: list[SampleCall]) -> list:
        """The one batching point: concurrent requests -> a ``Solved`` each, or the exception of its group.
        Runs in a thread so that the event loop keeps answering (health checks, info, other streams) meanwhile.

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
            return await asyncio.to_thread(self.solve_batch, calls)
        finally:
            self._last_solve_s = min(time.perf_counter() - start, cfg.max_fill_wait_s)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def solve_batch(self, calls: list[SampleCall]) -> list:
        import torch
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, call in enumerate(calls):
            groups[call.group].append(i)
        out: list = [None] * len(calls)
        for (solver, steps, label, guidance), idx in groups.items():
            # dopri5 adapts its steps to the whole batch: solve each of its requests alone to keep answers fixed
            parts = [[i] for i in idx] if solver == "dopri5" else [idx]
            for part in parts:
                try:
                    started = time.perf_counter()
                    x0 = torch.cat([self.gen.source(calls[i].n, calls[i].seed, calls[i].temperature) for i in part])
                    u = self.gen.solve(x0, solver, steps, label, guidance)
                    solved = time.perf_counter()
                    flat = self.gen.decode(u, label)
                    timing = {"started": started, "solve": solved - started, "decode": time.perf_counter() - solved}
                    bounds = np.cumsum([0] + [calls[i].n for i in part])
                    for i, a, b in zip(part, bounds[:-1], bounds[1:]):
                        out[i] = Solved(flat[a:b], len(calls), len(part), timing)
                except Exception as exc:  # one bad group fails its own requests, never the batch
                    for i in part:
                        out[i] = exc
        return out

    async def sample(self, req: SampleRequest):
        from fastapi.responses import JSONResponse, Response, StreamingResponse
        call = self.check_request(req)
        if req.format == "uri":   # refused before the solve too; the write checks again under the lock
            await asyncio.to_thread(self.quota.check, self._uri_need(call))
        queued = time.perf_counter()
        result = await self._batched(call)
        if isinstance(result, Exception):
            raise ApiError(500, f"sampling failed: {type(result).__name__}: {result}")
        flat, batch_size, solve_size = result.flat, result.batch_size, result.solve_size
        arch = self.gen.arch(call.label)
        meta = {"arch": arch.to_json(), "n": str(call.n), "seed": str(call.seed), "temperature": repr(call.temperature),
                "solver": call.solver, "steps": str(call.steps), "label": "" if call.label is None else str(call.label),
                "guidance": repr(call.guidance), "n_params": str(flat.shape[1]), "format": "dwf-ray.samples.v1"}
        headers = {"X-Batch-Size": str(batch_size), "X-Solve-Size": str(solve_size), "X-Seed": str(call.seed),
                   "X-Models": str(call.n)}
        if req.format == "uri":
            try:
                body = await asyncio.to_thread(self._write_uris, flat, call, meta)
            except OSError as exc:
                raise ApiError(500, f"writing under {store.join(self.root, SERVED)} failed: {exc}", "format") from exc
            headers["Server-Timing"] = result.server_timing(queued, write=time.perf_counter())
            return JSONResponse(body | {"batch_size": batch_size}, headers=headers)
        layout = self.layouts[call.label]
        header = encode_header([(e.name, e.shape, e.offset) for e in layout.entries], call.n, layout.size, meta)
        headers |= {"Content-Disposition": f'attachment; filename="dwf-{call.seed}.safetensors"'}
        if len(header) + flat.nbytes <= CHUNK_BYTES:   # small: one message through the proxy is cheaper
            payload = b"".join(stream_safetensors(header, flat))
            headers["Server-Timing"] = result.server_timing(queued, encode=time.perf_counter())
            return Response(payload, media_type=OCTET, headers=headers)
        headers["Server-Timing"] = result.server_timing(queued, encode=time.perf_counter())

        async def body():   # chunks straight from the (n, d) array: the payload is never copied whole
            for chunk in stream_safetensors(header, flat):
                yield chunk
        headers["Content-Length"] = str(len(header) + flat.nbytes)
        return StreamingResponse(body(), media_type=OCTET, headers=headers)

    def _uri_need(self, call: SampleCall) -> Usage:
        """An upper bound of what ``call`` writes with format=uri: bytes, and its checkpoints."""
        layout, arch = self.layouts[call.label], self.gen.arch(call.label)
        return Usage(uri_bytes_bound(call.n, layout, arch, self.quota.served), call.n)

    def _write_uris(self, flat: np.ndarray, call: SampleCall, meta: dict) -> dict:
        out_dir = store.join(self.root, SERVED, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        with self.quota.admit(self._uri_need(call)):
            manifest = self.gen.write(out_dir, flat, call.label)
            store.write_json(store.join(out_dir, "request.json"), meta)
        return {"uris": [str(u) for u in manifest["uri"]], "manifest": store.join(out_dir, "manifest.parquet"),
                "dir": out_dir, "n": call.n, "seed": call.seed, "temperature": call.temperature,
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
            return error_response(exc)

        @api.exception_handler(QuotaExceeded)
        async def _quota(_: Request, exc: QuotaExceeded):
            return error_response(quota_error(exc))

        @api.exception_handler(RequestValidationError)
        async def _invalid(_: Request, exc: RequestValidationError):
            return error_response(validation_error(exc))

        @api.exception_handler(HTTPException)
        async def _http(_: Request, exc: HTTPException):
            return error_response(ApiError(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None)))

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


def _read_optional_json(uri: str) -> Optional[dict]:
    return store.read_json(uri) if store.exists(uri) else None

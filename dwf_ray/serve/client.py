"""Python client of the sampling service: models as state dicts or nn.Modules, with bounded retries.

Every request carries a seed (drawn here when the caller gives none), so a retried request asks for exactly
the same models. Retries cover a full queue (503, honouring Retry-After), a replica or proxy that went away
(500/502/504, connection errors, timeouts); a 4xx is the caller's error and is raised at once. Each attempt
has a connect and a read timeout, and the attempts are bounded, so no call hangs.
"""
from __future__ import annotations

import os
import random
import secrets
import time
from typing import Optional

import numpy as np
import requests

from dwf_ray.serve.wire import TOKEN_ENV, split_models

RETRY_STATUS = (500, 502, 503, 504)


class SampleError(RuntimeError):
    """The service refused a request (status, field and message of its JSON error) or stayed unavailable."""

    def __init__(self, status: Optional[int], message: str, field: Optional[str] = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message, self.field = status, message, field


class SampleClient:
    """``SampleClient("http://127.0.0.1:8000", token=None).sample(4, seed=0)`` -> 4 state dicts.

    ``token``: the bearer token; None reads $DWF_SERVE_TOKEN. ``retries``: further attempts after the first;
    ``timeout``: seconds to connect, and seconds to wait for each piece of the answer.
    """

    def __init__(self, url: str, token: Optional[str] = None, retries: int = 6, backoff_s: float = 0.25,
                 max_backoff_s: float = 5.0, connect_timeout_s: float = 5.0, read_timeout_s: float = 120.0):
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.timeout = (connect_timeout_s, read_timeout_s)
        self.session = requests.Session()
        self.attempts = 0          # HTTP attempts made, retries included (for tests and benches)
        self.last_headers: dict = {}

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "SampleClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delay(self, attempt: int, retry_after: Optional[str]) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        if retry_after and retry_after.isdigit():
            base = min(self.max_backoff_s, max(base, float(retry_after)))
        return base * (0.5 + random.random() / 2)   # jitter: retries of many clients spread out

    def request(self, method: str, path: str, json: Optional[dict] = None) -> requests.Response:
        """One call with retries; returns the 2xx response (body read) or raises SampleError."""
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            self.attempts += 1
            retry_after = None
            try:
                resp = self.session.request(method, f"{self.url}{path}", json=json, headers=self.headers,
                                            timeout=self.timeout)
                _ = resp.content   # the whole answer arrives within the read timeout, or this attempt fails
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code < 400:
                    self.last_headers = dict(resp.headers)
                    return resp
                status, field, message = resp.status_code, None, resp.text
                try:
                    body = resp.json()
                    field, message = body.get("field"), body.get("error", message)
                except ValueError:
                    pass
                if status not in RETRY_STATUS:
                    raise SampleError(status, message, field)
                retry_after = resp.headers.get("Retry-After")
                last = f"{status}: {message}"
            if attempt < self.retries:
                time.sleep(self._delay(attempt, retry_after))
        raise SampleError(None, f"{method} {self.url}{path} failed after {self.retries + 1} attempts; last: {last}")

    def info(self) -> dict:
        return self.request("GET", "/v1/info").json()

    def healthy(self) -> bool:
        try:
            return self.session.get(f"{self.url}/healthz", timeout=self.timeout).status_code == 200
        except requests.RequestException:
            return False

    @staticmethod
    def _body(n: int, seed: Optional[int], **fields) -> dict:
        body = {"n": n, "seed": secrets.randbits(63) if seed is None else seed}
        return body | {k: v for k, v in fields.items() if v is not None}

    def sample_bytes(self, n: int, seed: Optional[int] = None, temperature: Optional[float] = None,
                     solver: Optional[str] = None, steps: Optional[int] = None, label: Optional[int] = None,
                     guidance: Optional[float] = None) -> bytes:
        """The raw safetensors file of n models."""
        body = self._body(n, seed, temperature=temperature, solver=solver, steps=steps, label=label,
                          guidance=guidance)
        return self.request("POST", "/v1/sample", body).content

    def sample_with_metadata(self, n: int, seed: Optional[int] = None, **options) -> tuple[list[dict], dict]:
        """(n state dicts {param name: np.ndarray}, the file's metadata: arch, seed, temperature, ...)."""
        return split_models(self.sample_bytes(n, seed, **options))

    def sample(self, n: int, seed: Optional[int] = None, temperature: Optional[float] = None,
               solver: Optional[str] = None, steps: Optional[int] = None, label: Optional[int] = None,
               guidance: Optional[float] = None) -> list[dict[str, np.ndarray]]:
        """n new models as state dicts {param name: float32 array}."""
        return self.sample_with_metadata(n, seed, temperature=temperature, solver=solver, steps=steps,
                                         label=label, guidance=guidance)[0]

    def modules(self, n: int, seed: Optional[int] = None, **options) -> list:
        """n new models as nn.Modules of the run's architecture, in eval mode."""
        from dwf_ray.archs import ArchSpec
        from dwf_ray.weights import to_module
        states, meta = self.sample_with_metadata(n, seed, **options)
        arch = ArchSpec.from_json(meta["arch"])
        return [to_module(arch, s) for s in states]

    def sample_uris(self, n: int, seed: Optional[int] = None, **options) -> dict:
        """Have the service write n models under <root>/served/ and return their URIs and manifest."""
        body = self._body(n, seed, **options) | {"format": "uri"}
        return self.request("POST", "/v1/sample", body).json()


def write_from_endpoint(endpoint: str, out_dir: str, n: int, seed: Optional[int] = None,
                        temperature: Optional[float] = None, token: Optional[str] = None):
    """``dwf sample --endpoint URL --out DIR``: n models from a running service, written as safetensors
    checkpoints under ``out_dir`` (local or s3://) with manifest.parquet; returns the manifest DataFrame."""
    from dwf_ray import store
    from dwf_ray.archs import ArchSpec
    from dwf_ray.sample.generator import write_models
    with SampleClient(endpoint, token=token) as client:
        states, meta = client.sample_with_metadata(n, seed, temperature=temperature)
    seed, temperature = int(meta["seed"]), float(meta["temperature"])
    manifest = write_models(states, ArchSpec.from_json(meta["arch"]), out_dir,
                            extra={"seed": str(seed), "temperature": str(temperature), "endpoint": endpoint})
    manifest = manifest.assign(seed=seed, temperature=temperature, endpoint=endpoint)
    store.write_table(store.join(out_dir, "manifest.parquet"), manifest)
    return manifest

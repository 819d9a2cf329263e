"""The Ray Serve sampling service: real Serve, real HTTP on loopback, over the smoke run's root.

One Serve instance for the module, two applications deployed together: "main" (a token, batches of up to 16)
and "tiny" (no token, one request at a time and a queue of one, to overload).
"""
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from dwf_ray.serve.config import AppArgs, ServeConfig
from dwf_ray.serve.wire import split_models

TOKEN = "test-token-5f1c"
SLOW = {"n": 300, "steps": 1000}        # a request that keeps a replica busy for a few seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(smoke_run, tmp_path_factory):
    """(run root, base URL) of the two apps; Serve is shut down afterwards (Ray itself stays up)."""
    from ray import serve
    from dwf_ray.serve.app import make_app
    src, _ = smoke_run
    root = tmp_path_factory.mktemp("serve") / "smoke"   # format=uri writes under it: keep the shared root as is
    root.mkdir()
    for part in ("config.json", "flow", "pca", "report"):
        if (src / part).is_dir():
            shutil.copytree(src / part, root / part)
        else:
            shutil.copy(src / part, root / part)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = make_app(str(root), ServeConfig(num_cpus=0.25, max_batch_size=16, max_ongoing_requests=32,
                                           batch_wait_timeout_s=0.05), token=TOKEN)
    tiny = make_app(str(root), ServeConfig(num_cpus=0.25, max_batch_size=1, max_ongoing_requests=1,
                                           max_queued_requests=1, retry_after_s=1))
    serve.run_many([serve.RunTarget(main, name="main", route_prefix="/"),
                    serve.RunTarget(tiny, name="tiny", route_prefix="/tiny")])
    yield root, f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service[1], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(service):
    from dwf_ray.serve.client import SampleClient
    with SampleClient(service[1], token=TOKEN, read_timeout_s=60) as c:
        yield c


def _flat(states: list[dict]) -> np.ndarray:
    return np.stack([np.concatenate([s[k].ravel() for k in sorted(s)]) for s in states])


def test_served_model_loads_and_scores_like_the_offline_sampler(service, client, one_torch_thread):
    import torch
    from dwf_ray.archs import ArchSpec, build_model
    from dwf_ray.config import RunConfig
    from dwf_ray.eval.scoring import score_flat
    from dwf_ray.sample.generator import Generator
    from dwf_ray.weights import WeightLayout
    root, _ = service
    cfg = RunConfig.model_validate_json((root / "config.json").read_text())
    modules = client.modules(4, seed=11)
    states, meta = client.sample_with_metadata(4, seed=11)
    arch = ArchSpec.from_json(meta["arch"])
    assert arch == ArchSpec.parse(cfg.zoo.arch) and meta["seed"] == "11" and meta["solver"] == cfg.sample.solver
    for module, state in zip(modules, states):   # every parameter of the architecture, nothing else
        fresh = build_model(arch)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        assert all(torch.equal(p, dict(module.named_parameters())[k]) for k, p in fresh.named_parameters())
    layout = WeightLayout.from_arch(arch)
    served = np.stack([layout.flatten(s) for s in states])
    offline = Generator.load(str(root))(4, cfg.sample.temperature, 11, cfg.sample.solver, cfg.sample.steps)
    np.testing.assert_allclose(served, offline, rtol=1e-5, atol=1e-6)
    args = (arch.to_json(), cfg.zoo.model_dump_json(), cfg.eval.model_dump_json())
    acc_served, acc_offline = score_flat(*args, served)[0], score_flat(*args, offline)[0]
    np.testing.assert_array_equal(acc_served, acc_offline)
    assert acc_served.mean() > 0.5


def test_concurrent_requests_are_batched_and_match_lone_requests(http):
    bodies = [{"n": 2, "seed": 100 + i} for i in range(16)]
    barrier = threading.Barrier(16)

    def post(body):
        barrier.wait()
        return http.post("/v1/sample", json=body)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(post, bodies))
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    sizes = [int(r.headers["X-Batch-Size"]) for r in together]
    assert max(sizes) > 1, sizes
    assert all(r.headers["X-Solve-Size"] == r.headers["X-Batch-Size"] for r in together)   # one solver setting
    alone = [http.post("/v1/sample", json=b) for b in bodies]
    assert all(int(r.headers["X-Batch-Size"]) == 1 for r in alone)
    for body, t, a in zip(bodies, together, alone):
        ft, fa = _flat(split_models(t.content)[0]), _flat(split_models(a.content)[0])
        assert np.linalg.norm(ft - fa) / np.linalg.norm(fa) < 1e-5, body
    again = http.post("/v1/sample", json=bodies[0])
    assert again.content == alone[0].content   # a repeated lone request: the same bytes


def _server_timing(header: str) -> dict[str, float]:
    """``Server-Timing`` as {name: milliseconds}."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def test_each_answer_says_where_its_time_went(http):
    """Server-Timing: batch-queue wait, ODE solve, decode, encoding, and the replica's whole time; the solve of
    a heavier request takes longer, and the parts add up to the whole, which the client's wait contains."""
    timings = {}
    for steps in (5, 400):
        start = time.perf_counter()
        r = http.post("/v1/sample", json={"n": 64, "seed": 3, "solver": "rk4", "steps": steps})
        client_ms = 1000 * (time.perf_counter() - start)
        assert r.status_code == 200, r.text
        t = timings[steps] = _server_timing(r.headers["Server-Timing"])
        assert list(t) == ["wait", "solve", "decode", "encode", "replica"], t
        assert all(v >= 0 for v in t.values()), t
        assert t["replica"] == pytest.approx(t["wait"] + t["solve"] + t["decode"] + t["encode"], abs=0.01)
        assert t["replica"] <= client_ms
    assert timings[400]["solve"] > 10 * timings[5]["solve"], timings


def test_the_answer_is_one_streamed_safetensors_file(http):
    from safetensors.numpy import load
    r = http.post("/v1/sample", json={"n": 3, "seed": 5, "temperature": 0.8, "solver": "midpoint", "steps": 10})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert int(r.headers["content-length"]) == len(r.content) and r.headers["X-Seed"] == "5"
    tensors = load(r.content)
    assert {k.split(".", 1)[0] for k in tensors} == {"0", "1", "2"} and "0.net.0.weight" in tensors
    meta = split_models(r.content)[1]
    assert json.loads(meta["arch"])["family"] == "mlp"
    assert (meta["seed"], meta["temperature"], meta["solver"], meta["steps"]) == ("5", "0.8", "midpoint", "10")
    r = http.post("/v1/sample", json={"n": 2, "seed": 5, "solver": "dopri5"})
    assert r.status_code == 200 and len(split_models(r.content)[0]) == 2
    with http.stream("POST", "/v1/sample", json={"n": 2000, "seed": 1, "steps": 2}) as s:   # about 28 MB
        sizes = [len(chunk) for chunk in s.iter_raw()]
    assert sum(sizes) == int(s.headers["content-length"]) and len(sizes) > 1


def test_uri_format_writes_checkpoints_and_a_manifest(http, service):
    import pandas as pd
    from dwf_ray.weights import load_model_state
    r = http.post("/v1/sample", json={"n": 2, "seed": 3, "format": "uri"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["uris"]) == 2 and body["dir"].startswith(str(service[0] / "served"))
    manifest = pd.read_parquet(body["manifest"])
    assert list(manifest["uri"]) == body["uris"] and (manifest["status"] == "ok").all()
    state, arch = load_model_state(body["uris"][0])
    direct = split_models(http.post("/v1/sample", json={"n": 2, "seed": 3}).content)[0][0]
    assert all(np.allclose(state[k], direct[k], rtol=1e-5, atol=1e-6) for k in direct)


# What served/ may hold: six 1-model requests of the smoke MLP (20 kB each) reach QUOTA bytes first; two 4-model
# requests (64 kB each) would fit in bytes but not in QUOTA_MODELS checkpoints.
QUOTA, QUOTA_MODELS = 150_000, 7


@pytest.fixture(scope="module")
def quota_app(service, tmp_path_factory):
    """(run root, base URL) of a third app, over its own copy of the run root, whose format=uri output may hold
    QUOTA bytes and QUOTA_MODELS checkpoints; a batch waits up to 1 s for 8 requests, so that concurrent ones are
    solved, and written, at once."""
    from ray import serve
    from dwf_ray.serve.app import make_app
    root = tmp_path_factory.mktemp("quota") / "smoke"
    shutil.copytree(service[0], root, ignore=shutil.ignore_patterns("served"))
    cfg = ServeConfig(num_cpus=0.25, max_served_bytes=QUOTA, max_served_models=QUOTA_MODELS, max_batch_size=8,
                      batch_wait_timeout_s=1.0, fill_while_busy=False)
    serve.run(make_app(str(root), cfg), name="quota", route_prefix="/quota")
    yield root, service[1] + "/quota"
    serve.delete("quota")


def _bytes_under(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _models_under(folder: Path) -> int:
    return len(list(folder.rglob("*.safetensors")))


def _checkpoints_match_their_manifests(bodies: list[dict]) -> bool:
    import hashlib
    import pandas as pd
    return all(hashlib.sha256(Path(uri).read_bytes()).hexdigest() == sha
               for b in bodies for uri, sha in pd.read_parquet(b["manifest"])[["uri", "sha256"]].itertuples(False))


def test_uri_output_past_the_quota_gets_507_and_keeps_what_was_written(quota_app):
    root, url = quota_app
    served = root / "served"
    shutil.rmtree(served, ignore_errors=True)
    with httpx.Client(base_url=url, timeout=60) as http:
        limits = http.get("/v1/info").json()["limits"]
        assert limits["max_served_bytes"] == QUOTA and limits["max_served_models"] == QUOTA_MODELS
        written, refused = [], None
        for seed in range(20):
            r = http.post("/v1/sample", json={"n": 1, "seed": seed, "format": "uri"})
            if r.status_code != 200:
                refused = r
                break
            written.append(r.json())
        assert refused is not None and refused.status_code == 507 and len(written) >= 2, refused and refused.text
        err = refused.json()
        assert err["code"] == "quota_exceeded" and err["field"] == "format" and err["quota_bytes"] == QUOTA
        assert "max_served_bytes" in err["error"] and "max_served_models" not in err["error"]
        assert str(served) in err["error"] and len(err["error"].splitlines()) == 1
        on_disk = _bytes_under(served)
        assert err["used_bytes"] == on_disk <= QUOTA < on_disk + err["request_bytes"]
        assert err["used_models"] == _models_under(served) == len(written) < QUOTA_MODELS
        # each request wrote no more than the bound it was admitted with
        assert max(_bytes_under(Path(b["dir"])) for b in written) <= err["request_bytes"]
        # the refused request wrote nothing, and nothing written before is lost
        assert sorted(p.name for p in served.iterdir()) == sorted(Path(b["dir"]).name for b in written)
        assert _checkpoints_match_their_manifests(written)
        assert http.post("/v1/sample", json={"n": 2, "seed": 0, "format": "uri"}).status_code == 507
        assert _bytes_under(served) == on_disk
        # format=safetensors writes nothing and is not limited; space freed under served/ counts at once
        assert http.post("/v1/sample", json={"n": 1, "seed": 0}).status_code == 200
        shutil.rmtree(written[0]["dir"])
        again = http.post("/v1/sample", json={"n": 1, "seed": 0, "format": "uri"})
        assert again.status_code == 200 and _checkpoints_match_their_manifests(written[1:] + [again.json()])


def test_concurrent_uri_requests_never_pass_the_quota_together(quota_app):
    """Eight 4-model requests solved in one batch and written at once: one fits QUOTA_MODELS. The check and the
    write hold one lock (without it, measured: 2 of 5 such bursts admitted two requests)."""
    root, url = quota_app
    served = root / "served"
    for _ in range(5):
        shutil.rmtree(served, ignore_errors=True)
        with httpx.Client(base_url=url, timeout=120) as http, ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: http.post("/v1/sample", json={"n": 4, "seed": i, "format": "uri"}),
                                    range(8)))
        codes = [r.status_code for r in answers]
        assert set(codes) == {200, 507}, codes
        assert {r.headers.get("x-batch-size") for r in answers if r.status_code == 200} == {"8"}   # one batch
        refused = [r.json() for r in answers if r.status_code == 507]
        assert all(e["code"] == "quota_exceeded" and "max_served_models" in e["error"] for e in refused)
        ok = [r.json() for r in answers if r.status_code == 200]
        assert len(ok) == 1 and _models_under(served) == 4 <= QUOTA_MODELS and _bytes_under(served) <= QUOTA
        assert _checkpoints_match_their_manifests(ok)
    assert ServeConfig().max_served_bytes >= ServeConfig().max_response_bytes   # the default holds a full answer


def test_dwf_sample_endpoint_writes_the_served_models_as_checkpoints(service, client, tmp_path):
    """`dwf sample --endpoint URL --out DIR`: the served models as checkpoints with a manifest."""
    import pandas as pd
    from dwf_ray.weights import load_model_state
    from tests.conftest import dwf
    (tmp_path / "token").write_text(TOKEN)
    out = dwf("sample", "--endpoint", service[1], "--out", str(tmp_path / "out"), "--n", "3", "--seed", "4",
              "--token-file", str(tmp_path / "token"))
    assert "wrote 3 models" in out
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert list(manifest["model_id"]) == ["g00000", "g00001", "g00002"] and (manifest["seed"] == 4).all()
    direct = client.sample(3, seed=4)
    for uri, expected in zip(manifest["uri"], direct):
        state, arch = load_model_state(uri)
        assert arch.family == "mlp" and all(np.array_equal(state[k], expected[k]) for k in expected)


def test_info_reports_the_run_and_the_limits(http, service):
    info = http.get("/v1/info").json()
    metrics = json.loads((service[0] / "report" / "metrics.json").read_text())
    assert info["arch"]["family"] == "mlp" and info["n_params"] == 3466 and info["latent_dim"] == info["pca_k"]
    assert info["accuracy"]["zoo"]["mean"] == pytest.approx(metrics["accuracy"]["zoo"]["mean"])
    assert info["accuracy"]["generated"]["mean"] == pytest.approx(metrics["accuracy"]["generated"]["mean"])
    assert info["conditional"] is False and info["classes"] is None and info["auth"] is True
    limits = info["limits"]
    assert limits["max_batch_size"] == 16 and limits["n"][0] == 1
    assert 256 * 2**20 * 0.95 < limits["n"][1] * 3466 * 4 <= 256 * 2**20   # what fits in 256 MiB
    assert http.get("/healthz").json() == {"status": "ok"}
    assert set(http.get("/openapi.json").json()["paths"]) >= {"/v1/sample", "/v1/info", "/healthz"}


@pytest.mark.parametrize("body,status,field,words", [
    ({"n": 0}, 422, "n", "greater than or equal to 1"),
    ({"n": 10**9}, 422, "n", "limit"),
    ({"n": "three"}, 422, "n", "integer"),
    ({}, 422, "n", "required"),
    ({"n": 1, "solver": "leapfrog"}, 422, "solver", "unknown solver"),
    ({"n": 1, "steps": 0}, 422, "steps", "greater than or equal to 1"),
    ({"n": 1, "steps": 10**6}, 422, "steps", "limit"),
    ({"n": 1, "label": 0}, 422, "label", "unconditional"),
    ({"n": 1, "guidance": 2.0}, 422, "guidance", "conditional"),
    ({"n": 1, "temperature": -1}, 422, "temperature", "greater than 0"),
    ({"n": 1, "seed": -5}, 422, "seed", "greater than or equal to 0"),
    ({"n": 1, "format": "zip"}, 422, "format", "'safetensors' or 'uri'"),
    ({"n": 1, "colour": "red"}, 422, "colour", "unknown field"),
    ([1, 2], 400, "body", "JSON object"),
    (b'{"n": 1,', 400, "body", "not valid JSON"),
])
def test_bad_requests_get_their_code_and_a_message_naming_the_field(http, body, status, field, words):
    if isinstance(body, bytes):
        r = http.post("/v1/sample", content=body, headers={"content-type": "application/json"})
    else:
        r = http.post("/v1/sample", json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["status"] == status and err["field"] == field and words in err["error"], err


def test_the_service_keeps_serving_after_bad_requests(http):
    for body in ({"n": -1}, {"n": 1, "solver": "?"}):
        assert http.post("/v1/sample", json=body).status_code == 422
    assert http.post("/v1/sample", json={"n": 1, "seed": 0}).status_code == 200


def test_token_required_everywhere_but_healthz(service):
    url = service[1]
    for path in ("/v1/info", "/openapi.json", "/docs", "/no/such/path"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["field"] == "authorization" and r.headers["WWW-Authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/sample", json={"n": 1}).status_code == 401
    assert httpx.get(url + "/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200
    assert httpx.get(url + "/tiny/v1/info").status_code == 200   # the app without a token is open


def test_overload_gets_503_with_retry_after_then_serves_again(service):
    url = service[1] + "/tiny"
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/sample", json={"n": 1, "seed": 0}).status_code == 200
        with ThreadPoolExecutor(8) as pool:
            slow = pool.submit(http.post, "/v1/sample", json=SLOW | {"seed": 1})
            time.sleep(0.5)   # the slow request now holds the replica's one slot
            burst = list(pool.map(lambda i: http.post("/v1/sample", json={"n": 1, "seed": i}), range(6)))
            assert slow.result().status_code == 200
        codes = [r.status_code for r in burst]
        assert codes.count(503) >= 4 and set(codes) <= {200, 503}, codes
        rejected = next(r for r in burst if r.status_code == 503)
        assert rejected.headers["Retry-After"] == "1" and "backpressure" in rejected.text
        assert http.post("/v1/sample", json={"n": 1, "seed": 0}).status_code == 200


def test_client_errors_are_raised_at_once_and_overload_is_retried(service):
    from dwf_ray.serve.client import SampleClient, SampleError
    with SampleClient(service[1], token=TOKEN) as c:
        with pytest.raises(SampleError) as err:
            c.sample(1, solver="leapfrog")
        assert err.value.status == 422 and err.value.field == "solver" and c.attempts == 1
    with SampleClient(service[1] + "/tiny", retries=8, backoff_s=0.2, read_timeout_s=60) as c, \
            ThreadPoolExecutor(4) as pool:
        states = list(pool.map(lambda i: c.sample(1, seed=i), range(4)))   # some of these are 503'd, then retried
        assert [len(s) for s in states] == [1, 1, 1, 1]
    with SampleClient(f"http://127.0.0.1:{_free_port()}", retries=2, backoff_s=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(SampleError, match="3 attempts"):
            c.info()
        assert time.monotonic() - t0 < 10


def test_killed_replica_is_replaced_and_client_retries_succeed(service, client):
    """Last: kills the main app's replica. A slow request in flight gets a 500 and is retried; the rest wait
    for the replacement; none hangs."""
    import ray
    from ray import serve
    from dwf_ray.serve.client import SampleClient

    def replicas() -> set[str]:
        return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::main#")}

    before, reference = replicas(), client.sample(2, seed=77)
    assert len(before) == 1
    results, stop = [], threading.Event()

    def stream(k: int):
        with SampleClient(service[1], token=TOKEN, retries=8, backoff_s=0.2, read_timeout_s=60) as c:
            i = 0
            while not stop.is_set() or i < 2:
                t0 = time.monotonic()
                states = c.sample(**(SLOW if k == 0 and i == 0 else {"n": 2}), seed=1000 * k + i)
                results.append((k, time.monotonic() - t0, len(states), c.attempts))
                i += 1

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(stream, k) for k in range(3)]
        time.sleep(1.0)   # the slow request is being solved now
        ray.kill(ray.get_actor(before.pop(), namespace="serve"), no_restart=True)
        t_kill, deadline = time.monotonic(), time.monotonic() + 90
        while time.monotonic() < deadline:
            status = serve.status().applications["main"].deployments["SampleService"]
            if replicas() - before and not (replicas() & before) and status.replica_states.get("RUNNING") == 1:
                break
            time.sleep(0.5)
        recovery = time.monotonic() - t_kill
        time.sleep(1.0)
        stop.set()
        for f in futures:
            f.result(timeout=120)   # every request came back (none hangs); an exception here fails the test
    assert recovery < 90, "the replica was not replaced"
    assert len(replicas()) == 1
    slow = [r for r in results if r[0] == 0][0]
    assert slow[2] == SLOW["n"] and slow[3] >= 2, "the request in flight was not retried"
    assert all(r[1] < 90 for r in results)
    after = client.sample(2, seed=77)   # the replacement gives the same models
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(after, reference) for k in a)


def test_shipped_serve_config_validates():
    import yaml
    path = Path(__file__).resolve().parents[1] / "deploy" / "serve_config.yaml"
    if not path.exists():
        pytest.skip(f"{path} does not exist yet (another change ships it)")
    cfg = yaml.safe_load(path.read_text())
    apps = [a for a in cfg["applications"] if a.get("import_path") == "dwf_ray.serve.app:build_app"]
    assert apps, "no application with import_path dwf_ray.serve.app:build_app"
    from ray.serve.schema import ServeDeploySchema
    ServeDeploySchema.model_validate(cfg)   # the file as `serve deploy` reads it
    for a in apps:
        AppArgs.model_validate(a.get("args", {})).serve_config()


def test_build_app_takes_a_serve_config_files_args(service, monkeypatch):
    from ray.serve import Application
    from dwf_ray.serve.app import build_app
    monkeypatch.setenv("DWF_SERVE_TOKEN", "from-env")
    app = build_app({"root": str(service[0]), "max_batch_size": 8, "num_cpus": 0.25})
    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="max_batchsize"):
        build_app({"root": str(service[0]), "max_batchsize": 8})


def test_config_and_launch_checks():
    from dwf_ray.serve.app import build_app
    from dwf_ray.serve.launch import serve_main
    with pytest.raises(ValueError, match="at least max_batch_size"):
        ServeConfig(max_batch_size=64, max_ongoing_requests=8)
    with pytest.raises(ValueError, match="unknown key"):
        ServeConfig().with_overrides(["max_batchsize=4"])
    with pytest.raises(ValueError, match="unknown keys"):
        ServeConfig(autoscaling_config={"min_replicas": 1, "max_replica": 2})
    assert ServeConfig().with_overrides(["max_batch_size=4", "num_cpus=0.25"]).max_batch_size == 4
    with pytest.raises(ValueError, match="(?i)extra"):
        AppArgs.model_validate({"root": "x", "replicas": 2})
    with pytest.raises(ValueError, match="without a token"):
        serve_main("/nowhere", host="0.0.0.0", port=1, block=False)
    with pytest.raises(FileNotFoundError, match="flow/model.pt"):
        build_app({"root": "/nowhere"})


def test_token_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    from dwf_ray.serve.auth import TOKEN_ENV, read_token
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "t").write_text("from-file\n")
    assert read_token(str(tmp_path / "t")) == "from-file"
    monkeypatch.delenv(TOKEN_ENV)
    assert read_token(None) is None

"""The floor of Ray Serve itself: CPU seconds per request that the proxy and the replica spend on applications
that do no sampling, under the load of ``bench/serve_load.py``, set against the offline sampler's CPU seconds per
model of a run measured in the same run. The applications add one thing the sampling service does at a time:
a plain HTTP handler answering at once; one that waits 2 ms first (as a request waiting for its batch does:
Serve's replica then starts watching the proxy for the client's disconnect, by actor calls); one that reads the
request body (fetched from the proxy by an actor call); a FastAPI ingress parsing the sampling request's body;
the same answering as many bytes as the service's answer of one model; and gRPC through Serve's gRPC proxy.

    python bench/serve_floor.py --root runs/digits-mlp --clients 32 --seconds 20 --solver midpoint --steps 20

No service of that sampler can spend less per request than the floor of what it must do (wait for a batch, read
a body); at n models per request the floor per model is the floor per request over n. Each application runs
alone, with the sampling apps' replica settings. Writes bench/results/serve_floor.json.
"""
# No `from __future__ import annotations`: FastAPI must see the route's body type as a class, not a name.
import argparse
import asyncio
import json
import time
from pathlib import Path

from serve_load import cpu_during, free_port, http_load, log, offline_cpu_per_model, service_pids

RESULTS = Path(__file__).parent / "results" / "serve_floor.json"
GRPC_SERVICER = "ray.serve.generated.serve_pb2_grpc.add_UserDefinedServiceServicer_to_server"


def deployments(replica_cpus: float, max_ongoing: int, answer_bytes: int) -> dict:
    """Applications that do no sampling, by name, each with the sampling apps' replica settings: a plain HTTP
    handler answering ``{}`` at once, after waiting 2 ms (as a request waits for its batch), or after reading the
    request body; a FastAPI ingress that parses the sampling request body (``SampleRequest``) and
    answers ``{}``, then the same answering ``answer_bytes`` (the size of one model's answer); and gRPC."""
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.generated.serve_pb2 import UserDefinedResponse
    from starlette.responses import Response
    from dwf_ray.serve.wire import SampleRequest
    options = dict(ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=max_ongoing)

    @serve.deployment(**options)
    class NoOpHTTP:
        def __init__(self, wait: bool, read_body: bool):
            self.wait, self.read_body = wait, read_body

        async def __call__(self, request) -> Response:
            if self.wait:       # as a request waiting for its batch does
                await asyncio.sleep(0.002)
            if self.read_body:
                await request.body()
            return Response(b"{}", media_type="application/json")

    api = FastAPI()

    @serve.deployment(**options)
    @serve.ingress(api)
    class NoOpFastAPI:
        def __init__(self, size: int):
            self.body = bytes(size)

        @api.post("/v1/sample")
        async def sample(self, req: SampleRequest):
            if not self.body:
                return {}
            return Response(self.body, media_type="application/octet-stream")

    @serve.deployment(**options)
    class NoOpGRPC:
        async def __call__(self, request):
            return UserDefinedResponse(greeting="", num_x2=2 * request.num)
    return {"noop-http": NoOpHTTP.bind(False, False), "noop-http-wait": NoOpHTTP.bind(True, False),
            "noop-http-body": NoOpHTTP.bind(False, True), "noop-fastapi": NoOpFastAPI.bind(0),
            "noop-fastapi-answer": NoOpFastAPI.bind(answer_bytes), "noop-grpc": NoOpGRPC.bind()}


def answer_bytes(root: str) -> int:
    """About the bytes of the sampling service's answer of one model of ``root``: safetensors header and weights."""
    from dwf_ray.sample.generator import Generator
    from dwf_ray.serve.wire import encode_header
    from dwf_ray.weights import WeightLayout
    arch = Generator.load(root).decoders[0].arch
    layout = WeightLayout.from_arch(arch)
    header = encode_header([(e.name, e.shape, e.offset) for e in layout.entries], 1, layout.size,
                           {"arch": arch.to_json(), "n": "1", "seed": "0", "solver": "midpoint", "steps": "20"})
    return len(header) + 4 * layout.size


def http_requests(url: str, clients: int, seconds: float) -> int:
    """Requests answered in ``seconds`` by ``clients`` back-to-back clients of ``url`` (serve_load's load, n = 1);
    any failed request is an error."""
    res = asyncio.run(http_load(url, clients, 1, 1 << 62, seconds, {}))
    if res["errors"]:
        raise RuntimeError(f"{url}: {res['errors']} of {res['requests']} requests failed: {res['codes']}")
    return res["ok"]


async def grpc_load(target: str, app: str, clients: int, seconds: float) -> int:
    import grpc
    from ray.serve.generated.serve_pb2 import UserDefinedMessage
    from ray.serve.generated.serve_pb2_grpc import UserDefinedServiceStub
    done, deadline = 0, time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = UserDefinedServiceStub(channel)

        async def worker():
            nonlocal done
            while time.perf_counter() < deadline:
                await stub.__call__(UserDefinedMessage(name="", foo="", num=1), metadata=(("application", app),))
                done += 1
        await asyncio.gather(*(worker() for _ in range(clients)))
    return done


def measured(app: str, count_requests) -> dict:
    """Requests/s and proxy, replica CPU ms per request of one load run against ``app`` (``count_requests()``
    runs it and returns the requests answered)."""
    t0 = time.perf_counter()
    requests, cpu = cpu_during(service_pids(app), count_requests)
    wall = time.perf_counter() - t0
    per_request = {role: 1000 * seconds / max(1, requests) for role, seconds in cpu.items()}
    return {"app": app, "requests": requests, "requests_per_s": requests / wall,
            "proxy_cpu_ms": per_request["proxy"], "replica_cpu_ms": per_request["replica"],
            "service_cpu_ms": per_request["proxy"] + per_request["replica"],
            "load_generator_cpu_ms": per_request["load_generator"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="finished run root whose offline sampler is the reference")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--solver", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--max-ongoing", type=int, default=64)
    args = ap.parse_args()
    from ray import serve
    from ray.serve.config import gRPCOptions
    from dwf_ray.runtime import ensure_ray
    ensure_ray(quiet=True)
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
    apps = deployments(args.replica_cpus, args.max_ongoing, answer_bytes(args.root))
    base, grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    offline = offline_cpu_per_model(args.root, 100, 1, args.solver, args.steps)
    ms = 1000 * offline["cpu_s_per_model"]
    log(f"offline sampler: {ms:.3f} ms CPU per model ({offline['solver']}-{offline['steps']}, 100 per call)")
    rows = []
    for name, app in apps.items():   # one at a time: each replica gets what the sampling apps' replicas get
        serve.run(app, name=name, route_prefix=f"/{name}")
        if name == "noop-grpc":
            asyncio.run(grpc_load(grpc_target, name, 4, 2))                              # warm-up
            rows.append(measured(name, lambda: asyncio.run(grpc_load(grpc_target, name, args.clients, args.seconds))))
        else:   # serve_load's requests go to <url>/v1/sample: the FastAPI apps' route; the plain handlers take any path
            http_requests(f"{base}/{name}", 4, 2)
            rows.append(measured(name, lambda: http_requests(f"{base}/{name}", args.clients, args.seconds)))
        serve.delete(name)
    print(f"\n| application that does not sample ({args.clients} clients) | requests/s | proxy CPU ms/request | replica CPU "
          "ms/request | service CPU ms/request | floor / offline per model at n = 1 | at n = 16 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        r["floor_over_offline_n1"] = r["service_cpu_ms"] / ms
        r["floor_over_offline_n16"] = r["service_cpu_ms"] / 16 / ms
        print(f"| {r['app']} | {r['requests_per_s']:.0f} | {r['proxy_cpu_ms']:.2f} | {r['replica_cpu_ms']:.2f} | "
              f"{r['service_cpu_ms']:.2f} | {r['floor_over_offline_n1']:.2f}x | {r['floor_over_offline_n16']:.2f}x |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"root": args.root, "clients": args.clients, "offline": offline, "rows": rows},
                                  indent=2))


if __name__ == "__main__":
    main()

"""The floor of Ray Serve itself: CPU seconds per request that the proxy and the replica spend on an application
that does nothing (HTTP, and gRPC through Serve's gRPC proxy), under the load of ``bench/serve_load.py``, set
against the offline sampler's CPU seconds per model of a run measured in the same run.

    python bench/serve_floor.py --root runs/digits-mlp --clients 32 --seconds 20 --solver midpoint --steps 20

No service of that sampler can spend less than this floor per request; at n models per request the floor per
model is the floor per request over n. The issue's CPU targets (service within 4x the offline sampler at n = 1,
2x at n = 16) are reachable through an ingress only if its floor is below them.
Writes bench/results/serve_floor.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from serve_load import cpu_seconds, free_port, log, offline_cpu_per_model, service_pids

RESULTS = Path(__file__).parent / "results" / "serve_floor.json"
GRPC_SERVICER = "ray.serve.generated.serve_pb2_grpc.add_UserDefinedServiceServicer_to_server"


def deployments(replica_cpus: float, max_ongoing: int):
    """(HTTP no-op, gRPC no-op) deployments with the sampling apps' replica settings."""
    from ray import serve
    from ray.serve.generated.serve_pb2 import UserDefinedResponse
    from starlette.responses import Response

    @serve.deployment(ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=max_ongoing)
    class NoOpHTTP:
        async def __call__(self, request) -> Response:
            return Response(b"{}", media_type="application/json")

    @serve.deployment(ray_actor_options={"num_cpus": replica_cpus}, max_ongoing_requests=max_ongoing)
    class NoOpGRPC:
        async def __call__(self, request):
            return UserDefinedResponse(greeting="", num_x2=2 * request.num)
    return NoOpHTTP.bind(), NoOpGRPC.bind()


async def http_load(url: str, clients: int, seconds: float) -> int:
    import httpx
    done, deadline = 0, time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as http:
        async def worker():
            nonlocal done
            while time.perf_counter() < deadline:
                (await http.post(url, json={"n": 1})).raise_for_status()
                done += 1
        await asyncio.gather(*(worker() for _ in range(clients)))
    return done


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


def measured(app: str, load) -> dict:
    """Requests/s and proxy, replica CPU ms per request of one load run against ``app``."""
    pids = service_pids(app)
    before = {role: cpu_seconds(p) for role, p in pids.items()}
    t0 = time.perf_counter()
    requests = asyncio.run(load())
    wall = time.perf_counter() - t0
    cpu = {role: (cpu_seconds(p) - before[role]) / max(1, requests) for role, p in pids.items()}
    return {"app": app, "requests": requests, "requests_per_s": requests / wall,
            "proxy_cpu_ms": 1000 * cpu["proxy"], "replica_cpu_ms": 1000 * cpu["replica"],
            "service_cpu_ms": 1000 * (cpu["proxy"] + cpu["replica"])}


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
    ensure_ray()
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[GRPC_SERVICER]))
    http_app, grpc_app = deployments(args.replica_cpus, args.max_ongoing)
    serve.run_many([serve.RunTarget(http_app, name="noop-http", route_prefix="/noop-http"),
                    serve.RunTarget(grpc_app, name="noop-grpc", route_prefix="/noop-grpc")])
    http_url, grpc_target = f"http://127.0.0.1:{http_port}/noop-http", f"127.0.0.1:{grpc_port}"
    asyncio.run(http_load(http_url, 4, 2))                         # warm-up
    asyncio.run(grpc_load(grpc_target, "noop-grpc", 4, 2))
    offline = offline_cpu_per_model(args.root, 100, 1, args.solver, args.steps)
    ms = 1000 * offline["cpu_s_per_model"]
    log(f"offline sampler: {ms:.3f} ms CPU per model ({offline['solver']}-{offline['steps']}, 100 per call)")
    rows = [measured("noop-http", lambda: http_load(http_url, args.clients, args.seconds)),
            measured("noop-grpc", lambda: grpc_load(grpc_target, "noop-grpc", args.clients, args.seconds))]
    print(f"\n| ingress (no-op app, {args.clients} clients) | requests/s | proxy CPU ms/request | replica CPU "
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

"""``dwf serve``: start the sampling application on a local or joined Ray cluster and keep it up until Ctrl-C."""
import ipaddress
import os
import signal
import socket
import threading
from typing import Callable, Optional

import ray
from ray import serve

from dwf_ray.serve.app import APP_NAME, make_app
from dwf_ray.serve.auth import TOKEN_ENV, read_token
from dwf_ray.serve.config import ServeConfig


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

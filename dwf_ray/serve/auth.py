"""Bearer-token access to the service: only the token's sha256 reaches the replicas."""
import hashlib
import hmac
import os
from typing import Optional

from dwf_ray import store
from dwf_ray.serve.errors import ApiError, error_response
from dwf_ray.serve.wire import TOKEN_ENV

OPEN_PATHS = ("/healthz",)          # reachable without the token (load balancers, probes)


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
        if self.digest is None or scope["type"] != "http" or route_path(scope) in OPEN_PATHS:
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token_digest(given.strip()) or "", self.digest):
            return await self.app(scope, receive, send)
        message = "missing bearer token" if not auth else "invalid bearer token"
        await error_response(ApiError(401, f"{message}: send 'Authorization: Bearer <token>'", "authorization",
                                       {"WWW-Authenticate": "Bearer"}))(scope, receive, send)


def route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path

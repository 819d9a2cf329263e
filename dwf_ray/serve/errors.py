"""How the service refuses a request: one ApiError type and its JSON answer (status, field, message, code)."""
from typing import Optional

from dwf_ray.config import SOLVERS
from dwf_ray.serve.quota import QuotaExceeded


class ApiError(Exception):
    """A request the service refuses: HTTP status, the field at fault (or None), a message, and for refusals a
    client acts on by kind a ``code`` with the numbers behind it (``details``)."""

    def __init__(self, status: int, message: str, field: Optional[str] = None, headers: Optional[dict] = None,
                 code: Optional[str] = None, details: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers
        self.code, self.details = code, details or {}


def error_response(err: ApiError):
    from fastapi.responses import JSONResponse
    return JSONResponse({"status": err.status, "field": err.field, "error": err.message, "code": err.code}
                        | err.details, status_code=err.status, headers=err.headers)


def validation_error(exc) -> ApiError:
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


def quota_error(exc: QuotaExceeded) -> ApiError:
    """507 Insufficient Storage, code quota_exceeded, with the bytes and models used, needed and allowed."""
    used, need, quota = exc.used, exc.need, exc.quota
    details = {"used_bytes": used.nbytes, "request_bytes": need.nbytes, "quota_bytes": quota.nbytes,
               "used_models": used.models, "request_models": need.models, "quota_models": quota.models}
    return ApiError(507, str(exc), "format", code="quota_exceeded", details=details)

"""The error tree. Every error the farm returns is one of these, with a stable code.

    FarmError                      (500 internal_error)
    ├── ClientError                (400)
    │   ├── MalformedBody          (400 malformed_body)    body is not valid JSON/msgpack
    │   ├── InvalidRequest         (400 invalid_request)   valid body, bad shape or value
    │   ├── PayloadTooLarge        (413 payload_too_large)
    │   ├── UnsupportedMediaType   (415 unsupported_media_type)
    │   ├── Unauthorized           (401 unauthorized)      admin call without the token
    │   ├── Forbidden              (403 forbidden)         admin endpoints are disabled
    │   ├── NotFound               (404 not_found)
    │   └── MethodNotAllowed       (405 method_not_allowed)
    └── ServerError                (5xx)
        ├── ModelError             (500 model_error)       ORT raised or scores not finite
        │   └── StageTimeout       (503 deadline_exceeded) a run stopped at the deadline
        ├── NotReady               (503 not_ready)         models not loaded yet / draining
        ├── Overloaded             (503 overloaded)        shed: no room to answer in time
        ├── DeadlineExceeded       (503 deadline_exceeded) no stage or fallback fits the budget
        ├── ModelUnavailable       (503 model_unavailable) the model's breaker is open
        └── ModelLoadError         (boot)                   a model cannot load: the worker stops

Every 503 carries ``Retry-After`` (``retry_after_s``).

Outside the HTTP tree, ``CommandError``: a command-line job (``ctr-farm score``, ...)
cannot run as asked; ``ctr-farm`` prints its message and exits 1, never a traceback.

Foreign errors (msgspec, ONNX Runtime) are translated at the boundary with
``raise ... from exc``; the message never carries a traceback or a file path.
"""

from __future__ import annotations

from typing import ClassVar


class FarmError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ClientError(FarmError):
    status = 400
    code = "bad_request"


class MalformedBody(ClientError):
    code = "malformed_body"


class InvalidRequest(ClientError):
    code = "invalid_request"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class ServerError(FarmError):
    status = 500
    code = "server_error"


class ModelError(ServerError):
    code = "model_error"


class StageTimeout(ModelError):
    """A model run was stopped by the request's deadline (internal: the cascade degrades)."""

    status = 503
    code = "deadline_exceeded"


class Unavailable(ServerError):
    """A 503: the client may retry after ``retry_after_s`` seconds."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, field: str | None = None, retry_after_s: int = 1) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s


class NotReady(Unavailable):
    code = "not_ready"


class Overloaded(Unavailable):
    code = "overloaded"


class DeadlineExceeded(Unavailable):
    code = "deadline_exceeded"


class ModelUnavailable(Unavailable):
    code = "model_unavailable"


class ModelLoadError(ServerError):
    """Raised at start-up only: the worker must not serve with a model missing."""

    code = "model_load_error"


class CommandError(Exception):
    """A ``ctr-farm`` command cannot run as asked (bad input, output or flags)."""

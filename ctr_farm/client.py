"""A typed Python client for ctr-farm: ``Client`` (blocking) and ``AsyncClient`` over httpx.

    with Client("http://127.0.0.1:8080") as farm:
        result = farm.rank(ids, top_k=10)          # ids: numpy int64 [n, fields]
        best = result.rankings[0].index

One connection pool per client (keep-alive), msgpack bodies by default
(``wire="json"`` for JSON), candidates as a numpy integer array ``[n, fields]`` (sent
as rows, or as columns with ``array_form="columns"``) or in any of the API's three
forms (a list of dicts keyed by field name, a list of rows, a dict of columns).
Results are msgspec Structs (:mod:`ctr_farm.results`, mirroring the server's).

Retries: a 503 or 429 answer, or a connection that could not be opened, is retried
after the server's ``Retry-After`` (else a short exponential backoff), at most
``max_retries`` times and never past ``retry_budget_s`` seconds from the first
attempt. Ranking has no side effects, so POSTs are retried too. Every attempt of one
call carries the same ``X-Request-ID``.

Errors are typed; an answer with the farm's error body carries its ``code``,
``message``, ``field`` and ``request_id``::

    CtrFarmError
    ├── TransportError            no HTTP answer (connection refused, reset, ...)
    │   └── RequestTimeout        the answer took longer than ``timeout``
    └── APIError                  the farm answered an error: status, code, message, field,
        │                         request_id, attempts
        ├── BadRequest            400  malformed_body, invalid_request
        ├── NotFound              404  not_found
        ├── MethodNotAllowed      405  method_not_allowed
        ├── PayloadTooLarge       413  payload_too_large
        ├── UnsupportedMediaType  415  unsupported_media_type
        ├── TooManyRequests       429  (retried)                         retry_after
        ├── ServerError           500  model_error, internal_error
        └── Unavailable           503  not_ready, overloaded, ...  (retried)  retry_after

httpx errors are translated at the boundary (``raise ... from exc``); anything else
is re-raised as it is.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

import httpx
import msgspec
import numpy as np

from ctr_farm.results import (
    ErrorBody,
    HealthResponse,
    ModelsResponse,
    PredictResponse,
    RankResponse,
    ReadyResponse,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "BadRequest",
    "Client",
    "CtrFarmError",
    "HealthResponse",
    "MethodNotAllowed",
    "ModelsResponse",
    "NotFound",
    "PayloadTooLarge",
    "PredictResponse",
    "RankResponse",
    "ReadyResponse",
    "RequestTimeout",
    "ServerError",
    "TooManyRequests",
    "TransportError",
    "Unavailable",
    "UnsupportedMediaType",
]

JSON = "application/json"
MSGPACK = "application/msgpack"
Wire = Literal["msgpack", "json"]
ArrayForm = Literal["rows", "columns"]
T = TypeVar("T")
DEFAULT_TIMEOUT = 10.0


# -- errors ------------------------------------------------------------------------------
class CtrFarmError(Exception):
    """Base of every error this client raises."""


class TransportError(CtrFarmError):
    """No HTTP answer: the connection failed or was cut."""


class RequestTimeout(TransportError):
    """No answer within the request's timeout."""


class APIError(CtrFarmError):
    """The farm answered with an error status (and, normally, its error body)."""

    status_code: ClassVar[int | None] = None

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.request_id = request_id
        self.retry_after = retry_after
        self.attempts = attempts


class BadRequest(APIError):
    status_code = 400


class NotFound(APIError):
    status_code = 404


class MethodNotAllowed(APIError):
    status_code = 405


class PayloadTooLarge(APIError):
    status_code = 413


class UnsupportedMediaType(APIError):
    status_code = 415


class TooManyRequests(APIError):
    status_code = 429


class ServerError(APIError):
    status_code = 500


class Unavailable(APIError):
    status_code = 503


_BY_STATUS: dict[int, type[APIError]] = {
    cls.status_code: cls
    for cls in (
        BadRequest,
        NotFound,
        MethodNotAllowed,
        PayloadTooLarge,
        UnsupportedMediaType,
        TooManyRequests,
        ServerError,
        Unavailable,
    )
    if cls.status_code is not None
}
RETRY_STATUSES = frozenset({429, 503})
#: /ready answers 503 with its own body (not an error body) while not ready.
_READY_STATUSES = frozenset({503})


def _error_class(status: int) -> type[APIError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return ServerError
    return BadRequest if status == 400 else APIError


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# -- the shared core ---------------------------------------------------------------------
def _enc_hook(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


class _Core:
    """Everything but the I/O: request bodies, response decoding, error mapping, delays."""

    def __init__(
        self,
        wire: Wire,
        array_form: ArrayForm,
        fields: Sequence[str] | None,
        max_retries: int,
        retry_budget_s: float,
        max_retry_delay_s: float,
    ) -> None:
        if wire not in ("msgpack", "json"):
            raise ValueError(f"wire must be 'msgpack' or 'json', not {wire!r}")
        if array_form not in ("rows", "columns"):
            raise ValueError(f"array_form must be 'rows' or 'columns', not {array_form!r}")
        if max_retries < 0 or retry_budget_s < 0:
            raise ValueError("max_retries and retry_budget_s must be >= 0")
        self.wire = wire
        self.array_form = array_form
        self.fields = tuple(fields) if fields is not None else None
        self.max_retries = max_retries
        self.retry_budget_s = retry_budget_s
        self.max_retry_delay_s = max_retry_delay_s
        self.content_type = MSGPACK if wire == "msgpack" else JSON
        self._encode = (
            msgspec.msgpack.Encoder(enc_hook=_enc_hook).encode
            if wire == "msgpack"
            else msgspec.json.Encoder(enc_hook=_enc_hook).encode
        )
        self._decoders: dict[tuple[str, type], Any] = {}
        self._error_decoder = msgspec.json.Decoder(ErrorBody)

    # -- requests ------------------------------------------------------------------------
    def candidates(self, value: Any, fields: Sequence[str] | None) -> Any:
        """The wire value of ``candidates``: arrays become rows or columns."""
        if not isinstance(value, np.ndarray):
            return value  # objects, rows or columns as given: the server validates them
        if value.ndim != 2 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(
                f"candidates must be a 2-D integer array [n, fields], got {value.dtype}"
                f" with shape {value.shape}"
            )
        ids = value.astype(np.int64, copy=False)
        if self.array_form == "rows":
            return ids.tolist()
        if fields is None or len(fields) != ids.shape[1]:
            raise ValueError(f"columns need {ids.shape[1]} field names, got {fields!r}")
        return dict(zip(fields, ids.T.tolist(), strict=True))

    def body(self, payload: Mapping[str, Any]) -> bytes:
        return self._encode({k: v for k, v in payload.items() if v is not None})

    def headers(self, request_id: str | None, has_body: bool) -> dict[str, str]:
        headers = {"Accept": self.content_type, "X-Request-ID": request_id or secrets.token_hex(8)}
        if has_body:
            headers["Content-Type"] = self.content_type
        return headers

    # -- responses -----------------------------------------------------------------------
    def decode(self, resp: httpx.Response, typ: type[T], attempts: int, ok: bool = False) -> T:
        if resp.status_code >= 400 and not ok:
            raise self.error(resp, attempts)
        ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        kind = "msgpack" if "msgpack" in ctype else "json"
        decoder = self._decoders.get((kind, typ))
        if decoder is None:
            module = msgspec.msgpack if kind == "msgpack" else msgspec.json
            decoder = self._decoders[kind, typ] = module.Decoder(typ)
        try:
            return decoder.decode(resp.content)
        except msgspec.MsgspecError as exc:
            raise APIError(
                resp.status_code,
                "bad_response",
                f"cannot decode the answer as {typ.__name__}: {exc}",
                request_id=resp.headers.get("x-request-id"),
                attempts=attempts,
            ) from exc

    def error(self, resp: httpx.Response, attempts: int) -> APIError:
        """The typed exception for an error answer (the body's code, or ``http_<status>``)."""
        rid = resp.headers.get("x-request-id")
        retry_after = retry_after_s(resp.headers.get("retry-after"))
        cls = _error_class(resp.status_code)
        try:
            body = self._error_decoder.decode(resp.content)
        except msgspec.MsgspecError:
            text = resp.text[:200] if resp.content else resp.reason_phrase
            return cls(
                resp.status_code,
                f"http_{resp.status_code}",
                text,
                request_id=rid,
                retry_after=retry_after,
                attempts=attempts,
            )
        e = body.error
        return cls(
            resp.status_code,
            e.code,
            e.message,
            e.field,
            body.request_id or rid,
            retry_after=retry_after,
            attempts=attempts,
        )

    def delay(self, retry_after: float | None, attempt: int, started: float) -> float | None:
        """Seconds to wait before attempt ``attempt + 1``, or None when out of retries
        or when waiting would pass the retry budget."""
        if attempt > self.max_retries:
            return None
        if retry_after is None:
            retry_after = min(0.05 * 2 ** (attempt - 1), 1.0) * (0.5 + random.random())
        wait = min(retry_after, self.max_retry_delay_s)
        if time.monotonic() + wait - started > self.retry_budget_s:
            return None
        return wait


def _translate(exc: httpx.HTTPError) -> CtrFarmError:
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(f"no answer in time: {exc!r}")
    return TransportError(f"{type(exc).__name__}: {exc}")


def _retryable_transport(exc: httpx.HTTPError) -> bool:
    # The request never reached a server: safe to send again.
    return isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))


def _timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(DEFAULT_TIMEOUT if timeout is None else timeout)


class _Options:
    """Constructor arguments shared by both clients."""

    def __init__(
        self,
        base_url: str,
        *,
        wire: Wire = "msgpack",
        array_form: ArrayForm = "rows",
        fields: Sequence[str] | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        retry_budget_s: float = 10.0,
        max_retry_delay_s: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.core = _Core(wire, array_form, fields, max_retries, retry_budget_s, max_retry_delay_s)
        self.base_url = base_url.rstrip("/")
        self.timeout = _timeout(timeout)
        self.headers = dict(headers or {})


def _rank_payload(
    core: _Core,
    candidates: Any,
    fields: Sequence[str] | None,
    top_k: int | None,
    stage1_k: int | None,
    multi_stage: bool,
) -> dict[str, Any]:
    return {
        "candidates": core.candidates(candidates, fields),
        "top_k": top_k,
        "stage1_k": stage1_k,
        "multi_stage": None if multi_stage else False,
    }


def _predict_payload(
    core: _Core, candidates: Any, candidate: Any, fields: Sequence[str] | None, model: str | None
) -> dict[str, Any]:
    if (candidates is None) == (candidate is None):
        raise ValueError("pass exactly one of candidates or candidate")
    return {
        "candidates": None if candidates is None else core.candidates(candidates, fields),
        "candidate": candidate,
        "model": model,
    }


# -- the blocking client -----------------------------------------------------------------
class Client:
    """A blocking client; one keep-alive connection pool. Use as a context manager.

    ``wire``: ``"msgpack"`` (default) or ``"json"``. ``array_form``: how numpy input is
    sent, ``"rows"`` (default) or ``"columns"`` (field names from ``fields``, else
    fetched once from ``GET /models``). ``timeout``: seconds per attempt (or an
    ``httpx.Timeout``). Retries: ``max_retries`` (3), ``retry_budget_s`` (10 s),
    ``max_retry_delay_s`` (5 s, caps a server's ``Retry-After``). ``transport``: an
    httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        transport: httpx.BaseTransport | None = None,
        **options: Any,
    ) -> None:
        self._opts = _Options(base_url, **options)
        self._core = self._opts.core
        self._http = httpx.Client(
            base_url=self._opts.base_url,
            timeout=self._opts.timeout,
            headers=self._opts.headers,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- endpoints -----------------------------------------------------------------------
    def rank(
        self,
        candidates: Any,
        *,
        top_k: int | None = None,
        stage1_k: int | None = None,
        multi_stage: bool = True,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> RankResponse:
        """``POST /rank``: the best ``top_k`` candidates, best first."""
        payload = _rank_payload(
            self._core, candidates, self._fields(candidates), top_k, stage1_k, multi_stage
        )
        return self._call("POST", "/rank", RankResponse, payload, timeout, request_id)

    def predict(
        self,
        candidates: Any = None,
        *,
        candidate: Mapping[str, int] | None = None,
        model: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> PredictResponse:
        """``POST /predict``: one CTR per candidate (or for the one ``candidate``)."""
        payload = _predict_payload(
            self._core, candidates, candidate, self._fields(candidates), model
        )
        return self._call("POST", "/predict", PredictResponse, payload, timeout, request_id)

    def health(self) -> HealthResponse:
        return self._call("GET", "/health", HealthResponse)

    def ready(self) -> ReadyResponse:
        """``GET /ready`` (answered, not retried, when not ready: see ``.ready``)."""
        return self._call("GET", "/ready", ReadyResponse, ok_statuses=_READY_STATUSES)

    def models(self) -> ModelsResponse:
        return self._call("GET", "/models", ModelsResponse)

    # -- plumbing ------------------------------------------------------------------------
    def _fields(self, candidates: Any) -> Sequence[str] | None:
        core = self._core
        if not isinstance(candidates, np.ndarray) or core.array_form != "columns":
            return None
        if core.fields is None:
            core.fields = tuple(self.models().models[0].fields)
        return core.fields

    def _call(
        self,
        method: str,
        path: str,
        typ: type[T],
        payload: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> T:
        core = self._core
        body = None if payload is None else core.body(payload)
        headers = core.headers(request_id, body is not None)
        kwargs: dict[str, Any] = {"timeout": _timeout(timeout)} if timeout else {}
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                resp = self._http.request(method, path, content=body, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                wait = core.delay(None, attempt, started) if _retryable_transport(exc) else None
                if wait is None:
                    raise _translate(exc) from exc
                time.sleep(wait)
                continue
            if resp.status_code in ok_statuses:
                return core.decode(resp, typ, attempt, ok=True)
            if resp.status_code in RETRY_STATUSES:
                error = core.error(resp, attempt)
                wait = core.delay(error.retry_after, attempt, started)
                if wait is None:
                    raise error
                time.sleep(wait)
                continue
            return core.decode(resp, typ, attempt)


# -- the asyncio client ------------------------------------------------------------------
class AsyncClient:
    """The asyncio twin of :class:`Client` (same arguments; ``await`` the endpoints)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **options: Any,
    ) -> None:
        self._opts = _Options(base_url, **options)
        self._core = self._opts.core
        self._http = httpx.AsyncClient(
            base_url=self._opts.base_url,
            timeout=self._opts.timeout,
            headers=self._opts.headers,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def rank(
        self,
        candidates: Any,
        *,
        top_k: int | None = None,
        stage1_k: int | None = None,
        multi_stage: bool = True,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> RankResponse:
        fields = await self._fields(candidates)
        payload = _rank_payload(self._core, candidates, fields, top_k, stage1_k, multi_stage)
        return await self._call("POST", "/rank", RankResponse, payload, timeout, request_id)

    async def predict(
        self,
        candidates: Any = None,
        *,
        candidate: Mapping[str, int] | None = None,
        model: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> PredictResponse:
        fields = await self._fields(candidates)
        payload = _predict_payload(self._core, candidates, candidate, fields, model)
        return await self._call("POST", "/predict", PredictResponse, payload, timeout, request_id)

    async def health(self) -> HealthResponse:
        return await self._call("GET", "/health", HealthResponse)

    async def ready(self) -> ReadyResponse:
        return await self._call("GET", "/ready", ReadyResponse, ok_statuses=_READY_STATUSES)

    async def models(self) -> ModelsResponse:
        return await self._call("GET", "/models", ModelsResponse)

    async def _fields(self, candidates: Any) -> Sequence[str] | None:
        core = self._core
        if not isinstance(candidates, np.ndarray) or core.array_form != "columns":
            return None
        if core.fields is None:
            core.fields = tuple((await self.models()).models[0].fields)
        return core.fields

    async def _call(
        self,
        method: str,
        path: str,
        typ: type[T],
        payload: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        ok_statuses: frozenset[int] = frozenset(),
    ) -> T:
        core = self._core
        body = None if payload is None else core.body(payload)
        headers = core.headers(request_id, body is not None)
        kwargs: dict[str, Any] = {"timeout": _timeout(timeout)} if timeout else {}
        started, attempt = time.monotonic(), 0
        while True:
            attempt += 1
            try:
                resp = await self._http.request(
                    method, path, content=body, headers=headers, **kwargs
                )
            except httpx.HTTPError as exc:
                wait = core.delay(None, attempt, started) if _retryable_transport(exc) else None
                if wait is None:
                    raise _translate(exc) from exc
                await asyncio.sleep(wait)
                continue
            if resp.status_code in ok_statuses:
                return core.decode(resp, typ, attempt, ok=True)
            if resp.status_code in RETRY_STATUSES:
                error = core.error(resp, attempt)
                wait = core.delay(error.retry_after, attempt, started)
                if wait is None:
                    raise error
                await asyncio.sleep(wait)
                continue
            return core.decode(resp, typ, attempt)

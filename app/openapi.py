"""The API contract: ``GET /openapi.json`` (OpenAPI 3.1) and ``GET /docs`` (Swagger UI).

The document is generated, never written by hand:

- request and response bodies are the JSON Schema of the msgspec Structs of
  :mod:`app.schema` (``msgspec.json.schema_components``);
- ``candidates`` is ``msgspec.Raw`` on the wire structs (its form is only known once
  the body is seen), so it is described by Structs built here from the model card's
  field list, the same way :class:`app.features.FeatureSpace` builds its decoders:
  ``oneOf`` objects / rows / columns;
- the paths are the routes the Falcon app really serves (``falcon.inspect``): a route
  without an entry in :data:`OPERATIONS` makes the build fail, so a new endpoint
  cannot be left out of the contract (``/admin/`` routes, which nginx never proxies,
  are not part of it);
- limits come from :class:`app.config.Config`, error codes from :mod:`app.errors`.

The card fields are known only once the farm has loaded its models (after fork), so
the document is built on its first request and cached.

``/docs`` is a static page over the Swagger UI assets shipped by the pinned
``swagger-ui-bundle-v2`` package (served from ``/docs/{asset}``; no CDN).
"""

from __future__ import annotations

import mimetypes
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import falcon
import falcon.asgi
import falcon.inspect
import msgspec
from swagger_ui_bundle import swagger_ui_path

from app import errors
from app.config import Config
from app.errors import NotFound, NotReady
from app.schema import (
    REQUEST_ID_MAX,
    CardField,
    ErrorBody,
    HealthResponse,
    HelloResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    RankRequest,
    RankResponse,
    ReadyResponse,
    StatsResponse,
)
from app.service import Farm
from app.status import ASSETS as STATUS_ASSETS

JSON = "application/json"
MSGPACK = "application/msgpack"
BODY_TYPES = (JSON, MSGPACK)
OPENAPI_VERSION = "3.1.0"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Id = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
_REF = "#/components/schemas/{name}"


# -- operations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    """What the document says about one (path, method) the app serves."""

    summary: str
    description: str = ""
    #: The request Struct (its ``msgspec.Raw`` fields are replaced by candidate schemas).
    request: type | None = None
    #: status -> (description, response Struct or a media-type map, or None for the error body)
    responses: dict[int, tuple[str, Any]] = field(default_factory=dict)
    #: Content types of the 200 answer (the POST endpoints answer in the ``Accept`` type).
    ok_types: tuple[str, ...] = (JSON,)
    parameters: tuple[dict[str, Any], ...] = ()


_ERROR = None  # marker: the response body is ErrorBody
_BODY_ERRORS: dict[int, tuple[str, Any]] = {
    400: ("`malformed_body` (not JSON/msgpack) or `invalid_request` (with `field`)", _ERROR),
    413: ("`payload_too_large`: the body exceeds `max_body_bytes`", _ERROR),
    415: ("`unsupported_media_type`: Content-Type is not JSON or msgpack", _ERROR),
    429: ("too many requests (admission control); retry after `Retry-After` seconds", _ERROR),
    500: ("`model_error` or `internal_error` (nothing internal in the body)", _ERROR),
    503: ("`not_ready` / `upstream_unavailable`; retry after `Retry-After` seconds", _ERROR),
}
#: The Swagger UI files /docs needs (the only ones /docs/{asset} serves).
DOCS_ASSETS = ("swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")


def asset_parameter(names: Sequence[str] | dict[str, str]) -> tuple[dict[str, Any], ...]:
    """The ``{asset}`` path parameter of a static route: one of ``names``."""
    schema = {"type": "string", "enum": list(names)}
    return ({"name": "asset", "in": "path", "required": True, "schema": schema},)


#: Every (path, method) the app may serve. Building the document fails on a served route
#: missing here; an entry whose route is not served is left out of the document.
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/rank", "POST"): Operation(
        summary="Rank candidates by predicted CTR (two-stage cascade)",
        description=(
            "Stage 1 scores every candidate and keeps `stage1_k`; stage 2 re-scores those "
            "and returns the best `top_k`, best first (ties by request index). "
            "`multi_stage: false` scores everything with the predict model. "
            "Also: `top_k <= stage1_k`; values above the number of candidates are clamped."
        ),
        request=RankRequest,
        responses={200: ("rankings, per-stage latency, counts", RankResponse), **_BODY_ERRORS},
        ok_types=BODY_TYPES,
    ),
    ("/predict", "POST"): Operation(
        summary="Predict the CTR of one candidate or a few",
        description="Send exactly one of `candidate` (one object) or `candidates` (any form).",
        request=PredictRequest,
        responses={200: ("one CTR per candidate, in order", PredictResponse), **_BODY_ERRORS},
        ok_types=BODY_TYPES,
    ),
    ("/hello", "GET"): Operation(
        summary="A trivial answer through the whole stack (its cost floor per request)",
        responses={200: ("always the same tiny JSON", HelloResponse)},
    ),
    ("/health", "GET"): Operation(
        summary="The worker process is alive",
        responses={200: ("alive", HealthResponse)},
    ),
    ("/ready", "GET"): Operation(
        summary="Models loaded and warmed up",
        responses={
            200: ("ready", ReadyResponse),
            503: ("not ready yet (or draining)", ReadyResponse),
        },
    ),
    ("/models", "GET"): Operation(
        summary="Loaded models: version, fields, sha256, AUCs, pool size, stages",
        responses={200: ("the models", ModelsResponse), 503: ("`not_ready`", _ERROR)},
    ),
    ("/stats", "GET"): Operation(
        summary="The farm's summary: goodput, latency, sheds, OOV ids, drift (all workers)",
        responses={200: ("figures of every worker, whichever answers", StatsResponse)},
    ),
    ("/metrics", "GET"): Operation(
        summary="Prometheus metrics, merged across the workers",
        responses={200: ("Prometheus text exposition format", {"text/plain": {"type": "string"}})},
    ),
    ("/status", "GET"): Operation(
        summary="The live status page: charts of /stats and /models (HTML, served locally)",
        responses={
            200: ("an HTML page", {"text/html": {"type": "string"}}),
            304: ("not modified (`If-None-Match` matched the `ETag`)", {}),
        },
    ),
    ("/status/{asset}", "GET"): Operation(
        summary="The status page's script or style sheet",
        parameters=asset_parameter(STATUS_ASSETS),
        responses={
            200: (
                "the file",
                {ctype.split(";")[0]: {"type": "string"} for ctype in STATUS_ASSETS.values()},
            ),
            304: ("not modified (`If-None-Match` matched the `ETag`)", {}),
            404: ("`not_found`: not a status page asset", _ERROR),
        },
    ),
    ("/openapi.json", "GET"): Operation(
        summary="This document",
        responses={
            200: ("OpenAPI 3.1", {JSON: {"type": "object"}}),
            503: ("`not_ready`", _ERROR),
        },
    ),
    ("/docs", "GET"): Operation(
        summary="Interactive documentation (Swagger UI, served locally)",
        responses={200: ("an HTML page", {"text/html": {"type": "string"}})},
    ),
    ("/docs/{asset}", "GET"): Operation(
        summary="A Swagger UI asset of /docs",
        parameters=asset_parameter(DOCS_ASSETS),
        responses={
            200: (
                "the file",
                {mimetypes.guess_type(a)[0] or "": {"type": "string"} for a in DOCS_ASSETS},
            ),
            404: ("`not_found`: not a /docs asset", _ERROR),
        },
    ),
}


# -- candidates, from the card fields ----------------------------------------------------
def candidate_schemas(
    fields: Sequence[CardField], max_n: int, prefix: str
) -> dict[str, dict[str, Any]]:
    """Components ``Candidate`` (one object) and ``<prefix>Candidates`` (``oneOf`` the three
    forms) for a field layout: the types :class:`app.features.FeatureSpace` decodes.

    msgspec cannot put several array types in one union, so each form is described on
    its own and the ``oneOf`` is assembled here.
    """
    names = [f.name for f in fields]
    bounded = msgspec.Meta(min_length=1, max_length=max_n)
    obj = msgspec.defstruct(
        "Candidate", [(n, Id) for n in names], forbid_unknown_fields=True, kw_only=True
    )
    columns = msgspec.defstruct(
        f"{prefix}CandidateColumns",
        [(n, Annotated[list[Id], bounded]) for n in names],
        forbid_unknown_fields=True,
        kw_only=True,
    )
    forms = {
        "objects": Annotated[list[obj], bounded],
        "rows": Annotated[list[tuple.__class_getitem__((Id,) * len(names))], bounded],
        "columns": columns,
    }
    schemas, components = msgspec.json.schema_components(forms.values(), ref_template=_REF)
    components[f"{prefix}Candidates"] = {
        "title": f"{prefix}Candidates",
        "description": "objects keyed by field name, rows of ids in field order, or columns",
        "oneOf": [{"title": form, **s} for form, s in zip(forms, schemas, strict=True)],
    }
    return components


def request_twin(struct: type) -> type:
    """A copy of ``struct`` msgspec can describe: its ``msgspec.Raw`` fields with an
    empty-``Raw`` default (meaning "absent") become optional fields without a default.
    Their schemas are set afterwards (``candidates``, ``candidate``)."""
    config = struct.__struct_config__
    out: list[tuple[Any, ...]] = []
    for f in msgspec.structs.fields(struct):
        if f.required:
            out.append((f.name, f.type))
        elif isinstance(f.default, msgspec.Raw):
            out.append((f.name, f.type | msgspec.UnsetType, msgspec.UNSET))
        else:
            out.append((f.name, f.type, f.default))
    return msgspec.defstruct(
        struct.__name__,
        out,
        forbid_unknown_fields=config.forbid_unknown_fields,
        kw_only=True,
        module=struct.__module__,
    )


def _limited(config: Config) -> Any:
    return Annotated[int, msgspec.Meta(ge=1, le=config.max_candidates)] | None


# -- the document ----------------------------------------------------------------------------
#: Routes nginx never proxies (``location /admin/`` answers 404 on the public port; they
#: are reached on a worker's unix socket with a token): not part of the public contract.
PRIVATE_PREFIXES = ("/admin/",)


def served_routes(app: falcon.asgi.App) -> Iterator[tuple[str, str]]:
    """(path, method) of every public responder the app serves (not falcon's defaults)."""
    for route in falcon.inspect.inspect_routes(app):
        if route.path.startswith(PRIVATE_PREFIXES):
            continue
        for method in route.methods:
            if not method.internal:
                yield route.path, method.method


def build_document(
    app: falcon.asgi.App, config: Config, fields: Sequence[CardField], models: Sequence[str]
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app`` for a model card's ``fields``."""
    routes = sorted(set(served_routes(app)))
    missing = [r for r in routes if r not in OPERATIONS]
    if missing:
        raise KeyError(f"routes with no entry in app.openapi.OPERATIONS: {missing}")
    requests = {
        RankRequest: request_twin(RankRequest),
        PredictRequest: request_twin(PredictRequest),
    }
    bodies: list[Any] = [ErrorBody, *requests.values()]
    for path_method in routes:
        bodies += [r for _, r in OPERATIONS[path_method].responses.values() if isinstance(r, type)]
    _, components = msgspec.json.schema_components(bodies, ref_template=_REF)
    components.update(candidate_schemas(fields, config.max_candidates, "Rank"))
    components.update(candidate_schemas(fields, config.max_predict_candidates, "Predict"))
    # What the structs cannot say: the candidate forms (Raw on the wire), the configured
    # bounds, the loaded models, and "exactly one of candidate / candidates".
    rank, predict = components["RankRequest"], components["PredictRequest"]
    rank["properties"]["candidates"] = {"$ref": _REF.format(name="RankCandidates")}
    for k in ("top_k", "stage1_k"):
        rank["properties"][k] = msgspec.json.schema(_limited(config))
    predict["properties"]["candidates"] = {"$ref": _REF.format(name="PredictCandidates")}
    predict["properties"]["candidate"] = {"$ref": _REF.format(name="Candidate")}
    predict["properties"]["model"] = msgspec.json.schema(Literal[tuple(models)] | None)
    predict["oneOf"] = [{"required": ["candidate"]}, {"required": ["candidates"]}]
    paths: dict[str, dict[str, Any]] = {}
    for path, method in routes:
        op = OPERATIONS[path, method]
        paths.setdefault(path, {})[method.lower()] = _operation(op, requests)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ctr-farm",
            "version": _version(),
            "description": _description(config, fields, models),
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": {
                "X-Request-ID": {
                    "description": "the client's id if well formed, else one minted",
                    "schema": {"type": "string", "maxLength": REQUEST_ID_MAX},
                },
                "Retry-After": {
                    "description": "seconds to wait before retrying",
                    "schema": {"type": "string"},
                },
            },
        },
        "x-limits": {
            "max_candidates": config.max_candidates,
            "max_predict_candidates": config.max_predict_candidates,
            "max_body_bytes": config.max_body_bytes,
            "default_top_k": config.default_top_k,
            "default_stage1_k": config.default_stage1_k,
            "fields": [f.name for f in fields],
        },
    }


def _operation(op: Operation, requests: dict[type, type]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.request is not None:
        ref = {"$ref": _REF.format(name=requests[op.request].__name__)}
        out["requestBody"] = {
            "required": True,
            "description": "JSON or msgpack (also `application/x-msgpack`, "
            "`application/vnd.msgpack`); no Content-Type is read as JSON",
            "content": {t: {"schema": ref} for t in BODY_TYPES},
        }
    out["responses"] = {
        str(status): _response(status, description, body, op.ok_types)
        for status, (description, body) in op.responses.items()
    }
    return out


def _response(status: int, description: str, body: Any, ok_types: Sequence[str]) -> dict:
    headers: dict[str, Any] = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
    if body is _ERROR:
        content = {JSON: {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
        if status in (429, 503):
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
    elif isinstance(body, type):
        ref = {"$ref": _REF.format(name=body.__name__)}
        types = ok_types if status < 300 else (JSON,)
        content = {t: {"schema": ref} for t in types}
    else:
        content = {t: {"schema": schema} for t, schema in body.items()}
    return {"description": description, "headers": headers, "content": content}


#: Codes of the error tree's branches (never raised themselves) and of boot-only errors.
_NOT_ANSWERED = {"bad_request", "server_error", "unavailable", "model_load_error"}


def _error_codes() -> list[tuple[int, str]]:
    """(status, code) of every error of :mod:`app.errors` a request can meet."""
    out = {(503, "upstream_unavailable")}  # nginx's own, when no worker could answer
    stack: list[type[errors.FarmError]] = [errors.FarmError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.code not in _NOT_ANSWERED:
            out.add((cls.status, cls.code))
    return sorted(out)


def _description(config: Config, fields: Sequence[CardField], models: Sequence[str]) -> str:
    limits = [
        ("request body", f"{config.max_body_bytes} bytes (`max_body_bytes`)", 413),
        ("candidates per /rank", f"{config.max_candidates} (`max_candidates`)", 400),
        (
            "candidates per /predict",
            f"{config.max_predict_candidates} (`max_predict_candidates`)",
            400,
        ),
        ("top_k, stage1_k", f">= 1, top_k <= stage1_k <= {config.max_candidates}", 400),
        ("ids", "integers that fit int64; outside the vocabulary -> OOV bucket", 400),
    ]
    lines = [
        "Ranks ad candidates by predicted click-through rate.",
        "",
        "**Candidates** come in three forms, for the fields "
        + ", ".join(f"`{f.name}`" for f in fields)
        + " (card order): objects keyed by field name, rows of ids in field order, or "
        "columns (an object of equal-length id lists). Bodies are JSON or msgpack; the "
        "answer uses the `Accept` type, else the request's. Models: "
        + ", ".join(f"`{m}`" for m in models)
        + ".",
        "",
        "| limit | value | status when exceeded |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in limits),
        "",
        "**Errors** are `ErrorBody` (JSON) with an `X-Request-ID` header; unknown paths "
        "answer 404 `not_found`, other methods 405 `method_not_allowed` with `Allow`.",
        "",
        "| status | code |",
        "|---|---|",
        *(f"| {s} | `{c}` |" for s, c in _error_codes()),
    ]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctr-farm")
    except PackageNotFoundError:
        return "0"


# -- resources ---------------------------------------------------------------------------
class OpenApiResource:
    """``GET /openapi.json``: built on the first request (the farm loads after fork)."""

    def __init__(self, app: falcon.asgi.App, farm: Farm) -> None:
        self.app, self.farm = app, farm
        self._body: bytes | None = None

    def document(self) -> dict[str, Any]:
        if not self.farm.ready:
            raise NotReady("models are not loaded yet")
        first = next(iter(self.farm.models.values()))
        return build_document(self.app, self.farm.config, first.card.fields, list(self.farm.models))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if self._body is None:
            self._body = msgspec.json.encode(self.document())
        resp.data, resp.content_type = self._body, JSON


_DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>ctr-farm API</title>
  <link rel="stylesheet" href="docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
  </script>
</body>
</html>
"""


class DocsResource:
    """``GET /docs`` and ``GET /docs/{asset}``: Swagger UI from the installed package."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, bytes] = {}

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data, resp.content_type = _DOCS_PAGE, "text/html; charset=utf-8"

    async def on_get_asset(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, asset: str
    ) -> None:
        if asset not in DOCS_ASSETS:
            raise NotFound(f"no docs asset {asset[:64]!r}")
        if asset not in self._cache:
            self._cache[asset] = (self.root / asset).read_bytes()
        resp.data = self._cache[asset]
        resp.content_type = mimetypes.guess_type(asset)[0] or "application/octet-stream"
        resp.cache_control = ["public", "max-age=86400"]


def register(app: falcon.asgi.App, farm: Farm) -> None:
    """Add ``/openapi.json``, ``/docs`` and ``/docs/{asset}`` to ``app``."""
    app.add_route("/openapi.json", OpenApiResource(app, farm))
    docs = DocsResource(Path(str(swagger_ui_path)))
    app.add_route("/docs", docs)
    app.add_route("/docs/{asset}", docs, suffix="asset")

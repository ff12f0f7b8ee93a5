"""app.openapi: the document validates, lists exactly the served routes, and agrees with
the server on which candidate bodies are valid; /docs is served without a CDN."""

from __future__ import annotations

import re
from typing import Any

import falcon.testing
import msgspec
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from app.api import create_app
from app.openapi import DOCS_ASSETS, build_document, served_routes
from app.service import Farm
from tests.conftest import FIELD_NAMES, as_form, client_for

ROWS = [[1, 2, 3, 4], [6, 23, 34, 399], [0, 0, 0, 0]]
JSON = "application/json"


@pytest.fixture
def doc(client: falcon.testing.TestClient) -> dict[str, Any]:
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 200
    assert result.headers["content-type"] == JSON
    return msgspec.json.decode(result.content)


def schema_validator(doc: dict[str, Any], name: str) -> OAS31Validator:
    return OAS31Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_document_is_valid_openapi_31(doc: dict[str, Any]) -> None:
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema
    assert doc["openapi"].startswith("3.1")


def test_every_served_route_is_documented_and_nothing_else(
    doc: dict[str, Any], client: falcon.testing.TestClient
) -> None:
    served = set(served_routes(client.app))
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert documented == served
    # the app's own endpoints, by name: a route lost from both sides would go unseen above
    for route in [("/rank", "POST"), ("/predict", "POST"), ("/ready", "GET"), ("/docs", "GET")]:
        assert route in served


def test_a_route_without_a_description_fails_the_build(farm: Farm) -> None:
    class Undocumented:
        async def on_get(self, req: object, resp: object) -> None:
            pass

    app = create_app(farm.config, farm, manage_lifecycle=False)
    app.add_route("/undocumented", Undocumented())
    with pytest.raises(KeyError, match="/undocumented"):
        build_document(app, farm.config, next(iter(farm.models.values())).card.fields, ["x"])


def test_private_routes_stay_out_of_the_document(farm: Farm) -> None:
    class Private:
        async def on_post(self, req: object, resp: object) -> None:
            pass

    app = create_app(farm.config, farm, manage_lifecycle=False)
    app.add_route("/admin/anything", Private())
    fields = next(iter(farm.models.values())).card.fields
    doc = build_document(app, farm.config, fields, ["deepfm"])
    assert "/rank" in doc["paths"]
    assert not [p for p in doc["paths"] if p.startswith("/admin")]


def test_post_endpoints_take_json_and_msgpack_and_list_their_errors(doc: dict[str, Any]) -> None:
    for path in ("/rank", "/predict"):
        op = doc["paths"][path]["post"]
        assert set(op["requestBody"]["content"]) == {JSON, "application/msgpack"}
        assert set(op["responses"]["200"]["content"]) == {JSON, "application/msgpack"}
        assert {"400", "413", "415", "429", "500", "503"} <= set(op["responses"])
        error = op["responses"]["503"]
        assert error["content"][JSON]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert "Retry-After" in error["headers"]
    error_body = doc["components"]["schemas"]["ErrorDetail"]
    assert set(error_body["properties"]) == {"code", "message", "field"}


# -- the candidate schema and the server agree ------------------------------------------------
GOOD = [
    {"candidates": as_form(ROWS, "objects")},
    {"candidates": as_form(ROWS, "rows"), "top_k": 2, "stage1_k": 3},
    {"candidates": as_form(ROWS, "columns"), "multi_stage": False},
]
BAD = [
    {"candidates": []},  # no candidate
    {"candidates": [[1, 2, 3]]},  # a row one id short
    {"candidates": [{**dict.fromkeys(FIELD_NAMES, 1), "extra": 1}]},  # unknown field
    {"candidates": {"weekday": [1]}},  # columns missing fields
    {"candidates": as_form(ROWS, "rows"), "top_k": 0},
    {"candidates": as_form(ROWS, "rows"), "surprise": 1},
    {"candidates": [[2**63] * len(FIELD_NAMES)]},  # does not fit int64
    {"top_k": 3},  # no candidates
]


@pytest.mark.parametrize("body", GOOD)
def test_rank_bodies_the_schema_accepts_the_server_accepts(
    doc: dict[str, Any], client: falcon.testing.TestClient, body: dict[str, Any]
) -> None:
    schema_validator(doc, "RankRequest").validate(body)
    result = client.simulate_post("/rank", body=msgspec.json.encode(body), headers={})
    assert result.status_code == 200, result.text


@pytest.mark.parametrize("body", BAD)
def test_rank_bodies_the_schema_rejects_the_server_rejects(
    doc: dict[str, Any], client: falcon.testing.TestClient, body: dict[str, Any]
) -> None:
    assert not schema_validator(doc, "RankRequest").is_valid(body)
    result = client.simulate_post("/rank", body=msgspec.json.encode(body))
    assert result.status_code == 400
    assert result.json["error"]["code"] in {"invalid_request", "malformed_body"}


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ({"candidate": as_form(ROWS[:1], "objects")[0]}, True),
        ({"candidates": as_form(ROWS, "columns"), "model": "deepfm"}, True),
        ({"candidates": as_form(ROWS, "rows"), "model": "nope"}, False),
        ({"candidate": as_form(ROWS[:1], "objects")[0], "candidates": ROWS}, False),
        ({}, False),
    ],
)
def test_predict_schema_and_server_agree(
    doc: dict[str, Any], client: falcon.testing.TestClient, body: dict[str, Any], ok: bool
) -> None:
    assert schema_validator(doc, "PredictRequest").is_valid(body) is ok
    result = client.simulate_post("/predict", body=msgspec.json.encode(body))
    assert result.status_code == (200 if ok else 400), result.text


def test_limits_come_from_the_config(make_config, make_farm) -> None:
    config = make_config(
        max_candidates=40,
        max_predict_candidates=7,
        stages=[{"model": "deepfm", "keep_k": 20}, {"model": "autoint"}],
    )
    client = client_for(make_farm(config))
    doc = msgspec.json.decode(client.simulate_get("/openapi.json").content)
    schemas = doc["components"]["schemas"]
    rows = next(s for s in schemas["RankCandidates"]["oneOf"] if s["title"] == "rows")
    assert rows["maxItems"] == 40
    predict_rows = next(s for s in schemas["PredictCandidates"]["oneOf"] if s["title"] == "rows")
    assert predict_rows["maxItems"] == 7
    assert schemas["RankRequest"]["properties"]["top_k"]["anyOf"][0]["maximum"] == 40
    assert doc["x-limits"]["max_candidates"] == 40
    assert doc["x-limits"]["fields"] == list(FIELD_NAMES)


def test_openapi_waits_for_the_models(config) -> None:
    client = client_for(Farm(config))  # never loaded
    result = client.simulate_get("/openapi.json")
    assert result.status_code == 503
    assert result.json["error"]["code"] == "not_ready"


def test_the_document_is_built_once(client: falcon.testing.TestClient) -> None:
    resource = client.app._router.find("/openapi.json")[0]
    first = client.simulate_get("/openapi.json").content
    cached = resource._body
    assert client.simulate_get("/openapi.json").content == first
    assert resource._body is cached is not None  # not rebuilt


# -- /docs ----------------------------------------------------------------------------------
def test_docs_page_loads_only_local_assets(client: falcon.testing.TestClient) -> None:
    page = client.simulate_get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and not [r for r in refs if "//" in r]  # no CDN, no absolute URL
    assert 'url: "openapi.json"' in page.text
    for ref in refs:
        asset = client.simulate_get("/" + ref)
        assert asset.status_code == 200, ref
        assert len(asset.content) > 100
        assert ref.removeprefix("docs/") in DOCS_ASSETS
    js = client.simulate_get("/docs/swagger-ui-bundle.js")
    assert "javascript" in js.headers["content-type"]
    assert b"SwaggerUIBundle" in js.content


@pytest.mark.parametrize("asset", ["index.html", "..%2Fopenapi.py", "swagger-ui.js.map"])
def test_docs_serves_nothing_else(client: falcon.testing.TestClient, asset: str) -> None:
    result = client.simulate_get(f"/docs/{asset}")
    assert result.status_code == 404
    assert result.json["error"]["code"] == "not_found"

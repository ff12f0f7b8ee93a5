"""app.admin: the token guard, the redacted config, the breaker reset."""

from __future__ import annotations

import falcon.testing
import msgspec
import pytest

from app.api import create_app
from app.breaker import OPEN


def admin_client(make_config, make_farm, token: str) -> tuple[falcon.testing.TestClient, object]:
    config = make_config(admin_token=token, breaker_failures=1)
    farm = make_farm(config)
    return falcon.testing.TestClient(create_app(config, farm, manage_lifecycle=False)), farm


def error_code(result: falcon.testing.Result) -> str:
    return msgspec.json.decode(result.content)["error"]["code"]


def test_admin_is_forbidden_without_a_configured_token(make_config, make_farm) -> None:
    client, _ = admin_client(make_config, make_farm, "")
    routes = (
        ("GET", "/admin/config"),
        ("POST", "/admin/breakers/reset"),
        ("POST", "/admin/reload"),
    )
    for method, path in routes:
        result = client.simulate_request(method, path, headers={"Authorization": "Bearer "})
        assert result.status_code == 403 and error_code(result) == "forbidden"


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "Basic s3cret-token", "s3cret-token", "Bearer s3cret-toke"]
)
def test_admin_needs_the_exact_bearer_token(make_config, make_farm, header) -> None:
    client, _ = admin_client(make_config, make_farm, "s3cret-token")
    headers = {} if header is None else {"Authorization": header}
    result = client.simulate_get("/admin/config", headers=headers)
    assert result.status_code == 401 and error_code(result) == "unauthorized"
    assert "s3cret" not in result.text


def test_admin_config_redacts_the_token(make_config, make_farm) -> None:
    client, farm = admin_client(make_config, make_farm, "s3cret-token")
    result = client.simulate_get("/admin/config", headers={"Authorization": "Bearer s3cret-token"})
    assert result.status_code == 200
    body = result.json
    assert body["admin_token"] == "<redacted>" and "s3cret" not in result.text
    assert body["pool_size"] == farm.config.pool_size


def test_breaker_reset_closes_every_breaker(make_config, make_farm) -> None:
    client, farm = admin_client(make_config, make_farm, "t")
    breaker = next(iter(farm.breakers.values()))
    breaker.failure()
    assert breaker.state == OPEN
    result = client.simulate_post("/admin/breakers/reset", headers={"Authorization": "Bearer t"})
    assert result.status_code == 200
    assert {b["state"] for b in result.json["breakers"].values()} == {"closed"}
    assert breaker.allow()


def test_reload_answers_with_this_workers_outcome(make_config, make_farm) -> None:
    client, farm = admin_client(make_config, make_farm, "t")
    assert client.simulate_post("/admin/reload").status_code == 401
    result = client.simulate_post("/admin/reload", headers={"Authorization": "Bearer t"})
    assert result.status_code == 200
    assert result.json["generation"] == farm.generation == 1
    assert result.json["changed"] == [] and result.json["rejected"] == []
    models = client.simulate_get("/models").json
    assert models["last_reload"] == result.json and models["generation"] == 1

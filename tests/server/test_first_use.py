"""`serve --demo` says so (first line, /health) and the API docs need no internet (issue 19)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from server.harness import ServerProcess
from wanstream.server.app import create_app
from wanstream.server.config import ServerConfig


def test_serve_demo_says_so_in_its_first_line_and_in_health(server: ServerProcess) -> None:
    first = server.log_path.read_text().splitlines()[0]  # log() is the tail: a shared server has logged more
    assert first.startswith("wanstream serve: demo model") and "RANDOM WEIGHTS" in first
    with server.client() as c:
        assert c.get("/health").json()["demo"] is True


def test_health_of_a_real_model_server_says_not_demo() -> None:
    app = create_app(ServerConfig(preload=False))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        health = c.get("/health").json()
    assert health["demo"] is False and health["model"] == "not_loaded"


def test_the_docs_page_loads_swagger_ui_from_the_server_itself(server: ServerProcess) -> None:
    with server.client() as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "cdn." not in page.text and "https://" not in page.text.replace("https://fastapi", "")
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert f"/static-offline-docs/{asset}" in page.text
            response = c.get(f"/static-offline-docs/{asset}")
            assert response.status_code == 200 and len(response.content) > 100_000, asset
        assert c.get("/openapi.json").json()["info"]["title"] == "wanstream"

"""Optional bearer-token auth: with a token set, nothing but the health probes answers without it."""

from __future__ import annotations

import base64
import secrets

import pytest

from trained_model import NO_REGION_QUESTION, SERVER_TOKEN_ENV, ServerProcess, python_env

httpx = pytest.importorskip("httpx")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def token_server(trained_chain, tmp_path_factory):
    from medsight.serve.package import build_package

    workdir = tmp_path_factory.mktemp("auth")
    package = build_package(trained_chain.model, trained_chain.base, workdir / "package")
    token = secrets.token_urlsafe(24)
    server = ServerProcess(str(package), workdir, python_env(**{SERVER_TOKEN_ENV: token})).wait_ready()
    yield server, token
    server.stop()
    assert token not in server.log.read_text(), "the token leaked into the server log"


def test_only_health_answers_without_the_token(token_server, trained_chain):
    server, token = token_server
    image = base64.b64encode(trained_chain.test_images[0].read_bytes()).decode()
    infer = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]},
                        {"name": "question", "datatype": "BYTES", "shape": [1], "data": [NO_REGION_QUESTION]}]}
    chat = {"model": "medsight", "messages": [{"role": "user", "content": [
        {"type": "text", "text": NO_REGION_QUESTION}, {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image}}]}]}
    protected = [
        ("GET", "/", None), ("GET", "/static/app.js", None), ("GET", "/metrics", None), ("GET", "/v2", None),
        ("GET", "/v2/models", None), ("GET", "/v2/models/medsight", None), ("GET", "/v2/models/medsight/ready", None),
        ("GET", "/v1/models", None), ("GET", "/v1/models/medsight", None), ("GET", "/docs", None),
        ("POST", "/v2/models/medsight/infer", infer), ("POST", "/v1/chat/completions", chat),
        ("POST", "/v1/models/medsight:predict", {"instances": []}), ("POST", "/v2/repository/models/medsight/unload", None),
        ("GET", "/no/such/path", None),
    ]
    for method, path, body in protected:
        for headers in ({}, {"authorization": f"Bearer {secrets.token_hex(12)}"}, {"authorization": f"Basic {token}"},
                        {"cookie": "medsight_token=nope"}):
            response = httpx.request(method, server.url + path, json=body, headers=headers, timeout=60)
            assert response.status_code == 401, f"{method} {path} with {headers}: {response.status_code}"
            assert response.headers["www-authenticate"].startswith("Bearer")
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200
    # With the token (header for API clients, cookie for the page) the same requests work.
    good = {"authorization": f"Bearer {token}"}
    assert httpx.post(f"{server.url}/v2/models/medsight/infer", json=infer, headers=good, timeout=120).status_code == 200
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, headers=good, timeout=120).status_code == 200
    assert httpx.get(f"{server.url}/metrics", headers=good, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/", cookies={"medsight_token": token}, timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/static/app.js", cookies={"medsight_token": token}, timeout=10).status_code == 200
    # A browser without the token gets a sign-in form, not the page.
    login = httpx.get(f"{server.url}/", headers={"accept": "text/html"}, timeout=10)
    assert login.status_code == 401 and "access token" in login.text and "MedSIGHT" in login.text

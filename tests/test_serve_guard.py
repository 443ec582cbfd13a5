"""`genesis serve` answers only requests addressed to it, with JSON bodies and numbers in range (issue #23, item 10).

A page on any site can point its own name at 127.0.0.1 (DNS rebinding) and then read the server's answers as
its own; such requests name that site in `Host`. A cross-site page can also POST `text/plain` without the
browser asking first. And a number the sampler cannot take (a seed beyond 64 bits) used to crash the stream
with a server traceback. These tests speak to the real server over HTTP (`genesis serve` in its own process,
or the same app in Starlette's TestClient where the bind address is the point) on a run with no models yet:
every refusal here comes before any model is looked up.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from serve.app import create_app
from serve.guard import HostPolicy
from tests.test_serve import Server

PROXY = "genesis.example.org"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Bound to 127.0.0.1 (the default), with a reverse proxy's name allowed."""
    run_dir = tmp_path_factory.mktemp("guarded") / "run"
    run_dir.mkdir()
    server = Server(run_dir, "--allow-host", PROXY)
    yield server
    server.stop()


def one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert message and "\n" not in message
    return message


def get_as(server: Server, host: str, path: str) -> httpx.Response:
    """GET from the server's own socket, naming `host` in the Host header as a browser would."""
    return httpx.get(server.url + path, headers={"Host": host}, timeout=10)


GENERATE = {"model": "milestone/step_00000001", "prompt": "Hello", "chat": False}


@pytest.mark.integration
def test_a_request_addressed_to_another_name_is_refused_on_every_route(server):
    """The names a DNS-rebinding page would send: its own, with or without the server's port."""
    for host in ("evil.example", f"evil.example:{server.port}", f"127.0.0.1.nip.io:{server.port}"):
        for method, path in (("GET", "/api/status"), ("GET", "/"), ("GET", "/static/app.js"),
                             ("POST", "/api/generate")):
            response = httpx.request(method, server.url + path, headers={"Host": host}, json=GENERATE, timeout=10)
            message = one_line_error(response, 403)
            assert host in message and "--allow-host" in message


@pytest.mark.integration
def test_the_loopback_names_of_a_loopback_server_are_served_on_its_own_port_only(server):
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}", "localhost"):
        assert get_as(server, host, "/api/status").status_code == 200, host
    one_line_error(get_as(server, f"localhost:{server.port + 1}", "/api/status"), 403)


@pytest.mark.integration
def test_allow_host_admits_a_reverse_proxys_name_on_the_proxys_port(server):
    for host in (PROXY, f"{PROXY}:443", PROXY.upper()):
        assert get_as(server, host, "/api/status").status_code == 200, host
    one_line_error(get_as(server, f"other.{PROXY}", "/api/status"), 403)


@pytest.mark.integration
@pytest.mark.parametrize("content_type",
                         ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_a_post_whose_body_is_not_declared_json_is_refused_with_415(server, content_type):
    """`text/plain` and forms are what a cross-site page may POST without the browser asking the server first."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = httpx.post(server.url + "/api/generate", content=b'{"model": "m", "prompt": "Hi"}', headers=headers,
                          timeout=10)
    assert "application/json" in one_line_error(response, 415)


@pytest.mark.integration
def test_a_json_body_with_a_charset_passes_the_guard(server):
    response = httpx.post(server.url + "/api/generate", content=b'{"model": "m", "prompt": "Hi"}',
                          headers={"Content-Type": "application/json; charset=utf-8"}, timeout=10)
    assert response.status_code == 404  # the guard let it through: the run has no model "m"


@pytest.mark.integration
@pytest.mark.parametrize("raw_field, field", [
    ('"seed": 18446744073709551616', "seed"),  # 2**64: torch's manual_seed overflows
    ('"seed": 9223372036854775808', "seed"),  # 2**63
    ('"seed": -1', "seed"),
    ('"top_k": 100000000000000000000000', "top_k"),
    ('"max_new_tokens": 100000000000000000000000', "max_new_tokens"),
    ('"temperature": NaN', "temperature"),  # Python's JSON reader takes NaN and Infinity
    ('"top_p": NaN', "top_p"),
    ('"temperature": Infinity', "temperature"),
])
def test_numbers_out_of_range_are_refused_with_one_line_before_any_model_is_touched(server, raw_field, field):
    body = '{"model": "milestone/step_00000001", "prompt": "Hello", ' + raw_field + "}"
    response = httpx.post(server.url + "/api/generate", content=body.encode(),
                          headers={"Content-Type": "application/json"}, timeout=10)
    assert f"request field {field}" in one_line_error(response, 400)


@pytest.mark.integration
@pytest.mark.parametrize("since", ["100000000000000000000000", "-2", "abc"])
def test_a_curves_query_out_of_range_is_refused_with_one_line(server, since):
    assert "since" in one_line_error(server.get(f"/api/curves?since={since}"), 400)


def test_listening_on_every_interface_serves_ip_literals_and_this_machines_name_but_not_other_names(tmp_path):
    """Bound to 0.0.0.0 the server is reached by any of the machine's addresses; a rebinding page still sends a
    name of its own."""
    import socket

    app = create_app(tmp_path, device="cpu", hosts=HostPolicy("0.0.0.0", 8765))
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        for host in ("192.168.1.20:8765", "[fe80::1]:8765", "127.0.0.1:8765", f"{socket.gethostname()}:8765"):
            assert client.get("/api/status", headers={"Host": host}).status_code == 200, host
        refused = client.get("/api/status", headers={"Host": "evil.example:8765"})
        assert refused.status_code == 403 and "evil.example" in refused.json()["error"]


def test_an_app_made_without_a_host_policy_answers_loopback_names_only(tmp_path):
    """Whoever builds the app from Python gets the safe default, not an open server."""
    with TestClient(create_app(tmp_path, device="cpu"), base_url="http://localhost:5000") as client:
        assert client.get("/api/status").status_code == 200
        assert client.get("/api/status", headers={"Host": "evil.example"}).status_code == 403


def test_a_malformed_allow_host_is_refused_at_start_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    started = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--run-dir", str(tmp_path), "--allow-host",
                              "proxy:https"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert started.returncode != 0 and started.stderr.startswith("error: --allow-host")
    assert len(started.stderr.strip().splitlines()) == 1

"""`protogalaxy audit --url` against servers that are down, broken or hostile (real
sockets on loopback): a clear error and exit 2, never a traceback, a hang, or a
file written outside the copy."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from protogalaxy.cli import main
from protogalaxy.services.audit_fetch import FetchError, fetch_run

Handler = Callable[[BaseHTTPRequestHandler], None]


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    servers: list[ThreadingHTTPServer] = []

    def start(handle: Handler) -> str:
        class H(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                handle(self)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _reply(h: BaseHTTPRequestHandler, body: bytes, status: int = 200) -> None:
    h.send_response(status)
    h.send_header("content-length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def _listing(names: list[str]) -> Handler:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/v1/audit/files":
            _reply(h, json.dumps(names).encode())
        else:
            _reply(h, b"{}")

    return handle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nothing_listening(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["audit", "--url", url, "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert "ConnectError" in err and "Traceback" not in err


def test_a_server_that_speaks_garbage(capsys: pytest.CaptureFixture[str]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def garbage() -> None:
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b"garbage\r\n\r\n")
        conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        assert main(["audit", "--url", url, "--token", "t"]) == 2
    finally:
        listener.close()
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "names",
    [
        ["../outside.json"],
        ["/etc/passwd"],
        ["secrets/global.key"],
        ["logs/global.log"],
        ["keys/../secrets/x.pub"],
        "not a list",
    ],
)
def test_a_listing_outside_the_published_layout_is_refused(
    serve: Callable[[Handler], str], tmp_path: Path, names: object
) -> None:
    url = serve(_listing(names))  # type: ignore[arg-type]
    into = tmp_path / "copy"
    with pytest.raises(FetchError):
        fetch_run(url, into, token="t")
    assert not (tmp_path / "outside.json").exists()
    assert not into.exists() or not any(into.rglob("*"))


def test_a_dripping_server_meets_the_deadline(
    serve: Callable[[Handler], str], tmp_path: Path
) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/v1/audit/files":
            _reply(h, json.dumps(["run.json"]).encode())
            return
        h.send_response(200)
        h.send_header("content-length", "1000")
        h.end_headers()
        try:
            for _ in range(1000):  # a byte every 0.2 s: within each read timeout
                h.wfile.write(b" ")
                h.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    url = serve(handle)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="deadline"):
        fetch_run(url, tmp_path / "copy", token="t", deadline_s=1.0, timeout_s=5.0)
    assert time.monotonic() - t0 < 10


def test_an_oversized_run_is_refused(
    serve: Callable[[Handler], str], tmp_path: Path
) -> None:
    def handle(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/v1/audit/files":
            _reply(h, json.dumps(["run.json", "evidence.jsonl"]).encode())
        else:
            _reply(h, b"x" * 4096)

    with pytest.raises(FetchError, match="exceed"):
        fetch_run(serve(handle), tmp_path / "copy", token="t", max_bytes=6000)

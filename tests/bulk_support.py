"""What the bulk tests share: a local HTTP server and its handlers' plumbing, and a pull --bulk
interrupted by a signal."""

from __future__ import annotations

import contextlib
import http.server
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["ExportHandler", "interrupt_pull", "local_server"]


class ExportHandler(http.server.BaseHTTPRequestHandler):
    """A test server's handler: answers with ``_send``, records each DELETE in ``seen`` (each
    subclass has its own list), logs nothing."""

    seen: ClassVar[list[str]]

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_DELETE(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append(f"DELETE {self.path}")
        self._send(202)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def local_server(
    handler: type[http.server.BaseHTTPRequestHandler],
    before_close: Callable[[], None] | None = None,
) -> Iterator[str]:
    """Serve ``handler`` on a free local port; yield the FHIR base URL (``.../fhir``).

    ``before_close`` runs first on the way out (to release a handler that holds a request).
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    finally:
        if before_close is not None:
            before_close()
        server.shutdown()
        server.server_close()
        thread.join()


def interrupt_pull(
    base: str,
    work: Path,
    when: Callable[[], bool],
    *,
    args: tuple[str, ...] = (),
    settle: float = 0.0,
    sig: int = signal.SIGINT,
) -> tuple[int, str]:
    """Run ``ims-fhir pull --bulk`` in a process, send it ``sig`` once ``when()`` holds (and
    ``settle`` seconds more), and return its exit code and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ims_fhir", "pull", "--bulk", "--server", base,
         "--bulk-dir", str(work), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not when() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(settle)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    return process.returncode, err

"""What the bulk tests share: a local HTTP server, and a pull --bulk interrupted by a signal."""

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

__all__ = ["interrupt_pull", "local_server"]


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

import subprocess
import sys
from pathlib import Path


def test_sync_client_is_generated_from_the_async_one(root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

import subprocess
import sys
from pathlib import Path


def test_the_code_literals_are_generated_from_the_codesystem(root: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(root / "scripts" / "codes.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr

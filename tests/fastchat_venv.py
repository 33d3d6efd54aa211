"""Stock FastChat 0.2.36 in its own virtualenv, .venvs/fastchat (pydantic 1: its streaming
breaks on pydantic 2), made once. The interop tests call ``ensure()``; .ci/run runs this
file in the background while it installs flaskchat, so that the two installs overlap."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FASTCHAT_VENV = ROOT / ".venvs" / "fastchat"
FASTCHAT_REQUIREMENTS = ["fschat==0.2.36", "pydantic<2", "fastapi==0.115.12"]


def ensure() -> str:
    """The virtualenv's python, after installing FastChat there if it is not yet."""
    python = FASTCHAT_VENV / "bin" / "python"
    marker = FASTCHAT_VENV / ".installed"
    if not marker.exists() or marker.read_text() != " ".join(FASTCHAT_REQUIREMENTS):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(FASTCHAT_VENV)],
                       check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", *FASTCHAT_REQUIREMENTS], check=True)
        marker.write_text(" ".join(FASTCHAT_REQUIREMENTS))
    return str(python)


if __name__ == "__main__":
    ensure()

"""The gevent worker patches before our code loads; importing the app or the CLI must not
pull in requests/urllib3 first (gevent would warn about ssl, and patching would be late)."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["app", "app.cli", "app.config"])
def test_import_leaves_requests_unloaded(module: str) -> None:
    code = (f"import sys, {module}; "
            "loaded = [m for m in ('requests', 'urllib3', 'gevent') if m in sys.modules]; "
            "print(','.join(loaded))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == ""

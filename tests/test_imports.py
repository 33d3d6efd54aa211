"""Import boundaries, each checked in a fresh interpreter.

- The gevent worker patches before our code loads: importing the app, the CLI, the config
  or gunicorn.conf.py must not pull in requests or urllib3 first (gevent would warn about
  ssl, and patching would be late), nor the database and Redis drivers (psycopg picks
  how it waits on sockets when it is imported, and must see gevent's patches).
- The worker and controller processes import only config, errors, app.protocol and
  app.web's plumbing (and their own package): never the gateway's serving, routes or
  upstream packages.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_FOR_PROCESSES = ("app", "app.config", "app.errors", "app.protocol", "app.web")


def modules_after(code: str) -> list[str]:
    """The modules loaded in a fresh interpreter after running ``code``."""
    probe = f"import sys, json; {code}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    loaded: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("code", ["import app", "import app.cli", "import app.config",
                                  "import app.runtime.gunicorn_runner",
                                  "exec(open('gunicorn.conf.py').read(), {})"])
def test_the_arbiter_side_leaves_requests_unloaded(code: str) -> None:
    loaded = modules_after(code)
    assert [m for m in ("requests", "urllib3", "gevent", "sqlalchemy", "psycopg", "redis")
            if m in loaded] == []


@pytest.mark.parametrize("package,entry", [
    ("app.worker", "app.worker.routes"), ("app.worker", "app.worker.registration"),
    ("app.worker", "app.worker"), ("app.controller", "app.controller.routes"),
    ("app.controller", "app.controller")])
def test_worker_and_controller_import_no_gateway_code(package: str, entry: str) -> None:
    if package == "app.worker":
        pytest.importorskip("torch")  # the worker's routes load the model code
    loaded = [m for m in modules_after(f"import {entry}")
              if m == "app" or m.startswith("app.")]
    outside = [m for m in loaded if not m.startswith(package)
               and not any(m == a or m.startswith(a + ".") for a in ALLOWED_FOR_PROCESSES)]
    assert outside == []
    assert {"app.serving", "app.routes", "app.upstream"}.isdisjoint(loaded)


def test_every_package_is_installed() -> None:
    """A folder of modules without __init__.py is a namespace package, which setup.cfg's
    ``find:`` leaves out of a (non-editable) install such as the Dockerfile's."""
    from setuptools import find_packages

    found = set(find_packages(str(ROOT), include=["app", "app.*", "schemas", "schemas.*"]))
    folders = {str(path.parent.relative_to(ROOT)).replace("/", ".")
               for top in ("app", "schemas") for path in (ROOT / top).rglob("*.py")}
    assert folders - found == set()

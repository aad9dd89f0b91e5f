"""The install passes pip's index settings to uv: an index, find-links folder or constraint that pip would
use and uv did not would install other builds (here: the CPU torch wheel from /opt/wheels, its cap)."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("install_env", REPO_ROOT / "scripts" / "install_env.py")
install_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_env)


def test_every_pip_source_reaches_uv():
    args = install_env.uv_arguments({"index-url": "https://mirror/simple", "extra-index-url": "file:///a file:///b",
                                     "find-links": "/opt/wheels", "constraint": "/etc/pip/c.txt", "cert": "/ca.crt"})
    pairs = set(zip(args, args[1:]))  # each flag beside its value
    assert ("--index-url", "https://mirror/simple") in pairs and ("--find-links", "/opt/wheels") in pairs
    assert ("--extra-index-url", "file:///a") in pairs and ("--extra-index-url", "file:///b") in pairs
    assert ("--constraint", "/etc/pip/c.txt") in pairs and ("--index-strategy", "unsafe-best-match") in pairs


def test_pip_variables_override_its_files(monkeypatch):
    listed = ("global.find-links='/from/file'\n:env:.find-links='/from/env'\nglobal.extra-index-url='file:///x file:///y'\n"
              "install.constraint='/c.txt'\nglobal.timeout='60'\n")

    class Listed:
        stdout = listed

    monkeypatch.setattr(install_env, "pip", lambda *args, **kwargs: Listed())
    settings = install_env.pip_settings()
    assert settings["find-links"] == "/from/env" and settings["constraint"] == "/c.txt"
    assert settings["extra-index-url"] == "file:///x file:///y"

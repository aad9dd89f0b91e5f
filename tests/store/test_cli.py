"""`python -m store ...` end to end, in subprocesses as users run it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from store import EmbeddingStore
from store.cli import build_parser
from store.schema import data_group
from tests.conftest import REPO_ROOT
from tests.store.helpers import spec, write_slide

SUBCOMMANDS = ["info", "verify", "failures", "export-h5", "import-h5", "rm", "merge"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "store", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: python -m store " + command in capsys.readouterr().out


def test_commands_on_a_real_store(tmp_path):
    url = str(tmp_path / "store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec())
    write_slide(store, "s1", 100)
    write_slide(store, "s2", 10, seed=2)
    store.record_failure("bad", ValueError("mpp 352.8 is not plausible"))

    info = run("info", url, "--list")
    assert info.returncode == 0, info.stderr
    assert "2 complete, 0 incomplete, 1 failed; 110 tiles" in info.stdout and "s1\ts1\t100 tiles" in info.stdout
    one = run("info", url, "--slide", "s2")
    assert one.returncode == 0 and '"n_tiles": 10' in one.stdout
    failures = run("failures", url)
    assert "bad\tValueError\tattempts=1\tmpp 352.8 is not plausible" in failures.stdout
    assert run("verify", url).returncode == 0

    assert run("export-h5", url, str(tmp_path / "h5")).returncode == 0
    imported = run("import-h5", str(tmp_path / "h5"), str(tmp_path / "imported"), "--encoder", "test-encoder")
    assert imported.returncode == 0 and "imported 2 slides" in imported.stdout

    copy = run("merge", url, str(tmp_path / "merged"))
    assert copy.returncode == 0 and "copied 2 slides" in copy.stdout
    again = run("merge", url, str(tmp_path / "merged"))
    assert "copied 0 slides" in again.stdout and "2 already there" in again.stdout
    refused = run("merge", url, str(tmp_path / "imported"), str(tmp_path / "m2"))
    assert refused.returncode == 2 and "cannot be merged" in refused.stderr

    removed = run("rm", url, "s1", "nope")
    assert removed.returncode == 1 and "not in store: nope" in removed.stderr
    assert EmbeddingStore.open(url).slide_ids() == ["s2"]


def test_verify_exits_nonzero_with_the_problem(tmp_path):
    url = str(tmp_path / "store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec())
    write_slide(store, "s1", 100)
    data_group(store._root["slides/s1"])["embeddings"][3, 0] = float("nan")
    result = run("verify", url)
    assert result.returncode == 1
    assert "error: slide s1: embedding row 3 is NaN/Inf" in result.stdout


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = run("info", str(tmp_path / "missing"))
    assert result.returncode == 2 and result.stderr.startswith("error: no slidecache store")
    assert "Traceback" not in result.stderr
    bad = run("info", str(tmp_path), "--storage-options", "{not json")
    assert bad.returncode == 2 and "--storage-options must be a JSON object" in bad.stderr

"""A remote store that cannot be used says so in one line naming the URL (credentials redacted), the cause and
the fix, and exits 2, from every command that opens a store: `python -m store ...`, `python -m extract --store`,
`python -m evaluate ... --store`. No tracebacks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO_ROOT, free_port

INLINE_KEY, INLINE_SECRET = "AKIAINLINEKEY", "inl1ne+secret"
OPTION_KEY, OPTION_SECRET = "AKIAOPTIONKEY", "0pt10n-secret-value"


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without AWS credentials or endpoint, and without the instance metadata service (whose
    look-up for credentials would wait on a network this machine may not have)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return {**env, **extra}


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=180, env=env or clean_env())


def unreachable_options() -> str:
    """Credentials, and an endpoint nobody listens on, tried once with a short connect timeout (a quick test)."""
    return json.dumps({"key": OPTION_KEY, "secret": OPTION_SECRET,
                       "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{free_port()}"},
                       "config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}}})


def assert_one_line(result: subprocess.CompletedProcess, url: str, *says: str) -> None:
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: cannot "), result.stderr
    assert url in line, line
    for words in says:
        assert words in line, line
    for secret in (INLINE_KEY, INLINE_SECRET, OPTION_KEY, OPTION_SECRET):
        assert secret not in result.stdout + result.stderr


def h5_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "h5"
    folder.mkdir()
    with h5py.File(folder / "s.h5", "w") as f:
        f["features"] = np.ones((2, 8), np.float32)
        f["coords"] = np.zeros((2, 2), np.int64)
    return folder


def test_unknown_scheme():
    result = run("store", "info", "foo://bucket/x")
    assert_one_line(result, "foo://bucket/x", "unknown URL scheme 'foo://'", "use a local path")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here")
def test_gs_without_gcsfs():
    result = run("store", "verify", "gs://bucket/x")
    assert_one_line(result, "gs://bucket/x", "gcsfs", "install it")


def test_no_credentials(s3_endpoint):
    result = run("store", "failures", "s3://slidecache-test/x", env=clean_env(AWS_ENDPOINT_URL=s3_endpoint))
    assert_one_line(result, "s3://slidecache-test/x", "no credentials", "AWS_ACCESS_KEY_ID", "--storage-options")


def test_unreachable_endpoint_with_credentials_in_the_url_and_the_options():
    """Key and secret in the URL, a session token in --storage-options: none of them is printed."""
    options = {**json.loads(unreachable_options()), "token": OPTION_SECRET}
    del options["key"], options["secret"]
    result = run("store", "info", f"s3://{INLINE_KEY}:{INLINE_SECRET.replace('+', '%2B')}@slidecache-test/x",
                 "--storage-options", json.dumps(options))
    assert_one_line(result, "s3://slidecache-test/x", "cannot reach", "127.0.0.1", "check the endpoint")


def test_import_h5_into_an_unreachable_store(tmp_path):
    result = run("store", "import-h5", str(h5_folder(tmp_path)), "s3://slidecache-test/imported",
                 "--encoder", "test-encoder", "--storage-options", unreachable_options())
    assert_one_line(result, "s3://slidecache-test/imported", "cannot reach")


def test_extract_into_an_unreachable_store(tmp_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"")  # never read: the store is opened first
    result = run("extract", "--cohort", str(tmp_path / "slides"), "--store", "s3://slidecache-test/x",
                 "--encoder", "virchow2-tiny", "--executor", "local", "--storage-options", unreachable_options())
    assert_one_line(result, "s3://slidecache-test/x", "cannot reach", "check the endpoint")


def test_evaluate_on_a_store_without_credentials(s3_endpoint, tmp_path):
    split = tmp_path / "splits_0.csv"
    split.write_text(",train,val,test\n0,a,,b\n")
    result = run("evaluate", "import-split", str(split), "--store", "s3://slidecache-test/x",
                 "--out", str(tmp_path / "split.csv"), env=clean_env(AWS_ENDPOINT_URL=s3_endpoint))
    assert_one_line(result, "s3://slidecache-test/x", "no credentials", "AWS_SECRET_ACCESS_KEY")


def test_a_secret_holding_a_slash_in_the_url_is_never_printed(tmp_path):
    """AWS secrets hold "/" and "+": `s3://KEY:SE/CRET@bucket/x` typed as is must be used and never shown (urlparse
    alone cuts the host at the first "/" and took the secret for part of the bucket)."""
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"")
    key, secret = "AKIASLASHKEY42", "Super/Secret+x/42"
    env = clean_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1")
    result = run("extract", "--cohort", str(tmp_path / "slides"), "--store", f"s3://{key}:{secret}@slidecache-test/x",
                 "--encoder", "virchow2-tiny", "--executor", "local", env=env)
    assert result.returncode == 2 and "s3://slidecache-test/x" in result.stdout + result.stderr, result.stderr
    for shown in (key, secret, "Super", "Secret"):
        assert shown not in result.stdout + result.stderr, (result.stdout + result.stderr)[-2000:]

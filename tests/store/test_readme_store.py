"""The README's store commands and its Python example, run as printed on the README demo's store
(copies where a command changes it), each in a fresh working directory."""

from __future__ import annotations

import boto3
import h5py
import numpy as np
import pytest

from store import EmbeddingStore
from tests.conftest import s3_options
from tests.readme import python_snippet, run_in_process, to_argv
from tests.store.helpers import spec, write_slide

INFO = "python -m store info STORE [--slide ID] [--list]"
VERIFY = "python -m store verify STORE"
FAILURES = "python -m store failures STORE [--json]"
EXPORT = "python -m store export-h5 STORE DIR"
IMPORT = "python -m store import-h5 DIR STORE --encoder NAME"
RM = "python -m store rm STORE ID... [--force]"
MERGE = "python -m store merge SRC... DST"
SNIPPET = "python: from store import EmbeddingStore"


def run(command: str, cwd, **values: str):
    result = run_in_process(to_argv(command, values), cwd)
    assert "Traceback" not in result.log
    return result


@pytest.mark.readme(INFO)
def test_info(readme_demo, tmp_path):
    result = run(INFO, tmp_path, STORE=readme_demo.store)
    assert result.code == 0 and "100 complete, 0 incomplete, 0 failed" in result.stdout and "fingerprint" in result.stdout


@pytest.mark.readme(VERIFY)
def test_verify(readme_demo, tmp_path):
    result = run(VERIFY, tmp_path, STORE=readme_demo.store)
    assert result.code == 0 and "verified 100 slides: 0 errors" in result.stdout


@pytest.mark.readme(FAILURES)
def test_failures(readme_demo, tmp_path):
    result = run(FAILURES, tmp_path, STORE=readme_demo.store)
    assert result.code == 0 and result.stdout.strip().endswith("0 failed slides")


@pytest.mark.readme(EXPORT)
@pytest.mark.readme(IMPORT)
def test_export_then_import_h5(readme_demo, tmp_path):
    exported = run(EXPORT, tmp_path, STORE=readme_demo.store, DIR="h5")
    assert exported.code == 0 and "wrote 100 .h5 files to h5" in exported.stdout
    with h5py.File(tmp_path / "h5" / "DEMO-P000-S0.h5") as f:
        assert f["features"].shape[1] == EmbeddingStore.open(readme_demo.store).embedding_dim
    imported = run(IMPORT, tmp_path, DIR="h5", STORE="imported.zarr",
                   NAME="virchow2-tiny")
    assert imported.code == 0 and "imported 100 slides into imported.zarr" in imported.stdout
    back = EmbeddingStore.open(str(tmp_path / "imported.zarr")).slide("DEMO-P000-S0")
    np.testing.assert_array_equal(back.embeddings(), EmbeddingStore.open(readme_demo.store).slide("DEMO-P000-S0").embeddings())


@pytest.mark.readme(RM)
def test_rm(readme_demo, tmp_path):
    store = readme_demo.copy_store(tmp_path / "copy.zarr")
    result = run(RM, tmp_path, STORE=store, ID="DEMO-P000-S0")
    assert result.code == 0 and "removed 1 slides" in result.stdout
    assert len(EmbeddingStore.open(store).slide_ids()) == 99


@pytest.mark.readme(MERGE)
def test_merge(readme_demo, tmp_path):
    result = run(MERGE, tmp_path, SRC=readme_demo.store, DST="merged.zarr")
    assert result.code == 0 and "copied 100 slides into merged.zarr" in result.stdout


@pytest.mark.readme(SNIPPET)
def test_the_python_example_on_s3(empty_s3, monkeypatch):
    """The README's snippet, unchanged, on `s3://bucket/...` of the moto server (AWS_* from the environment)."""
    s3_endpoint = empty_s3
    for name, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket="bucket")
    written = EmbeddingStore.create_or_open("s3://bucket/tcga.zarr", kind="slides", spec=spec(),
                                            storage_options=s3_options(s3_endpoint))
    write_slide(written, "TCGA-CR-7395-01Z-00-DX1.ABC", 1000)
    namespace: dict = {}
    exec(python_snippet(SNIPPET), namespace)  # noqa: S102 - our own README
    assert namespace["slide"].n_tiles == 1000 and namespace["store"].slide_ids() == ["TCGA-CR-7395-01Z-00-DX1.ABC"]

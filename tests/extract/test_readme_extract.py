"""The README's extraction commands as printed: `python -m extract` on a cohort table in a fresh working
directory (relative paths inside the table are relative to the table), and `ray job submit` of
`--cohort TCGA` into `s3://bucket/tcga.zarr` on a Ray head the test starts (tests/readme.py)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import boto3
import pytest

from store import EmbeddingStore
from store.verify import verify_store
from tests.conftest import REPO_ROOT
from tests.ray_head import RAY, head_env, ray_head
from tests.readme import run_subprocess, to_argv

EXTRACT = ("python -m extract --cohort SLIDES_OR_TABLE --store STORE [--config configs/extract/virchow2.yaml] "
           "[--encoder NAME] [--weights HUB_ID_OR_FILE] "
           "[--mpp-override X] [--tokens 4x4] [--retry-failed] [--limit N] [--qc-dir DIR] [--encoder-threads N] "
           "[--executor auto|ray|local] [--compile]")
SUBMIT = "ray job submit --working-dir . -- python -m extract --cohort TCGA --store s3://bucket/tcga.zarr"


@pytest.mark.readme(EXTRACT)
@pytest.mark.recipe("extract/virchow2.yaml")  # its batch, read chunk and precision, the tiny encoder's weights
def test_extract_a_cohort_table_from_a_fresh_working_directory(synthetic_slides, tmp_path):
    (tmp_path / "slides").mkdir()
    for name in ("syn0", "syn1"):
        shutil.copy(synthetic_slides / f"{name}.tiff", tmp_path / "slides" / f"{name}.tiff")
    (tmp_path / "cohort.csv").write_text("slide_id,path\nsyn0,slides/syn0.tiff\nsyn1,slides/syn1.tiff\n")
    run = to_argv(EXTRACT, {"SLIDES_OR_TABLE": "cohort.csv", "STORE": "store.zarr"}, tiny_encoder=True)
    run.argv += ["--config", "configs/extract/virchow2.yaml"]  # the recipe itself, not virchow2-tiny.yaml
    result = run_subprocess(run, tmp_path, timeout=600)
    assert result.code == 0 and "Traceback" not in result.log, result.log[-3000:]
    assert "2 done" in result.stdout and "tiles/s" in result.stdout
    store = EmbeddingStore.open(str(tmp_path / "store.zarr"))
    assert store.slide_ids() == ["syn0", "syn1"] and verify_store(store) == []
    assert (tmp_path / "store.zarr.qc" / "summary.md").is_file()  # QC next to a local store by default
    assert not (tmp_path / "cufile.log").exists()


@pytest.mark.readme(SUBMIT)
def test_job_submit_of_the_tcga_cohort_into_s3(synthetic_slides, empty_s3):
    s3_endpoint = empty_s3
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                 region_name="us-east-1").create_bucket(Bucket="bucket")
    # the cluster runs in this environment (its `python` is ours), sees the slides and the S3 endpoint
    cluster = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "TCGA_SLIDES": str(synthetic_slides), "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    with ray_head(env=cluster) as head:
        run = to_argv(SUBMIT, tiny_encoder=True)
        run.argv[0] = RAY
        env = {**head_env(), **cluster, "RAY_ADDRESS": head["dashboard"]}
        result = run_subprocess(run, REPO_ROOT, env=env, timeout=600)
        assert result.code == 0, result.log[-4000:]
        assert "3 done" in result.log and "tiles/s" in result.log and "succeeded" in result.log.lower()
        options = {"key": "x", "secret": "x", "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}
        opened = EmbeddingStore.open("s3://bucket/tcga.zarr", storage_options=options)
        assert opened.slide_ids() == ["syn0", "syn1", "syn2"] and verify_store(opened) == []
        rerun = run_subprocess(run, REPO_ROOT, env=env, timeout=600)
        assert rerun.code == 0 and "0 slides to extract; 3 already complete (nothing re-encoded)" in rerun.log

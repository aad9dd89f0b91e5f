"""Fingerprints hash what changes the numbers; provenance records the rest, without secrets."""

from __future__ import annotations

import os
import subprocess
import sys

from slidecache.provenance import fingerprint, provenance, scrub_secrets, spec_differences
from tests.conftest import REPO_ROOT
from tests.store.helpers import spec


def test_fingerprint_is_order_independent_and_sensitive():
    a = spec()
    b = {"tiling": dict(reversed(list(a["tiling"].items()))), "encoder": a["encoder"]}
    assert fingerprint(a) == fingerprint(b)
    c = spec()
    c["encoder"]["weights_sha256"] = "0" * 64
    assert fingerprint(c) != fingerprint(a)
    assert spec_differences(c, a) == [f"encoder.weights_sha256: store has None, this run has {'0' * 64!r}"]


def test_provenance_records_versions_not_secrets():
    record = provenance({"store": "s3://b/x", "storage_options": {"key": "AKIA", "secret": "s"},
                         "nested": [{"hf_token": "hf_abc"}], "tile_px": 224})
    assert record["packages"]["zarr"] and record["packages"]["numpy"]
    assert record["config"]["tile_px"] == 224
    text = repr(record)
    assert "AKIA" not in text and "hf_abc" not in text and "'s'" not in text
    assert scrub_secrets({"keys_to_sort": 1}) == {"keys_to_sort": 1}
    kept = {"tokens": "4x4", "max_new_tokens": 128, "resampler_tokens": 64, "tokens_per_second": 9.5}
    assert scrub_secrets(kept) == kept  # token counts and grids are settings, and a new slide is encoded from them
    hidden = scrub_secrets({"HF_TOKEN": "a", "access_token": "b", "hub_tokens_secret": "c", "AWS_SECRET_ACCESS_KEY": "d"})
    assert set(hidden.values()) == {"<redacted>"}


def test_credentials_inside_urls_are_redacted_everywhere():
    record = provenance({"store": "s3://AKIAEXAMPLE:wJalrSECRET@bucket/tcga.zarr",
                         "argv": ["--store", "https://user:p4ssw0rd@minio.local:9000/b/x.zarr", "--fold", "0"],
                         "plain": "s3://bucket/no-credentials.zarr", "at_in_path": "/data/a@b/slides"})
    text = repr(record)
    for secret in ("AKIAEXAMPLE", "wJalrSECRET", "p4ssw0rd", "user:"):
        assert secret not in text
    config = record["config"]
    assert config["store"] == "s3://<redacted>@bucket/tcga.zarr"
    assert config["argv"][1] == "https://<redacted>@minio.local:9000/b/x.zarr"
    assert config["plain"] == "s3://bucket/no-credentials.zarr" and config["at_in_path"] == "/data/a@b/slides"


def test_store_imports_neither_torch_nor_ray():
    code = "import store, store.cli, store.h5io, store.verify, store.merge_stores, slidecache.cohorts.slides, slidecache.cohorts.clinical, sys; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'extract', 'train', 'evaluate')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cufile_log_stays_out_of_the_working_directory(tmp_path):
    """cuFile (loaded by cuCIM and CUDA builds of torch) writes cufile.log into the working directory
    unless told where; every process importing our code points it to the temp folder, and none is committed."""
    code = "import os, slidecache; print(os.environ['CUFILE_LOGFILE_PATH'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "CUFILE_LOGFILE_PATH"})
    path = out.stdout.strip()
    assert path.endswith(".log") and not path.startswith(str(tmp_path)) and not (tmp_path / "cufile.log").exists()
    tracked = subprocess.run(["git", "ls-files", "cufile.log"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""

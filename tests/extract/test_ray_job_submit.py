"""`ray job submit --working-dir . -- python -m extract ...` against a real head this test starts and stops,
and the CLI's refusals before any Ray work."""

from __future__ import annotations

import subprocess
import sys

from store import EmbeddingStore
from store.verify import verify_store
from tests.conftest import REPO_ROOT
from tests.ray_head import RAY, head_env, ray_head


def test_job_submit_extracts_into_the_store(synthetic_slides, tmp_path):
    store = tmp_path / "store"
    with ray_head() as head:
        cmd = [RAY, "job", "submit", "--address", head["dashboard"], "--working-dir", str(REPO_ROOT), "--",
               sys.executable, "-m", "extract", "--cohort", str(synthetic_slides), "--store", str(store),
               "--config", "configs/extract/virchow2-tiny.yaml", "--qc-dir", str(tmp_path / "qc")]
        result = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        log = result.stdout + result.stderr
        assert result.returncode == 0, log[-4000:]
        assert "3 done" in log and "tiles/s" in log and "succeeded" in log.lower()
        opened = EmbeddingStore.open(str(store))
        assert opened.slide_ids() == ["syn0", "syn1", "syn2"] and verify_store(opened) == []
        assert (tmp_path / "qc" / "summary.md").is_file() and (tmp_path / "qc" / "slides" / "syn0.png").is_file()
        rerun = subprocess.run(cmd, env=head_env(), capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
        assert rerun.returncode == 0 and "0 slides to extract; 3 already complete (nothing re-encoded)" in rerun.stdout + rerun.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extract", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_refusals_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = run_cli("--cohort", str(tmp_path / "empty"), "--store", str(tmp_path / "s"))
    assert empty.returncode == 2 and "no slides found" in empty.stderr
    unknown = run_cli("--cohort", "NOPE", "--store", str(tmp_path / "s"))
    assert unknown.returncode == 2 and "neither a path nor a named cohort (TCGA" in unknown.stderr
    tcga = run_cli("--cohort", "TCGA", "--store", str(tmp_path / "s"))
    assert tcga.returncode == 2 and "set the variables it names" in tcga.stderr
    bad_cfg = run_cli("--cohort", str(tmp_path / "empty"), "--store", str(tmp_path / "s"), "--tokens", "3x4")
    assert bad_cfg.returncode == 2 and "tokens must look like 4x4" in bad_cfg.stderr
    assert "Traceback" not in empty.stderr + unknown.stderr + tcga.stderr + bad_cfg.stderr


def test_every_extract_config_loads():
    from extract.config import CONFIG_DIR, ExtractConfig

    configs = sorted((CONFIG_DIR / "extract").glob("*.yaml"))
    assert configs
    for path in configs:
        ExtractConfig.from_yaml(path)

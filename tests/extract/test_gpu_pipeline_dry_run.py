"""bench/gpu_pipeline.sh's dry run on CPU (`--device cpu`): every step the GPU run takes (the cohort, the
reading alone, the encoder alone, the pipeline on the single-node executor) on a small cohort, through the
shell script as the bench is run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_gpu_pipeline_dry_run_on_cpu(tmp_path):
    out = tmp_path / "pipeline.json"
    command = ["bash", "bench/gpu_pipeline.sh", "--device", "cpu", "--slides", "2", "--side", "2300",
               "--encoder-seconds", "1", "--no-compile", "--work", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    tiles = (2300 // 256 * 256 // 224) ** 2  # the slide is cut to whole JPEG tiles; all tissue: every tile kept
    assert result["pipeline"]["tiles"] == 2 * tiles and result["reading_alone"]["tiles"] == 2 * tiles
    assert result["config"]["executor"] == "local" and result["config"]["batch_size"] == 32
    for ratio in ("pipeline_over_encoder", "pipeline_over_reading"):
        assert 0 < result[ratio] < 10, result
    assert 0 < result["pipeline"]["encoder_busy_fraction"] <= 1.0
    assert "pipeline ÷ encoder alone" in done.stdout

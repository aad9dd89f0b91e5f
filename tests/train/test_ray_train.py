"""`python -m train --ray_workers 2`: Ray Train runs the same HF Trainer as two data-parallel workers (gloo
on CPU here, one GPU each on a cluster), InternVL's BATCH_SIZE rule counts both workers, and only rank 0
writes the outputs, which load like a one-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from train.checkpoint import read_spec


@pytest.mark.slow
def test_two_ray_train_workers_train_one_model(four_slides, tmp_path):
    out = tmp_path / "ray_run"
    flags = four_slides.flags(out, "--num_train_epochs", "6", "--logging_steps", "1", "--save_strategy", "no")
    env = {**os.environ, "BATCH_SIZE": "4", "PER_DEVICE_BATCH_SIZE": "1"}
    run = subprocess.run([sys.executable, "-m", "train", "--ray_workers", "2", "--ray_use_gpu", "false", *flags],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "Ray Train: 2 workers" in run.stdout and "Ray Train finished" in run.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["encoder_modules_loaded"] == []
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["config"]["training"]["gradient_accumulation_steps"] == 2  # 4 / (2 workers x 1 per device)
    assert summary["steps"] == 6  # 4 samples = one optimiser step of 2 workers x 1 x 2 accumulated, per epoch
    curve = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert curve[-1] < curve[0], curve
    assert read_spec(out).lora_rank == 8 and (out / "adapter" / "adapter_config.json").is_file()

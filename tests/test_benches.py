"""Smoke runs of benches at tiny sizes (the real sizes are minutes to hours, run by hand: bench/RESULTS.md):
bench/slide_encoder_bench.py times the real `extract slide-embeddings` pass and projects to the whole store, and
bench/gpu_train_eval.sh's CPU dry run (`--device cpu`) goes through every step its GPU run takes: both cohorts
prepared at once, the slide-encoder pass time-boxed or not, and the MIL heads of bench/eval_bench.py `--heads`
with their set-up, epochs and scoring apart and the fit at 20 epochs projected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_slide_encoder_bench_times_the_pass_and_projects_the_store(tmp_path):
    out = tmp_path / "slide_encoders.json"
    command = [sys.executable, "bench/slide_encoder_bench.py", "--slides", "3", "--limit", "2", "--area-scale",
               "0.02", "--encoders", "titan-random", "prov-gigapath-slide-random", "--device", "cpu",
               "--cache", str(tmp_path / "cache"), "--json", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["slides"] == 3 and result["provenance"] and "cores" in result["machine"]
    assert [r["encoder"] for r in result["results"]] == ["titan-random", "prov-gigapath-slide-random"]
    for r in result["results"]:
        assert r["device"] == "cpu (fp32)" and r["slides_timed"] == 2 and r["slides_in_store"] == 3
        assert r["s_per_slide"] > 0 and r["slides_per_s"] > 0 and r["tiles_per_s"] > 0 and r["peak_rss_mb"] > 100
        assert r["reencode_over_pass"] > 0 and r["read_incompressible_s"] > 0 and not r["time_boxed"]
        projected = r["projected"]
        assert projected["slides"] == 3 and projected["pass_s"] > r["pass_wall_s"] - r["setup_s"]
    assert "PROJECTED titan-random over all 3 slides" in done.stdout

    again = subprocess.run(command[:-2] + ["--budget-s", "0.001"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=600)  # the stores are reused; each pass stops after its first slide
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "wrote" not in again.stdout and "PROJECTED prov-gigapath-slide-random over all 3 slides (" in again.stdout
    assert "from 1 timed" in again.stdout


def test_gpu_train_eval_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SLIDE_ENCODERS": "titan-random",
           "EVAL_HEADS": "abmil-cox transmil-cox"}
    done = subprocess.run(["bash", "bench/gpu_train_eval.sh", str(tmp_path), "--device", "cpu"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    slides = json.loads((tmp_path / "slide_encoder_bench_cpu.json").read_text())
    assert [r["encoder"] for r in slides["results"]] == ["titan-random"]
    heads = json.loads((tmp_path / "eval_bench_cpu.json").read_text())["heads"]
    assert list(heads) == ["abmil-cox", "transmil-cox"]
    for r in heads.values():
        assert r["epochs"] == 1 and r["folds"] == 5 and 0 <= r["harrell_c"] <= 1
        assert r["fit_5fold_s"] >= r["epochs_s"] + r["scoring_s"] - 1e-6 and r["s_per_epoch"] > 0
        assert r["projected_at_default_epochs"]["fit_5fold_s"] > r["fit_5fold_s"]
    assert "pytest_train_cuda" not in done.stdout  # measured before: skipped unless SKIP says otherwise

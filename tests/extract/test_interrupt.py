"""Ctrl-C during `python -m extract` (SIGINT to the whole foreground process group, as a terminal sends it):
one line saying what happened and what to do, exit 130, no traceback from the driver or its reader processes;
the store stays valid and a rerun finishes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from store import EmbeddingStore
from store.verify import verify_store


def test_ctrl_c_says_rerun_to_resume_and_the_rerun_finishes(synthetic_slides, tmp_path):
    argv = [sys.executable, "-m", "extract", "--cohort", str(synthetic_slides), "--store", "s.zarr",
            "--encoder", "virchow2-tiny", "--executor", "local", "--no-qc"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = ""
    deadline = time.monotonic() + 300
    while "[extract] cohort" not in seen and time.monotonic() < deadline:  # started: the cohort is listed
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    time.sleep(2.0)  # into the reading and encoding
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen + out + err)[-3000:]
    assert "interrupted" in err and "rerun" in err and "Traceback" not in err + out, (out + err)[-3000:]
    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    store = EmbeddingStore.open(str(tmp_path / "s.zarr"))
    assert store.slide_ids() == ["syn0", "syn1", "syn2"] and verify_store(store) == []

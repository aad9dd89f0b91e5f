"""Ctrl-C during `python -m extract` (SIGINT to the whole foreground process group, as a terminal sends it):
one line saying what happened and what to do, exit 130, no traceback from the driver or its reader processes;
the store stays valid and a rerun finishes it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from store import EmbeddingStore
from store.verify import verify_store


def _as_from_a_terminal() -> None:
    """A shell gives its foreground job the default SIGINT action; a test runner's worker may ignore SIGINT, and
    a child inherits that (Python then never raises KeyboardInterrupt). Its own session: the group to signal."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_rerun_to_resume_and_the_rerun_finishes(synthetic_slides, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for copy in range(4):  # 12 slides: work is left when the first one is committed
        for source in sorted(synthetic_slides.glob("*.tiff")):
            shutil.copy(source, slides / f"{source.stem}-{copy}.tiff")
    argv = [sys.executable, "-m", "extract", "--cohort", "slides", "--store", "s.zarr",
            "--encoder", "virchow2-tiny", "--executor", "local", "--no-qc"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    seen = ""
    deadline = time.monotonic() + 300
    while "[extract] done: " not in seen and time.monotonic() < deadline:  # one slide committed, others under way
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (seen + out + err)[-3000:]
    assert "interrupted" in err and "rerun" in err and "Traceback" not in err + out, (out + err)[-3000:]
    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    kept = int(re.search(r"(\d+) already complete", rerun.stdout).group(1))
    assert 1 <= kept < 12, rerun.stdout[-2000:]  # what the interrupted run committed was kept, the rest was not
    store = EmbeddingStore.open(str(tmp_path / "s.zarr"))
    assert len(store.slide_ids()) == 12 and verify_store(store) == []

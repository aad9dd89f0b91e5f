"""Two extraction jobs over the same cohort into one store, forced to overlap: every slide is committed
exactly once, by one job, and none has zero rows. The first job pauses after its first append (a faulty
encoder, tests/extract/faulty_stages.py); the second meets its live leases and reports those slides as owned by
another writer, not as failures. Both jobs join one real Ray head, as two `ray job submit`s would."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import numpy as np

from store import EmbeddingStore
from store.verify import verify_store
from tests.conftest import REPO_ROOT
from tests.extract.faulty_stages import PAUSE_MESSAGE
from tests.ray_head import head_env, ray_head

ROW = re.compile(r"^(\S+)\s+(done|owned|skipped|failed)\s", re.MULTILINE)


def _job(cohort, store, gcs: str, pause: float = 0.0, resume_when: str = "") -> subprocess.Popen:
    """`python -m extract` joining the head; with `pause`, the same run with a pausing encoder (its test entry
    point, tests/extract/faulty_extract.py)."""
    env = {**head_env(), "RAY_ADDRESS": gcs}
    command = ["-m", "extract"]
    if pause:
        command = ["-m", "tests.extract.faulty_extract", "--pause-after-first-append", str(pause),
                   "--resume-when", resume_when]
    return subprocess.Popen([sys.executable, *command, "--cohort", str(cohort), "--store", str(store),
                             "--config", str(REPO_ROOT / "configs" / "extract" / "virchow2-tiny.yaml"), "--no-qc"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_jobs_over_one_cohort_commit_every_slide_once(synthetic_slides, tmp_path):
    store = tmp_path / "store.zarr"
    with ray_head(num_cpus=4) as head:
        resume = tmp_path / "resume"  # the first job holds its leases until the second is done, however slow
        first = _job(synthetic_slides, store, head["gcs"], pause=300, resume_when=str(resume))
        lines: list[str] = []
        paused = threading.Event()

        def read() -> None:
            for line in first.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if PAUSE_MESSAGE in line:
                    paused.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert paused.wait(180), "".join(lines[-40:])
        second = _job(synthetic_slides, store, head["gcs"])
        out_second, _ = second.communicate(timeout=300)
        resume.touch()
        first.wait(timeout=300)
        reader.join(timeout=10)
    out_first = "".join(lines)
    assert first.returncode == 0 and second.returncode == 0, (out_first[-3000:], out_second[-3000:])
    status_first = dict(ROW.findall(out_first))
    status_second = dict(ROW.findall(out_second))
    slides = {p.stem for p in synthetic_slides.glob("*.tiff")}
    assert set(status_first) == set(status_second) == slides
    done_first = {s for s, st in status_first.items() if st == "done"}
    done_second = {s for s, st in status_second.items() if st == "done"}
    assert done_first | done_second == slides and not done_first & done_second  # each slide once
    assert any(st == "owned" for st in status_second.values()), out_second  # it met the paused job's lease
    assert "failed" not in status_first.values() and "failed" not in status_second.values()
    assert "Unhandled error" not in out_first + out_second  # a refused slide's queued commit is answered quietly
    reopened = EmbeddingStore.open(str(store))
    assert reopened.slide_ids() == sorted(slides) and reopened.failures() == {}
    for slide_id in slides:
        emb = reopened.slide(slide_id).embeddings().astype(np.float32)
        assert len(emb) > 0 and (np.abs(emb).sum(axis=1) > 0).all(), slide_id  # no zero rows
    assert verify_store(reopened) == []

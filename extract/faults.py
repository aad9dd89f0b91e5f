"""Fault injection for tests, driven by environment variables that nothing sets in normal use.

    SLIDECACHE_FAULT_KILL_ENCODER_ON=uniform    an encoder process handed a tile of one single colour (which
                                                 no scanned tissue is) exits at once: a crash Ray sees as a
                                                 dead actor (a kill, the OOM killer, a segfault in a kernel)
    SLIDECACHE_FAULT_KILL_READER_ON=TEXT         a reader process reading tiles of a slide whose path contains
                                                 TEXT exits at once (a decoder's segfault, the OOM killer)
    SLIDECACHE_FAULT_PAUSE_AFTER_FIRST_APPEND=S  an encoder actor sleeps S seconds after its first append,
                                                 holding its slides' leases, so a second job over the same
                                                 slides overlaps it
    SLIDECACHE_FAULT_RESUME_WHEN=PATH            ... or until PATH exists, whichever comes first (a test
                                                 resumes it once the second job is done, however slow)

Set for a job's driver, they reach that job's actors (forwarded_faults), wherever Ray starts them.
"""

from __future__ import annotations

import os
import time

import numpy as np

KILL_ENCODER_ON = "SLIDECACHE_FAULT_KILL_ENCODER_ON"
KILL_READER_ON = "SLIDECACHE_FAULT_KILL_READER_ON"
PAUSE_AFTER_FIRST_APPEND = "SLIDECACHE_FAULT_PAUSE_AFTER_FIRST_APPEND"
RESUME_WHEN = "SLIDECACHE_FAULT_RESUME_WHEN"
FAULT_VARIABLES = (KILL_ENCODER_ON, KILL_READER_ON, PAUSE_AFTER_FIRST_APPEND, RESUME_WHEN)


def forwarded_faults() -> dict[str, str]:
    """The fault variables set in this process, to hand to the job's actors as their environment."""
    return {name: os.environ[name] for name in FAULT_VARIABLES if os.environ.get(name)}


def set_faults(values: dict[str, str]) -> None:
    """Make this process's fault variables exactly `values` (a reused process may hold an earlier job's)."""
    for name in FAULT_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(values)


def maybe_kill_encoder(tiles: np.ndarray) -> None:
    if os.environ.get(KILL_ENCODER_ON) != "uniform":
        return
    flat = tiles.reshape(len(tiles), -1, tiles.shape[-1])
    if len(tiles) and bool(((flat == flat[:, :1]).all(axis=(1, 2))).any()):
        os._exit(17)  # no cleanup: what a SIGKILL or the OOM killer leaves


def maybe_kill_reader(path: str) -> None:
    text = os.environ.get(KILL_READER_ON)
    if text and text in path:
        os._exit(18)


def pause_after_first_append(log) -> None:
    seconds = float(os.environ.get(PAUSE_AFTER_FIRST_APPEND, "0") or 0)
    if seconds > 0:
        log(f"[extract] fault injection: pausing {seconds:.0f} s after the first append ({PAUSE_AFTER_FIRST_APPEND})",
            flush=True)
        resume = os.environ.get(RESUME_WHEN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
            time.sleep(0.2)

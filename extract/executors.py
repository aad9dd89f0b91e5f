"""Where the extraction's stages run (extract.stages: the stages and the Executor seam). An executor runs them
and hands back futures:

- `RayExecutor` (extract/ray_executor.py): Ray tasks and actors, on one machine or a cluster (`ray job submit`);
  an encoder actor that dies is restarted by Ray and the driver writes its slides again (extract/job.py).
- `LocalExecutor` (extract/local_executor.py): one machine without Ray: readers in a pool of processes, each
  encoder on a thread of the driver; no Ray start-up. A crash of the encoder ends the run; slides already
  committed stay committed and a rerun resumes.

`executor_session(cfg)` picks one (`cfg.executor`; auto: Ray under `ray job submit` or with several GPUs,
else local; see resolve_executor).
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from typing import Iterator

from extract.config import ExtractConfig
from extract.local_executor import LocalExecutor
from extract.ray_executor import lazy_ray_session
from extract.stages import Executor, Stages
from slidecache.devices import visible_gpus
from slidecache.errors import ConfigError


def resolve_executor(name: str) -> str:
    """auto: Ray for a cluster (RAY_ADDRESS, as `ray job submit` sets) and for several GPUs (an actor per GPU,
    restarted if it dies); otherwise, on one machine with at most one GPU, or where Ray is not installed,
    the local executor (no Ray start-up to wait for: bench/RESULTS.md)."""
    has_ray = importlib.util.find_spec("ray") is not None
    if name == "auto":
        if os.environ.get("RAY_ADDRESS"):
            name = "ray"
        else:
            return "ray" if has_ray and visible_gpus() > 1 else "local"
    if name == "ray" and not has_ray:
        raise ConfigError("Ray is not installed here (asked for by --executor ray or RAY_ADDRESS); install the "
                          "project (make install) or use --executor local (one machine, no Ray)")
    return name


@contextmanager
def executor_session(cfg: ExtractConfig, stages: Stages = Stages()) -> Iterator[Executor]:
    """The executor `cfg.executor` names, running `stages`, started for a `with` block and stopped after it."""
    if resolve_executor(cfg.executor) == "ray":
        with lazy_ray_session(cfg, stages) as ray_executor:
            yield ray_executor
        return
    executor = LocalExecutor(cfg, **stages._asdict())
    try:
        yield executor
    finally:
        executor.shutdown()

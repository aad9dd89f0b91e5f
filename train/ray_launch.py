"""Training over several nodes with Ray Train: one worker per GPU anywhere in the cluster, each running the
same HF Trainer as a torchrun process would. Ray Train starts the workers, sets up the torch process group
and the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR); the Trainer finds it and wraps
the model in DDP. Every worker reads the store and writes nothing but rank 0's outputs, so `--store` and
`--output_dir` must be reachable from every node (object storage, or a shared file system).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from slidecache.errors import ConfigError
from slidecache.ray_connect import ray_connection

BATCH_ENV = ("BATCH_SIZE", "PER_DEVICE_BATCH_SIZE")


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    os.environ.update(config["env"])
    os.environ["GPUS"] = os.environ["WORLD_SIZE"]  # InternVL's accumulation rule counts every worker
    from train.config import parse_args
    from train.run import train

    argv = list(config["argv"])
    if not config["use_gpu"]:
        argv += ["--use_cpu", "True"]  # without it the Trainer ignores a gloo process group on CPU workers
    result = train(*parse_args(argv))
    ray.train.report({"train_loss": result.summary["train_loss"], "steps": result.summary["steps"]})


def resolve_use_gpu(choice: str, workers: int) -> bool:
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if choice == "auto":
        return gpus >= workers
    if choice == "true" and gpus < workers:
        raise ConfigError(f"--ray_use_gpu true: {workers} workers need {workers} GPUs, the cluster has {gpus:g}")
    return choice == "true"


def train_on_ray(argv: Sequence[str], workers: int, output_dir: str, address: str | None = None,
                 use_gpu: str = "auto") -> dict[str, Any]:
    """Run `python -m train ARGV` as `workers` data-parallel Ray Train workers; returns the reported metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 1:
        raise ConfigError(f"--ray_workers {workers}: give at least one worker")
    with ray_connection(address or os.environ.get("RAY_ADDRESS") or None, join_running=True):
        gpu = resolve_use_gpu(use_gpu, workers)
        scaling = ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": 1} | ({"GPU": 1} if gpu else {}))
        env = {k: os.environ[k] for k in BATCH_ENV if k in os.environ}
        print(f"Ray Train: {workers} workers ({'one GPU each' if gpu else 'CPU, gloo'}) on {ray.cluster_resources()}",
              flush=True)
        trainer = TorchTrainer(_worker_loop, train_loop_config={"argv": list(argv), "env": env, "use_gpu": gpu},
                               scaling_config=scaling,
                               run_config=RunConfig(name="slidecache-train",
                                                    storage_path=str(Path(output_dir).resolve() / "ray_train")))
        result = trainer.fit()
        return dict(result.metrics or {})

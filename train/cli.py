"""`python -m train [InternVL finetune flags]`: parse, then train here, under torchrun (GPUS > 1 on this
node, as InternVL's scripts) or on a Ray cluster with Ray Train (`--ray_workers N`, several nodes)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Sequence

from slidecache.cli_args import guarded


def launch_distributed(argv: Sequence[str]) -> int | None:
    """GPUS=N (N > 1) outside torchrun: re-run this command under torchrun with N processes, as InternVL's
    shell scripts do. Returns the exit code, or None when this process should train itself."""
    gpus = int(os.environ.get("GPUS", "1"))
    if gpus <= 1 or "LOCAL_RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
               f"--master_port={os.environ.get('MASTER_PORT', '29500')}", "-m", "train", *argv]
    print("launching:", " ".join(command), flush=True)
    return subprocess.call(command)


def launcher_flags(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own flags, taken out before the training flags are parsed."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ray_workers", type=int, default=0,
                        help="train with Ray Train on this many workers (one GPU each when the cluster has them)")
    parser.add_argument("--ray_address", default=None, help="the cluster (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--ray_use_gpu", default="auto", choices=["auto", "true", "false"])
    return parser.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    launch, argv = launcher_flags(sys.argv[1:] if argv is None else argv)
    return guarded(lambda: _train(launch, argv))


def _train(launch: argparse.Namespace, argv: list[str]) -> int:
    from train.config import parse_args

    model_args, data_args, training_args = parse_args(argv)  # validate everything before starting workers
    if launch.ray_workers:
        from train.ray_launch import train_on_ray

        metrics = train_on_ray(argv, launch.ray_workers, training_args.output_dir, launch.ray_address,
                               launch.ray_use_gpu)
        print(f"Ray Train finished: {metrics}")
        return 0
    code = launch_distributed(argv)
    if code is not None:
        return code
    from train.run import train

    train(model_args, data_args, training_args)
    return 0

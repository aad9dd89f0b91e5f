"""`python -m train [InternVL finetune flags]`: parse, relaunch under torchrun when GPUS > 1, train."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from store.errors import SlidecacheError


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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from train.config import parse_args

        model_args, data_args, training_args = parse_args(argv)
        code = launch_distributed(argv)
        if code is not None:
            return code
        from train.run import train

        train(model_args, data_args, training_args)
    except SlidecacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

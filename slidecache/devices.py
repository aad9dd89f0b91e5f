"""The torch device a command runs on, chosen at run time: `auto` takes CUDA when one is visible."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from slidecache.errors import ConfigError

if TYPE_CHECKING:
    import torch


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(name: str = "auto") -> "torch.device":
    import torch  # store itself does not need torch; only the commands that compute do

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is visible (use --device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a torch device (auto, cpu, cuda, cuda:1 ...)") from e

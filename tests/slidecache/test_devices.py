"""Device choice at run time: auto takes CUDA when visible; an unusable name is a ConfigError saying what to use."""

from __future__ import annotations

import pytest
import torch

from slidecache.devices import pick_device
from slidecache.errors import ConfigError


def test_auto_follows_cuda_visibility():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible here")
def test_cuda_without_a_gpu_says_what_to_use():
    with pytest.raises(ConfigError, match="no CUDA device is visible.*--device cpu"):
        pick_device("cuda:0")


def test_unknown_device_name():
    with pytest.raises(ConfigError, match="not a torch device"):
        pick_device("gpu7")

"""Precision reaches the Accelerator: it is decided before TrainingArguments is built, and the manifest
records what the Accelerator really uses (setting `bf16` on built arguments changed nothing but the
manifest, so GPU runs computed in fp32 while saying bf16)."""

from __future__ import annotations

import json

import pytest
import torch

from train.config import parse_args
from train.run import train


def test_bf16_asked_on_the_cpu_is_what_the_accelerator_runs(four_slides, tmp_path):
    out = tmp_path / "bf16"
    result = train(*parse_args(four_slides.flags(out, "--bf16", "True", "--max_steps", "2", "--save_strategy", "no")))
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["config"]["training"]["bf16"] is True
    assert manifest["precision"]["accelerator_mixed_precision"] == "bf16"
    assert manifest["precision"]["device"] == "cpu" or torch.cuda.is_available()
    assert result.summary["steps"] == 2


def test_precision_flags_given_are_kept():
    from train.config import precision_defaults

    assert "bf16" not in precision_defaults(["--fp16", "True"], {})
    assert "bf16" not in precision_defaults(["--bf16=False"], {})
    assert "bf16" not in precision_defaults([], {"bf16": False})
    if not torch.cuda.is_available():
        assert precision_defaults([], {}) == {"use_cpu": True}
        assert precision_defaults(["--use_cpu", "False"], {}) == {}


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a CUDA GPU with bf16")
def test_bf16_is_chosen_automatically_on_a_gpu_that_supports_it(four_slides, tmp_path):
    out = tmp_path / "auto"
    train(*parse_args(four_slides.flags(out, "--max_steps", "1", "--save_strategy", "no")))
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["config"]["training"]["bf16"] is True
    assert manifest["precision"]["accelerator_mixed_precision"] == "bf16"
    assert manifest["precision"]["device"].startswith("cuda")

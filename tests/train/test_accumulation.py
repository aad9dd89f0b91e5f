"""Gradient accumulation and data parallelism change neither the loss nor the gradient.

One optimiser step over the same four samples, whose answers are about 5 and 60 tokens long, taken as
(batch 4, accumulation 1), (batch 1, accumulation 4), and by 2 Ray Train gloo workers x (batch 1,
accumulation 2): the logged loss and gradient norm agree within 1%. HF Trainer hands the model
`num_items_in_batch` and then leaves the loss unscaled, so a model that ignored the count summed
per-micro-batch means (about 4x the loss, and the long answers under-weighted). The Ray run goes on for
more steps and checks what a Ray Train run writes: world size, accumulation, rank-0-only outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from train.checkpoint import read_spec
from train.config import parse_args
from train.run import train

SHORT = "Grade G1."
LONG = ("Invasive ductal carcinoma with moderately pleomorphic nuclei arranged in solid nests and cords, "
        "infiltrating the surrounding desmoplastic stroma; mitoses are frequent, there is focal necrosis and "
        "lymphovascular invasion is present. Tumour grade: G3. Prognosis: high risk.")


@pytest.fixture(scope="module")
def unequal_answers(four_slides, tmp_path_factory) -> Path:
    """The four slides' annotations with two short and two long answers."""
    root = tmp_path_factory.mktemp("unequal")
    rows = [json.loads(line) for line in four_slides.annotations.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["conversations"][1]["value"] = SHORT if i % 2 == 0 else LONG
    annotations = root / "annotations.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"unequal": {"root": "", "annotation": str(annotations), "data_augment": False,
                                            "repeat_time": 1, "length": len(rows)}}))
    return meta


def _flags(inputs, meta: Path, out: Path, batch: int, accumulation: int, *extra: str) -> list[str]:
    return ["--config", "tiny.yaml", "--meta_path", str(meta), "--store", inputs.store, "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "True", "--lora_dropout", "0", "--logging_steps", "1",
            "--save_strategy", "no", "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", str(accumulation), *extra]


def _first_step(log_history: list[dict]) -> tuple[float, float]:
    first = next(h for h in log_history if h.get("step") == 1 and "loss" in h)
    return float(first["loss"]), float(first["grad_norm"])


RAY_TRAIN = "PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=128 python -m train --ray_workers 16 ..."


@pytest.mark.readme(RAY_TRAIN)  # --ray_workers 2 gloo, BATCH_SIZE=4 on the four samples (tests/readme.py)
def test_loss_and_gradient_do_not_depend_on_how_the_batch_is_split(four_slides, unequal_answers, tmp_path):
    from train.tokenizer import offline_qwen2_tokenizer

    tokenizer = offline_qwen2_tokenizer()
    assert len(tokenizer(SHORT).input_ids) <= 6 and len(tokenizer(LONG).input_ids) >= 55
    one_step = ("--learning_rate", "0", "--max_steps", "1")
    whole = train(*parse_args(_flags(four_slides, unequal_answers, tmp_path / "b4", 4, 1, *one_step)))
    split = train(*parse_args(_flags(four_slides, unequal_answers, tmp_path / "b1a4", 1, 4, *one_step)))
    loss_whole, norm_whole = _first_step(whole.summary["log_history"])
    loss_split, norm_split = _first_step(split.summary["log_history"])
    assert loss_split == pytest.approx(loss_whole, rel=0.01), (loss_whole, loss_split)
    assert norm_split == pytest.approx(norm_whole, rel=0.01), (norm_whole, norm_split)

    # 2 Ray Train workers x (batch 1, accumulation 2) through InternVL's BATCH_SIZE rule; step 1's loss and
    # gradient norm are taken before the first update, so the later steps may learn.
    out = tmp_path / "ray"
    flags = _flags(four_slides, unequal_answers, out, 1, 1, "--num_train_epochs", "4", "--learning_rate", "0.01")
    env = {**os.environ, "BATCH_SIZE": "4", "PER_DEVICE_BATCH_SIZE": "1"}
    run = subprocess.run([sys.executable, "-m", "train", "--ray_workers", "2", "--ray_use_gpu", "false", *flags],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    assert "Ray Train: 2 workers" in run.stdout and "Ray Train finished" in run.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert summary["world_size"] == 2 == manifest["world_size"] and summary["encoder_modules_loaded"] == []
    assert manifest["config"]["training"]["gradient_accumulation_steps"] == 2  # 4 / (2 workers x 1 per device)
    assert summary["steps"] == 4  # 4 samples = one optimiser step of 2 workers x 1 x 2 accumulated, per epoch
    loss_ray, norm_ray = _first_step(summary["log_history"])
    assert loss_ray == pytest.approx(loss_whole, rel=0.01), (loss_whole, loss_ray)
    assert norm_ray == pytest.approx(norm_whole, rel=0.01), (norm_whole, norm_ray)
    curve = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert curve[-1] < curve[0], curve
    assert read_spec(out).lora_rank == 8 and (out / "adapter" / "adapter_config.json").is_file()


def test_training_loss_from_supervised_positions_equals_the_llms_own(four_slides, unequal_answers, tmp_path):
    """Training computes logits only where a label is predicted; the loss (and its count normalisation)
    must equal the LLM's own ForCausalLMLoss over the full logits."""
    import torch

    from train.data import Collator
    from train.run import setup

    ready = setup(*parse_args(_flags(four_slides, unequal_answers, tmp_path / "x", 4, 1)))
    batch = Collator(ready.loaded.tokenizer.pad_token_id)([ready.train_dataset[i] for i in range(4)])
    model = ready.model
    with torch.no_grad():
        fast = model.train()(**batch).loss
        full = model.eval()(**batch).loss
        count = int((batch["labels"][:, 1:] != -100).sum())
        fast_n = model.train()(**batch, num_items_in_batch=2 * count).loss
        full_n = model.eval()(**batch, num_items_in_batch=2 * count).loss
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_n, full_n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_n, fast / 2, rtol=1e-5, atol=1e-6)

"""The README's training block, command after command in one fresh working directory, on the README demo's
store: annotations → the InternVL2-1B LoRA recipe at its own settings (batch 4, accumulation 4, 4 loader
workers) → the same under `GPUS=2` torchrun (gloo) → generation for the held-out fold → merge → report
metrics. The recipe's hub id becomes a saved random-init tiny Qwen2 (tests/readme.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.readme import run_in_process, run_subprocess, to_argv
from train.checkpoint import read_spec

ANNOTATIONS = ("python -m train.annotations --store STORE --clinical TABLE [--reports texts.jsonl] [--endpoint OS] "
               "[--split splits.csv --fold 0] [--risk-groups 3] --out annotations.jsonl --meta meta.json")
TRAIN = ("python -m train --config configs/train/internvl2-1b-lora.yaml --meta_path meta.json --store STORE "
         "--output_dir runs/r1 [--split splits.csv --fold 0] [--max_tiles 256] [--resume_from_checkpoint DIR]")
TORCHRUN = "GPUS=8 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=128 python -m train ..."
GENERATE = ("python -m train.generate --checkpoint runs/r1 --store STORE --meta_path meta.json --split splits.csv --fold 0 "
            "[--batch_size 8] [--max_new_tokens 128] [--do_sample --temperature 0.7 --top_p 0.9] --out gen.jsonl")
MERGE = "python -m train.merge --checkpoint runs/r1 --out runs/r1-merged"
REPORT = "python -m evaluate report --predictions gen.jsonl --references annotations.jsonl --clinical TABLE"
GROUNDING = ("python -m evaluate report --predictions gen.jsonl --references annotations.jsonl --checkpoint runs/r1 "
             "--store STORE")


def _ok(result) -> None:
    assert result.code == 0 and "Traceback" not in result.log, result.log[-3000:]


@pytest.mark.readme(ANNOTATIONS)
@pytest.mark.readme(TRAIN)
@pytest.mark.readme(TORCHRUN)
@pytest.mark.readme(GENERATE)
@pytest.mark.readme(MERGE)
@pytest.mark.readme(REPORT)
@pytest.mark.readme(GROUNDING)
@pytest.mark.recipe("internvl2-1b-lora.yaml")
def test_the_training_block_in_order(readme_demo, saved_tiny_llm, tmp_path):
    values = {"STORE": readme_demo.store, "TABLE": str(readme_demo.out / "clinical.csv")}
    shutil.copy(readme_demo.out / "splits.csv", tmp_path / "splits.csv")  # made by `python -m evaluate split`

    _ok(result := run_in_process(to_argv(ANNOTATIONS, values), tmp_path))
    assert "wrote 100 annotations to annotations.jsonl" in result.stdout and (tmp_path / "meta.json").is_file()

    train = to_argv(TRAIN, values, llm_dir=saved_tiny_llm)
    _ok(run_in_process(train, tmp_path))
    manifest = json.loads((tmp_path / "runs" / "r1" / "run_manifest.json").read_text())
    recipe = manifest["config"]["training"]
    assert (recipe["per_device_train_batch_size"], recipe["gradient_accumulation_steps"]) == (4, 4)  # its own settings
    assert recipe["dataloader_num_workers"] == 4 and manifest["config"]["model"]["use_llm_lora"] == 16
    summary = json.loads((tmp_path / "runs" / "r1" / "train_summary.json").read_text())
    assert summary["steps"] >= 1 and manifest["llm_source"] == saved_tiny_llm

    _ok(result := run_subprocess(to_argv(TORCHRUN, dots=train.args), tmp_path, timeout=600))
    assert "torch.distributed.run --nproc_per_node=2" in result.stdout
    manifest = json.loads((tmp_path / "runs" / "r1" / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["training"]["gradient_accumulation_steps"] == 16  # 128 / (2 x 4)

    _ok(result := run_in_process(to_argv(GENERATE, values), tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    held_out = {line.split(",")[0] for line in (tmp_path / "splits.csv").read_text().splitlines()[1:]
                if line.endswith(",0")}
    assert rows and {r["patient_id"] for r in rows} <= held_out

    _ok(run_in_process(to_argv(MERGE), tmp_path))
    assert (tmp_path / "runs" / "r1-merged" / "llm" / "config.json").is_file()
    assert read_spec(tmp_path / "runs" / "r1-merged").lora_rank == 0

    _ok(result := run_in_process(to_argv(REPORT, values), tmp_path))
    assert f"{len(rows)} generated reports vs references" in result.stdout

    # the grounding check of that run (one epoch of a random LLM: whatever its verdict, it is printed and named)
    _ok(result := run_in_process(to_argv(GROUNDING, values), tmp_path))
    assert "held-out reports regenerated; verdict: " in result.stdout and "swapped slide  states the donor's grade" \
        in result.stdout, result.stdout[-2000:]

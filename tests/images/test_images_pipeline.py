"""InternVL-format image datasets end to end: `python -m extract images` (a local Ray, the tiny encoder)
caches per-tile 16x16 token grids, records unreadable and missing images without stopping, and skips
what is done on a rerun; training folds each grid by pixel shuffle into 64 tokens per tile, exactly as
many as the prompt reserves; a forward pass from the cache equals one with the encoder run live on the
same image; the README's image block runs as printed (tests/readme.py): the InternVL2-1B + Virchow-2 LoRA
recipe under `GPUS=2` torchrun, generation from the cache and, with `--image`, from a new file (the same
answer), and the caption metrics; both image recipes take one optimiser step at their own settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from extract.dynamic_tiling import choose_layout
from slidecache.cohorts.ids import image_key
from slidecache.errors import AnnotationError, ConfigError
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.images.helpers import IMAGES, write_dataset
from tests.readme import run_in_process, run_subprocess, to_argv
from train.config import parse_args
from train.data import Collator
from train.live_image import encode_image
from train.run import setup, train
from train.tokenizer import IMG_CONTEXT

pytestmark = pytest.mark.xdist_group("test_images_pipeline")  # its module fixture is built once, on one worker

TINY = str(REPO_ROOT / "configs" / "extract" / "virchow2-tiny.yaml")
EXTRACT = ("python -m extract images --meta_path meta.json --store images.zarr [--config configs/extract/virchow2.yaml] "
           "[--max_dynamic_patch 6] [--min_dynamic_patch 1] [--use_thumbnail True] [--tokens 8x8]")
TRAIN = ("GPUS=8 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=16 python -m train --config "
         "configs/train/images-internvl2-1b-lora.yaml --meta_path meta.json --store images.zarr "
         "--output_dir runs/caption-lora")
GENERATE = ("python -m train.generate --checkpoint runs/caption-lora --store images.zarr --meta_path test_meta.json "
            "--out gen.jsonl")
ANSWER = ('python -m train.generate --checkpoint runs/caption-lora --store images.zarr --image new.png --prompt '
          '"Describe this image."')
REPORT = "python -m evaluate report --predictions gen.jsonl --references test_captions.jsonl"


def extract_images(meta, store):
    return subprocess.run([sys.executable, "-m", "extract", "images", "--meta_path", str(meta), "--store", str(store),
                           "--config", TINY], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """The README's extraction command in the dataset's folder (with a missing and a corrupt image)."""
    root = tmp_path_factory.mktemp("images")
    write_dataset(root / "with_bad", bad=True)
    first = run_subprocess(to_argv(EXTRACT, tiny_encoder=True), root / "with_bad", timeout=600)
    store = root / "with_bad" / "images.zarr"
    meta = write_dataset(root / "clean")  # same dataset name and image names: the same store keys
    (root / "clean" / "images.zarr").symlink_to(store)
    return root, meta, store, first


@pytest.mark.readme(EXTRACT)
def test_extract_images_records_bad_images_and_reruns_skip(cached):
    root, _, store, first = cached
    assert first.code == 1, first.stderr[-2000:]  # failures are reported in the exit code, not raised
    assert "6 images encoded" in first.stdout and "2 failed" in first.stdout
    assert "missing.png: file not found (named at" in first.stdout and "captions.jsonl, line 7" in first.stdout
    assert "corrupt.png: not a readable image" in first.stdout
    opened = EmbeddingStore.open(str(store))
    assert opened.kind == "images" and opened.spec["tokens"]["grid_shape"] == [256, 64]
    assert set(opened.failures()) == {image_key("he_captions", "missing.png"), image_key("he_captions", "corrupt.png")}
    for name, width, height, _ in IMAGES:
        view = opened.slide(image_key("he_captions", name))
        layout = choose_layout(width, height, 1, 6)
        assert view.attrs["layout"] == {"cols": layout.cols, "rows": layout.rows, "thumbnail": layout.thumbnail}
        assert view.tokens().shape == (layout.n_tiles, 256, 64) and view.attrs["image_size"] == [width, height]
    again = extract_images(root / "clean" / "meta.json", store)
    assert again.returncode == 0 and "0 images encoded" in again.stdout and "6 already complete" in again.stdout
    assert "no encoder started" in again.stdout  # the fingerprint checked from the config alone


def flags(meta, store, out, *extra):
    return ["--config", "tiny.yaml", "--meta_path", str(meta), "--store", str(store), "--output_dir", str(out),
            "--report_to", "none", "--disable_tqdm", "True", "--max_seq_length", "1024", *extra]


def test_visual_tokens_fill_exactly_the_reserved_prompt_positions(cached, tmp_path):
    _, meta, store, _ = cached
    ready = setup(*parse_args(flags(meta, store, tmp_path / "run")))
    assert ready.spec.embedding_dim == 4 * 64  # pixel shuffle: 4 x the patch-token width
    context = ready.loaded.tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
    for index, sample in enumerate(ready.train_dataset.samples):
        item = ready.train_dataset[index]
        width, height = next((w, h) for n, w, h, _ in IMAGES if sample.meta["image"] == n)
        tiles = choose_layout(width, height, 1, 6).n_tiles
        assert len(item["tiles"]) == tiles * 64 == item["input_ids"].count(context)


def test_forward_from_the_cache_equals_the_encoder_run_live(cached, tmp_path):
    root, meta, store, _ = cached
    ready = setup(*parse_args(flags(meta, store, tmp_path / "run")))
    index = next(i for i, s in enumerate(ready.train_dataset.samples) if s.meta["image"] == "large.jpg")
    item = ready.train_dataset[index]
    live = encode_image(root / "clean" / "images" / "large.jpg", EmbeddingStore.open(str(store)))
    np.testing.assert_array_equal(live, item["tiles"])  # same fp16 grids: bit for bit
    collate = Collator(ready.loaded.tokenizer.pad_token_id)
    model = ready.model.eval()
    with torch.no_grad():
        cached_logits = model(**collate([item])).logits
        live_logits = model(**collate([item | {"tiles": live}])).logits
    torch.testing.assert_close(live_logits, cached_logits)


def test_training_from_the_cache_learns_the_captions_and_a_new_image_gets_the_cached_answer(cached, tmp_path):
    from train.generation import answer_image, generate_reports

    root, meta, store, _ = cached
    out = tmp_path / "run"
    result = train(*parse_args(flags(meta, store, out, "--num_train_epochs", "12", "--logging_steps", "3")))
    curve = [h["loss"] for h in result.summary["log_history"] if "loss" in h]
    assert curve[-1] < 0.7 * curve[0], curve
    generate_reports(str(out), str(store), str(meta), tmp_path / "gen.jsonl", max_new_tokens=12)
    rows = {r["image"]: r for r in map(json.loads, (tmp_path / "gen.jsonl").read_text().splitlines())}
    live = answer_image(str(out), str(root / "clean" / "images" / "wide.png"), str(store), max_new_tokens=12)
    assert live and live == rows["wide.png"]["text"]  # encoded now or read from the cache: the same answer


@pytest.mark.recipe("images-internvl2-1b-lora.yaml")
@pytest.mark.recipe("images-internvl2-1b-full.yaml")
@pytest.mark.parametrize("recipe", ["images-internvl2-1b-lora.yaml", "images-internvl2-1b-full.yaml"])
def test_each_image_recipe_takes_a_step_at_its_own_settings(cached, saved_tiny_llm, recipe, tmp_path):
    _, meta, store, _ = cached
    out = tmp_path / "run"
    result = train(*parse_args(["--config", recipe, "--meta_path", str(meta), "--store", str(store),
                                "--output_dir", str(out), "--llm_path", saved_tiny_llm]))
    manifest = json.loads((out / "run_manifest.json").read_text())
    settings = manifest["config"]["training"]
    assert (settings["per_device_train_batch_size"], settings["gradient_accumulation_steps"]) == (4, 4)
    assert result.summary["steps"] == 1 and manifest["precision"]["accelerator_mixed_precision"] in ("no", "bf16")
    full = recipe.endswith("full.yaml")
    assert (manifest["config"]["model"]["use_llm_lora"] == 0) == full
    assert manifest["parameters"]["trainable"] > (0.5 if full else 0) * manifest["parameters"]["total"]


@pytest.mark.readme(TRAIN)
@pytest.mark.readme(GENERATE)
@pytest.mark.readme(ANSWER)
@pytest.mark.readme(REPORT)
def test_the_readme_image_block_in_order(cached, saved_tiny_llm):
    root, _, _, _ = cached
    here = root / "clean"
    shutil.copy(here / "meta.json", here / "test_meta.json")
    shutil.copy(here / "captions.jsonl", here / "test_captions.jsonl")
    shutil.copy(here / "images" / "wide.png", here / "new.png")
    trained = run_subprocess(to_argv(TRAIN, llm_dir=saved_tiny_llm), here, timeout=600)
    assert trained.code == 0, trained.log[-3000:]
    assert "torch.distributed.run --nproc_per_node=2" in trained.stdout
    manifest = json.loads((here / "runs" / "caption-lora" / "run_manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["config"]["training"]["gradient_accumulation_steps"] == 2  # 16 / (2 x 4)

    generated = run_in_process(to_argv(GENERATE), here)
    assert generated.code == 0, generated.log[-2000:]
    rows = {r["image"]: r for r in map(json.loads, (here / "gen.jsonl").read_text().splitlines())}
    assert set(rows) == {name for name, *_ in IMAGES} and all(r["reference"] for r in rows.values())

    answered = run_in_process(to_argv(ANSWER), here)
    assert answered.code == 0, answered.log[-2000:]
    answer = answered.stdout.strip().splitlines()
    assert (answer[-1] if answer else "") == rows["wide.png"]["text"]  # same prompt and tokens, same greedy answer

    scored = run_in_process(to_argv(REPORT), here)  # pycocoevalcap, as InternVL's caption eval
    assert scored.code == 0 and "6 generated reports vs references" in scored.stdout
    assert all(key in scored.stdout for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))


def test_refusals_name_the_problem(cached, tmp_path):
    root, meta, store, _ = cached
    augmented = json.loads(meta.read_text())
    augmented["he_captions"]["data_augment"] = True
    (tmp_path / "aug.json").write_text(json.dumps(augmented))
    with pytest.raises(AnnotationError, match="data_augment: true cannot apply to cached tokens"):
        setup(*parse_args(flags(tmp_path / "aug.json", store, tmp_path / "a")))
    with pytest.raises(ConfigError, match="--max_dynamic_patch 12: the images store was tiled with max_dynamic_patch = 6"):
        setup(*parse_args(flags(meta, store, tmp_path / "b", "--max_dynamic_patch", "12")))
    with pytest.raises(ConfigError, match="force_image_size 448.*Virchow-2 reads 224 px tiles"):
        setup(*parse_args(flags(meta, store, tmp_path / "c", "--force_image_size", "448")))
    run = extract_images(tmp_path / "aug.json", tmp_path / "never.zarr")
    assert run.returncode == 2 and "data_augment: true" in run.stderr

"""InternVL-format image datasets end to end: `python -m extract images` (a local Ray, the tiny encoder)
caches per-tile 16x16 token grids, records unreadable and missing images without stopping, and skips
what is done on a rerun; training folds each grid by pixel shuffle into 64 tokens per tile, exactly as
many as the prompt reserves; a forward pass from the cache equals one with the encoder run live on the
same image; `python -m train.generate` answers from the cache and, with `--image`, from a new file."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluate.report_metrics import score_reports
from extract.dynamic_tiling import choose_layout
from store import EmbeddingStore
from store.errors import AnnotationError, ConfigError
from store.ids import image_key
from tests.conftest import REPO_ROOT
from tests.images.helpers import IMAGES, write_dataset
from train.config import parse_args
from train.data import Collator
from train.live_image import encode_image
from train.run import setup, train
from train.tokenizer import IMG_CONTEXT

TINY = str(REPO_ROOT / "configs" / "extract" / "virchow2-tiny.yaml")


def extract_images(meta, store):
    return subprocess.run([sys.executable, "-m", "extract", "images", "--meta_path", str(meta), "--store", str(store),
                           "--config", TINY], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    meta_bad = write_dataset(root / "with_bad", bad=True)
    store = root / "images.zarr"
    first = extract_images(meta_bad, store)
    meta = write_dataset(root / "clean")  # same dataset name and image names: the same store keys
    return root, meta, store, first


def test_extract_images_records_bad_images_and_reruns_skip(cached):
    root, _, store, first = cached
    assert first.returncode == 1, first.stderr[-2000:]  # failures are reported in the exit code, not raised
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


def test_train_then_answer_from_the_cache_and_from_a_new_image(cached, tmp_path):
    root, meta, store, _ = cached
    out = tmp_path / "run"
    result = train(*parse_args(flags(meta, store, out, "--num_train_epochs", "12", "--logging_steps", "3")))
    curve = [h["loss"] for h in result.summary["log_history"] if "loss" in h]
    assert curve[-1] < 0.7 * curve[0], curve
    generated = tmp_path / "gen.jsonl"
    run = subprocess.run([sys.executable, "-m", "train.generate", "--checkpoint", str(out), "--store", str(store),
                          "--meta_path", str(meta), "--max_new_tokens", "12", "--out", str(generated)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r["image"]: r for r in map(json.loads, generated.read_text().splitlines())}
    assert set(rows) == {name for name, *_ in IMAGES} and all(r["reference"] for r in rows.values())
    scores = score_reports(generated, root / "clean" / "captions.jsonl")  # pycocoevalcap, as InternVL's caption eval
    assert scores.n == 6 and all(0 <= scores.caption[k] <= 10 for k in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"))
    image = root / "clean" / "images" / "wide.png"
    live = subprocess.run([sys.executable, "-m", "train.generate", "--checkpoint", str(out), "--store", str(store),
                           "--image", str(image), "--prompt", "Describe this H&E image.", "--max_new_tokens", "12"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert live.returncode == 0, live.stderr[-2000:]
    assert live.stdout.strip().splitlines()[-1] == rows["wide.png"]["text"]  # same tokens, same greedy answer


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

"""`python -m evaluate prism-report`, run as a user types it, over a tiny store of 2560-d Virchow features (each slide
its own distribution) with a tiny PRISM reporter folder (tests/extract/prism_tiny.py: model.safetensors, config.json
in the hub's format, BioGPT-format tokenizer files): predictions.jsonl holds one report per slide with tiles, the
same the library gives; a slide without tiles is recorded, not a crash; `evaluate report` scores the file; the
references select the slides; a store of another tile encoder is refused naming both and the command that makes
the right store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from extract.slide_encoders.prism_decoder import load_prism_reporter
from store import EmbeddingStore
from tests.extract.prism_tiny import slide_features, write_weights_folder
from tests.extract.test_slide_embeddings import tile_spec
from tests.readme import run_in_process, run_main, to_argv

# the command as the docs would show it (docs/evaluate.md); the hub id is replaced by the tiny folder's file here
PRISM_REPORT = ("python -m evaluate prism-report --store STORE --weights HUB_ID_OR_FILE [--slides ID ...] "
                "[--references TABLE] [--tokenizer DIR] [--device auto|cpu|cuda] [--max-new-tokens 128] "
                "[--num-beams 5] --out DIR")
SLIDES = {"TCGA-AA-0001-01Z-00-DX1.A": 0, "TCGA-AA-0002-01Z-00-DX1.B": 1, "TCGA-AA-0003-01Z-00-DX1.C": 2}
MPP = 0.5


def make_store(path: Path, encoder: str = "virchow") -> str:
    """Slides of `encoder`'s features at Virchow's card tiling (224 px at 0.5 µm/px), and one without tiles."""
    spec = tile_spec("virchow-random" if encoder == "virchow" else encoder)
    spec["encoder"]["name"] = encoder  # the store a gated Virchow extraction writes, without its weights
    store = EmbeddingStore.create_or_open(str(path), kind="slides", spec=spec)
    for slide_id, seed in SLIDES.items():
        features = slide_features(seed, n=12)[:, :store.embedding_dim].astype(np.float16)
        coords = np.stack([np.arange(12) * 224, np.zeros(12)], 1).astype(np.int64)
        with store.write_slide(slide_id, {"patient_id": slide_id[:12], "mpp": MPP}) as writer:
            writer.append(coords, np.ones(12), features)
            writer.commit()
    with store.write_slide("EMPTY", {"patient_id": "EMPTY", "mpp": MPP}) as writer:
        writer.commit(empty_reason="no tissue")
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights_folder(tmp_path_factory.mktemp("prism") / "prism")


def prism_report(cwd: Path, store: str, weights: Path, *extra: str):
    return run_main("evaluate", ["prism-report", "--store", store, "--weights", str(weights), "--device", "cpu",
                                 "--max-new-tokens", "8", *extra, "--out", "out"], cwd)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, weights):
    """The command run once over the tiny store: (its folder, the store, the result)."""
    cwd = tmp_path_factory.mktemp("reported")
    store = make_store(cwd / "tiles.zarr")
    return cwd, store, prism_report(cwd, store, weights)


def test_the_command_writes_one_report_per_slide_with_tiles_and_records_the_rest(reported, weights):
    tmp_path, store, result = reported
    assert result.code == 0, result.log
    assert "progress: 4/4 slides (1 failed)" in result.stdout and "slides/s" in result.stdout
    assert "FAILED: EMPTY: EncoderError: slide 'EMPTY' has no tiles (no tissue)" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == sorted(SLIDES) and all(r["slide"] == r["id"] for r in rows)
    assert [r["patient_id"] for r in rows] == [s[:12] for s in sorted(SLIDES)]
    reporter = load_prism_reporter(str(weights))
    opened = EmbeddingStore.open(store)
    for row in rows:  # what the library gives on the stored features, with the card's beam search
        ids = reporter.generate(opened.slide(row["id"]).embeddings(), num_beams=5, max_new_tokens=8)
        assert row["text"] == reporter.text(ids) and row["new_tokens"] == len(ids)
    assert len({r["text"] for r in rows}) > 1  # the reports follow the slides

    manifest = json.loads((tmp_path / "out" / "predictions_manifest.json").read_text())
    assert manifest["reporter"]["weights_sha256"] == reporter.weights_sha256
    assert manifest["reporter"]["tokenizer"] == str(weights.parent)
    assert manifest["config"]["num_beams"] == 5 and manifest["config"]["max_new_tokens"] == 8
    assert manifest["config"]["seed"] == 0 and manifest["autocast"] is None and manifest["device"] == "cpu"
    assert manifest["reports"] == 3 and list(manifest["failed"]) == ["EMPTY"]


@pytest.mark.readme(PRISM_REPORT)
def test_the_printed_command_with_its_defaults(tmp_path, weights):
    """As docs/heads.md prints it: device auto, 128 new tokens at most, 5 beams, every slide of the store."""
    store = make_store(tmp_path / "tiles.zarr")
    result = run_in_process(to_argv(PRISM_REPORT, {"STORE": store, "HUB_ID_OR_FILE": str(weights), "DIR": "out"}),
                            tmp_path)
    assert result.code == 0 and "Traceback" not in result.log, result.log[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    manifest = json.loads((tmp_path / "out" / "predictions_manifest.json").read_text())
    assert [r["id"] for r in rows] == sorted(SLIDES) and all(0 < r["new_tokens"] <= 128 for r in rows)
    assert manifest["config"]["num_beams"] == 5 and manifest["config"]["max_new_tokens"] == 128


def test_evaluate_report_scores_the_predictions(reported):
    tmp_path, _, result = reported
    assert result.code == 0, result.log
    references = tmp_path / "references.jsonl"
    references.write_text("".join(json.dumps({"id": s, "text": "invasive ductal carcinoma grade 2"}) + "\n"
                                  for s in SLIDES))
    scored = run_main("evaluate", ["report", "--predictions", "out/predictions.jsonl", "--references",
                                   str(references), "--out", "metrics"], tmp_path)
    assert scored.code == 0, scored.log
    assert "3 generated reports vs references" in scored.stdout and (tmp_path / "metrics/report_metrics.json").is_file()


def test_references_choose_the_slides(tmp_path, weights):
    store = make_store(tmp_path / "tiles.zarr")
    references = tmp_path / "references.jsonl"  # one slide by its id, one by its patient; one of another cohort
    references.write_text("".join(json.dumps({"id": key, "text": "benign mucosa"}) + "\n" for key in
                                  ["TCGA-AA-0001-01Z-00-DX1.A", "TCGA-AA-0003", "TCGA-ZZ-9999"]))
    result = prism_report(tmp_path, store, weights, "--references", str(references), "--num-beams", "1")
    assert result.code == 0, result.log
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["TCGA-AA-0001-01Z-00-DX1.A", "TCGA-AA-0003-01Z-00-DX1.C"]
    assert "2 slides of the store that references.jsonl names" in result.stdout

    absent = prism_report(tmp_path, store, weights, "--slides", "TCGA-AA-0009")
    assert absent.code != 0 and "holds no complete slide 'TCGA-AA-0009'" in absent.log


def test_a_store_of_another_tile_encoder_is_refused_naming_both(tmp_path, weights):
    store = make_store(tmp_path / "conch.zarr", encoder="conch-v1.5-random")
    result = prism_report(tmp_path, store, weights)
    assert result.code != 0 and not (tmp_path / "out" / "predictions.jsonl").exists()
    assert "prism reads virchow tile features (2560-d)" in result.log
    assert "this store holds conch-v1.5-random features (768-d)" in result.log
    assert "python -m extract --cohort SLIDES --store NEW_STORE --config configs/extract/virchow.yaml" in result.log


def test_more_new_tokens_than_the_decoder_has_positions_is_refused_before_any_slide(tmp_path, weights):
    store = make_store(tmp_path / "tiles.zarr")
    result = run_main("evaluate", ["prism-report", "--store", store, "--weights", str(weights), "--device", "cpu",
                                   "--max-new-tokens", "500", "--out", "out"], tmp_path)
    assert result.code == 2 and "--max-new-tokens 500" in result.stderr and "at most 159" in result.stderr, result.log
    assert not (tmp_path / "out" / "predictions.jsonl").exists()

"""The ABMIL path through the CLI: tiles read from the store, attention heatmaps drawn over the stored
thumbnail at the stored coordinates by the fold that held the patient out; the sweep table."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from evaluate.abmil import load_bags
from evaluate.features import patient_features
from evaluate.survival import cross_validate
from slidecache.cohorts.clinical import load_clinical
from slidecache.cohorts.splits import read_split
from slidecache.heads.heatmap import attention_overlay, draw_heatmap, tile_scores
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.evaluate.helpers import THUMB_DOWNSAMPLE, TILE, planted_cohort
from tests.readme import run_main

pytestmark = pytest.mark.xdist_group("test_cli_abmil")  # its module fixture is built once, on one worker


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_abmil")
    url, table = planted_cohort(root, patients=100, thumbnails=True)
    return url, table


def run(*args):
    result = run_main("evaluate", args, REPO_ROOT)
    assert result.code == 0, result.stdout + result.stderr
    return result.stdout


def test_heatmap_paints_each_tile_at_its_stored_place(cohort, tmp_path):
    url, table = cohort
    store = EmbeddingStore.open(url)
    data = patient_features(store, load_clinical(table))
    result = cross_validate(data, "OS", "abmil-cox", {p: i % 2 for i, p in enumerate(data.patient_ids)}, 0,
                            load_bags(store, data.slides, 16), None)
    slide = store.slide(data.slides[0][0])
    model = result.models[0].model
    info = draw_heatmap(model, slide, tmp_path / "h.png")
    scores = tile_scores(model, slide)
    assert info["thumbnail"] and info["tiles"] == slide.n_tiles == len(scores)
    assert info["top_tiles_level0_xy"][0] == slide.coords()[int(np.argmax(scores))].tolist()
    assert Image.open(tmp_path / "h.png").size[0] > 300
    rgb, _, downsample = slide.thumbnail()
    blended = attention_overlay(rgb, slide.coords().astype(float), scores, TILE, downsample)
    centres = ((slide.coords() + TILE / 2) / THUMB_DOWNSAMPLE).astype(int)
    hot = blended[centres[np.argmax(scores)][1], centres[np.argmax(scores)][0]]
    cold = blended[centres[np.argmin(scores)][1], centres[np.argmin(scores)][0]]
    assert hot[0] > hot[2] + 0.15 and cold[2] > cold[0] + 0.15  # jet: top rank red, bottom rank blue
    outside = blended[-1, -1] if slide.n_tiles % 6 else None  # the grid's unfilled corner keeps the thumbnail colour
    if outside is not None:
        np.testing.assert_allclose(outside, np.array([236, 200, 220]) / 255)


def test_cli_abmil_survival_with_heatmaps(cohort, tmp_path):
    url, table = cohort
    run("split", "--store", url, "--clinical", str(table), "--out", str(tmp_path / "split.csv"))
    out = tmp_path / "abmil"
    stdout = run("survival", "--store", url, "--clinical", str(table), "--head", "abmil-cox", "--split",
                 str(tmp_path / "split.csv"), "--max-tiles", "16", "--epochs", "15", "--heatmaps", "auto", "PT0003-S0",
                 "--out", str(out))
    assert "re-encoded nothing (tile embeddings read from the store)" in stdout
    report = json.loads((out / "metrics.json").read_text())
    assert report["pooling"] == "tiles" and report["abmil"]["max_tiles"] == 16
    assert report["summary"]["harrell_c"]["mean"] >= 0.75, report["summary"]
    folds = read_split(tmp_path / "split.csv")
    drawn = {d["slide_id"]: d for d in report["heatmaps"]}
    assert "PT0003-S0" in drawn and len(drawn) == 3
    for slide_id, d in drawn.items():
        assert d["fold"] == folds[slide_id.split("-")[0]]  # drawn by the head that never saw this patient
        picture = np.asarray(Image.open(d["png"]).convert("RGB"), dtype=float)
        assert picture.std() > 20  # a coloured overlay, not a blank page


def test_import_published_splits(cohort, tmp_path):
    url, _ = cohort
    # CLAM style: one file per fold, columns train,val,test, slide ids (here: the store's own slide ids).
    slide_ids = EmbeddingStore.open(url).slide_ids()
    for k in range(2):
        test = slide_ids[k::2]
        train = slide_ids[1 - k::2]
        rows = [f"{i},{train[i] if i < len(train) else ''},,{test[i] if i < len(test) else ''}"
                for i in range(max(len(train), len(test)))]
        (tmp_path / f"splits_{k}.csv").write_text(",train,val,test\n" + "\n".join(rows) + "\n")
    run("import-split", str(tmp_path / "splits_0.csv"), str(tmp_path / "splits_1.csv"), "--store", url,
        "--out", str(tmp_path / "split.csv"))
    folds = read_split(tmp_path / "split.csv")
    assert len(folds) == 100 and folds["PT0000"] == 0 and folds["PT0001"] == 1
    # SurvPath style: case ids (TCGA barcodes cut to the patient) with train,val; a leak is refused.
    (tmp_path / "leak.csv").write_text(",train,val\n0,TCGA-AA-0001-01Z-00-DX1,TCGA-AA-0001-01Z-00-DX2\n")
    leak = run_main("evaluate", ["import-split", str(tmp_path / "leak.csv"), "--out", str(tmp_path / "x.csv")], REPO_ROOT)
    assert leak.code != 0 and "leak.csv: 1 patients are in both train and val" in leak.stderr
    twice = run_main("evaluate", ["import-split", str(tmp_path / "splits_0.csv"), str(tmp_path / "splits_0.csv"),
                                  "--store", url, "--out", str(tmp_path / "x.csv")], REPO_ROOT)
    assert twice.code != 0 and "is held out by both" in twice.stderr


def test_sweep_one_table_no_encoder(cohort, tmp_path):
    url, table = cohort
    stdout = run("sweep", "--store", url, "--clinical", str(table), "--tasks", "OS", "grade", "--heads", "coxnet",
                 "abmil-cox", "--grade-heads", "logreg", "--poolings", "mean", "max", "--max-tiles", "16",
                 "--epochs", "10", "--out", str(tmp_path / "sweep"))
    report = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    combos = [(r["task"], r["head"], r["pooling"]) for r in report["rows"]]
    assert combos == [("OS", "coxnet", "mean"), ("OS", "coxnet", "max"), ("OS", "abmil-cox", "tiles"),
                      ("grade", "logreg", "mean"), ("grade", "logreg", "max")]
    assert all(r["error"] is None for r in report["rows"])
    assert report["encoder_modules_loaded"] == [] and report["re_encoded_tiles"] == 0
    assert "the encoder was never imported" in stdout and "harrell_c" in stdout and "qwk" in stdout
    assert report["best"]["OS"].startswith(("coxnet", "abmil-cox"))
    csv_lines = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert len(csv_lines) == 6

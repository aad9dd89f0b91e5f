"""Occlusion heatmaps for the heads without attention: on slides where some "tumour" tiles carry the planted risk
direction and the background tiles none, removing a tumour tile lowers the risk (and the expected grade) and
removing background raises it; the closed forms equal removing the tiles and pooling again through the store;
large slides are occluded in groups; the command line draws and records them; slide-embedding sets are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from evaluate.cohort import CohortSettings, open_patients
from evaluate.grade_eval import GradeSettings, evaluate_grade
from evaluate.survival_eval import SurvivalSettings, evaluate_survival
from slidecache.heads.occlusion import grid_groups, occlusion_scores
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.readme import run_main
from tests.store.helpers import spec

pytestmark = pytest.mark.xdist_group("test_occlusion_heatmaps")  # its module fixture is built once, on one worker

DIM = 16
TILE = 448  # level-0 px per tile
COLUMNS = 6  # tiles per row of the grid
THUMB_DOWNSAMPLE = 16.0
PINK = (236, 200, 220)


def write_slide(store: EmbeddingStore, slide_id: str, patient: str, coords: np.ndarray, emb: np.ndarray,
                thumbnail: bool = False) -> None:
    size = [COLUMNS * TILE, int(coords[:, 1].max()) + TILE]
    with store.write_slide(slide_id, {"patient_id": patient, "tile_px_level0": TILE, "level0_size": size}) as w:
        w.append(coords, np.ones(len(coords)), emb.astype(np.float16))
        if thumbnail:
            h, wd = int(np.ceil(size[1] / THUMB_DOWNSAMPLE)), int(np.ceil(size[0] / THUMB_DOWNSAMPLE))
            w.set_thumbnail(np.full((h, wd, 3), PINK, np.uint8), None, THUMB_DOWNSAMPLE)
        w.commit()


def grid(n: int) -> np.ndarray:
    return np.stack([np.arange(n) % COLUMNS, np.arange(n) // COLUMNS], 1).astype(np.int64) * TILE


def tumour_cohort(root: Path, patients: int = 80, seed: int = 0) -> tuple[str, Path, dict[str, np.ndarray]]:
    """One slide per patient of 18-30 tiles; about a third are tumour tiles carrying `burden * direction`, the
    rest noise alone. Hazards grow with the burden and so do the grades (G1-G3): a tumour tile raises the risk.
    Returns the store, the clinical table and each slide's tumour mask."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)
    burden = rng.uniform(0.0, 3.0, patients)
    store = EmbeddingStore.create_or_open(str(root / "store"), kind="slides", spec=spec(dim=DIM))
    planted = {}
    for p in range(patients):
        n = int(rng.integers(18, 31))
        tumour = rng.random(n) < 0.35
        tumour[rng.integers(n)] = True
        emb = 0.4 * rng.normal(size=(n, DIM)) + tumour[:, None] * burden[p] * direction
        write_slide(store, f"PT{p:04d}-S0", f"PT{p:04d}", grid(n), emb, thumbnail=True)
        planted[f"PT{p:04d}-S0"] = tumour
    event_time = rng.exponential(1 / (0.001 * np.exp(2.0 * (burden - 1.5))))
    censor_time = rng.uniform(200, 3000, patients)
    time, event = np.minimum(event_time, censor_time).round(1), (event_time <= censor_time).astype(int)
    grades = np.digitize(burden, [1.0, 2.0]) + 1
    rows = ["patient_id,cancer_type,grade,age,stage,OS,OS.time"]
    rows += [f"PT{p:04d},DEMO,G{grades[p]},60,Stage I,{event[p]},{time[p]}" for p in range(patients)]
    table = root / "clinical.csv"
    table.write_text("\n".join(rows) + "\n")
    return str(root / "store"), table, planted


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return tumour_cohort(tmp_path_factory.mktemp("occlusion"))


def picture(png: str) -> np.ndarray:
    return np.asarray(Image.open(png).convert("RGB"), dtype=float)


def fold_scores(store: EmbeddingStore, slide_id: str, predict, pooling: str = "mean") -> np.ndarray:
    slide = store.slide(slide_id)
    return occlusion_scores(slide, [], pooling, predict, TILE).scores


def test_coxnet_occlusion_is_high_on_the_planted_tiles(cohort, tmp_path):
    url, table, planted = cohort
    cohort_settings = CohortSettings([str(table)], folds=3)
    store, data = open_patients(url, cohort_settings, "OS")
    folds = cohort_settings.folds_of(data, "OS")
    logged: list[str] = []
    evaluation = evaluate_survival(store, data, folds, SurvivalSettings(heatmaps=("auto",), clinical_baseline=False),
                                   tmp_path, log=logged.append)
    drawn = evaluation.heatmaps
    assert evaluation.record()["heatmaps"] == drawn and len(drawn) == 2  # the highest- and the lowest-risk patient
    high = drawn[0]
    assert high["method"] == "occlusion" and high["score"] == "risk" and high["pooling"] == "mean"
    assert high["occluded"] == "each tile" and high["group_side_tiles"] == 1
    assert high["evaluations"] == high["tiles"] + 1 and high["thumbnail"]
    assert sum("occlusion, fold" in line for line in logged) == 2
    # Drawn by the head that never saw the patient; its scores separate tumour from background tiles.
    fold = folds[high["slide_id"].split("-")[0]]
    assert high["fold"] == fold
    scores = fold_scores(store, high["slide_id"], evaluation.result.models[fold].risk)
    assert roc_auc_score(planted[high["slide_id"]], scores) >= 0.9
    assert high["score_range"] == pytest.approx([scores.min(), scores.max()])
    # Over every held-out slide of a patient with a clear burden, not only the one drawn.
    aucs = [roc_auc_score(planted[p + "-S0"], fold_scores(store, p + "-S0", evaluation.result.models[folds[p]].risk))
            for p, clinical in zip(data.patient_ids, data.clinical) if clinical.grade == "G3"]
    assert np.median(aucs) >= 0.9, aucs
    # The picture: a diverging map centred on 0, the top tile red, the bottom one blue.
    image = picture(high["png"])
    assert image.std() > 20
    slide = store.slide(high["slide_id"])
    top_xy = slide.coords()[int(np.argmax(scores))].tolist()
    assert high["top_tiles_level0_xy"][0] == top_xy


def test_tiles_are_tinted_red_where_they_raise_the_output_and_blue_where_they_lower_it(cohort):
    from slidecache.heads.heatmap import diverging_colours, paint_tiles

    url, _, planted = cohort
    slide = EmbeddingStore.open(url).slide("PT0000-S0")
    scores = np.linspace(-1.0, 0.5, slide.n_tiles)
    colours = diverging_colours(scores, "risk")
    assert (colours.vmin, colours.vmax) == (-1.0, 1.0)  # centred on 0: white is "no change"
    rgb, _, downsample = slide.thumbnail()
    blended = paint_tiles(rgb, slide.coords().astype(float), colours.rgb, TILE, downsample)
    centres = ((slide.coords() + TILE / 2) / THUMB_DOWNSAMPLE).astype(int)
    red, blue = blended[centres[-1][1], centres[-1][0]], blended[centres[0][1], centres[0][0]]
    assert red[0] > red[2] + 0.1 and blue[2] > blue[0] + 0.1


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_closed_forms_equal_removing_the_tiles_and_pooling_again(pooling, tmp_path):
    """Brute force through the store: each tile (then each group) left out, the slide written again and pooled at
    commit as every slide is; the patient's second slide stays in its average."""
    rng = np.random.default_rng(1)
    store = EmbeddingStore.create_or_open(str(tmp_path / "store"), kind="slides", spec=spec(dim=DIM))
    emb, other = rng.normal(size=(12, DIM)), rng.normal(size=(7, DIM))
    write_slide(store, "A", "P", grid(12), emb)
    write_slide(store, "B", "P", grid(7), other)
    weights = rng.normal(size=len(store.slide("A").pooled(pooling)))

    def predict(x):
        return np.tanh(x @ weights)  # any head: the closed forms concern the vectors it is given

    slide, second = store.slide("A"), store.slide("B")
    full = predict(np.mean([slide.pooled(pooling), second.pooled(pooling)], axis=0)[None])[0]

    def brute_force(left_out: np.ndarray, name: str) -> float:
        kept = ~np.isin(np.arange(12), left_out)
        write_slide(store, name, "Q", grid(12)[kept], emb[kept])
        return full - predict(np.mean([store.slide(name).pooled(pooling), second.pooled(pooling)], axis=0)[None])[0]

    each = occlusion_scores(slide, [second], pooling, predict, TILE)
    assert each.group_side == 1 and each.evaluations == 13
    expected = [brute_force(np.array([i]), f"A-{i}") for i in range(12)]
    np.testing.assert_allclose(each.scores, expected, atol=1e-5)

    grouped = occlusion_scores(slide, [second], pooling, predict, TILE, max_evaluations=3)
    groups, side = grid_groups(slide.coords().astype(float), TILE, 3)
    assert grouped.group_side == side == 2 and grouped.groups == 3 and grouped.evaluations == 4
    for g in range(3):
        members = np.flatnonzero(groups == g)
        np.testing.assert_allclose(grouped.scores[members], brute_force(members, f"A-g{g}"), atol=1e-5)


def test_large_slides_are_occluded_in_groups_of_neighbouring_tiles():
    coords = np.stack(np.meshgrid(np.arange(100), np.arange(80)), -1).reshape(-1, 2) * 256.0  # 8,000 tiles
    groups, side = grid_groups(coords, 256.0)
    assert side == 2 and groups.max() + 1 == 2000  # 50 x 40 cells of 2 x 2 tiles
    cells = coords // (2 * 256)
    for g in (0, 777, 1999):
        members = cells[groups == g]
        assert len(members) == 4 and (members == members[0]).all()  # one cell: neighbours only
    _, side = grid_groups(coords[:2000], 256.0)
    assert side == 1  # up to 2,000 tiles each tile is occluded alone


def test_a_one_tile_slide_is_occluded_against_its_patients_other_slides(tmp_path):
    store = EmbeddingStore.create_or_open(str(tmp_path / "store"), kind="slides", spec=spec(dim=DIM))
    rng = np.random.default_rng(2)
    write_slide(store, "A", "P", grid(1), rng.normal(size=(1, DIM)))
    write_slide(store, "B", "P", grid(5), rng.normal(size=(5, DIM)))
    weights = rng.normal(size=DIM)
    slide, second = store.slide("A"), store.slide("B")
    both = np.mean([slide.pooled("mean"), second.pooled("mean")], axis=0)
    only = occlusion_scores(slide, [second], "mean", lambda x: x @ weights, TILE)
    assert only.scores == pytest.approx([both @ weights - second.pooled("mean") @ weights], abs=1e-5)
    from slidecache.errors import EvaluationError

    with pytest.raises(EvaluationError, match="no other slide"):
        occlusion_scores(slide, [], "mean", lambda x: x @ weights, TILE)


def test_logreg_grade_occlusion_heatmaps(cohort, tmp_path):
    url, table, planted = cohort
    cohort_settings = CohortSettings([str(table)], folds=3)
    store, data = open_patients(url, cohort_settings)
    folds = cohort_settings.folds_of(data)
    evaluation = evaluate_grade(store, data, folds, GradeSettings(heatmaps=("auto",)), tmp_path, log=lambda _: None)
    drawn = evaluation.heatmaps
    assert evaluation.record()["heatmaps"] == drawn and len(drawn) == 2
    assert all(d["method"] == "occlusion" and d["score"] == "expected grade (G1 = 0)" for d in drawn)
    assert all(Path(d["png"]).is_file() and picture(d["png"]).std() > 20 for d in drawn)
    from evaluate.grade_eval import expected_grade_index

    high = drawn[0]  # the patient the fold's head gave the highest p(G3)
    model = evaluation.result.models[high["fold"]]
    scores = fold_scores(store, high["slide_id"], lambda x: expected_grade_index(model, x))
    assert roc_auc_score(planted[high["slide_id"]], scores) >= 0.9


def test_survival_mil_heads_keep_attention(cohort, tmp_path):
    url, table, _ = cohort
    cohort_settings = CohortSettings([str(table)], folds=3)
    store, data = open_patients(url, cohort_settings, "OS")
    folds = cohort_settings.folds_of(data, "OS")
    from evaluate.abmil_settings import TrainSettings

    settings = SurvivalSettings(head="abmil-cox", heatmaps=("PT0001-S0",), clinical_baseline=False, max_tiles=16,
                                abmil=TrainSettings(epochs=2))
    drawn = evaluate_survival(store, data, folds, settings, tmp_path, log=lambda _: None).heatmaps
    assert [d["method"] for d in drawn] == ["attention"] and drawn[0]["fold"] == folds["PT0001"]
    assert picture(drawn[0]["png"]).std() > 20


def run(*args: str):
    return run_main("evaluate", args, REPO_ROOT)


def test_cli_coxnet_heatmaps_auto(cohort, tmp_path):
    url, table, _ = cohort
    out = tmp_path / "coxnet"
    result = run("survival", "--store", url, "--clinical", str(table), "--head", "coxnet", "--folds", "3",
                 "--heatmaps", "auto", "--out", str(out))
    assert result.code == 0, result.stdout + result.stderr
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["heatmaps"]) == 2
    for drawn in report["heatmaps"]:
        assert drawn["method"] == "occlusion" and Path(drawn["png"]).parent == out and Path(drawn["png"]).is_file()
        assert f"heatmap {drawn['png']} ({drawn['tiles']} tiles, occlusion, fold {drawn['fold']}" in result.stdout


@pytest.mark.parametrize("task", ["survival", "grade"])
def test_slide_embedding_sets_are_refused_with_the_reason(cohort, task, tmp_path):
    url, table, _ = cohort
    result = run(task, "--store", url, "--clinical", str(table), "--slide-embeddings", "titan", "--heatmaps", "auto",
                 "--out", str(tmp_path / "out"))
    assert result.code != 0
    message = " ".join((result.stdout + result.stderr).split())
    assert "--heatmaps" in message and "slide encoder" in message and "run again" in message
    assert not (tmp_path / "out").exists()  # refused before anything was read or made

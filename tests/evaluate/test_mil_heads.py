"""The MIL heads beside ABMIL (TransMIL, CLAM-SB, DSMIL): padded tiles never change an output, the order-invariant
networks ignore tile order, each head finds the planted signal (survival with both losses, grade) and sits at
chance on permuted outcomes, as the ABMIL tests do it; saved heads, heatmaps and the command line serve them all."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluate.abmil import TrainSettings, load_bags
from evaluate.features import patient_features
from evaluate.grade import GRADE_HEADS, cross_validate_grade
from evaluate.survival import HEADS, MILHead, cross_validate
from slidecache.cohorts.clinical import load_clinical
from slidecache.cohorts.splits import make_folds, read_split
from slidecache.errors import EvaluationError
from slidecache.heads.clam import smooth_top1_svm
from slidecache.heads.heatmap import tile_scores
from slidecache.heads.mil import MILModel
from slidecache.heads.networks import ARCHITECTURES, build_network
from slidecache.heads.saved import load_head, save_grade_head, save_survival_head
from store import EmbeddingStore
from tests.conftest import REPO_ROOT
from tests.evaluate.helpers import planted_cohort
from tests.readme import run_main

NEW = ("transmil", "clam-sb", "dsmil")
SURVIVAL = [f"{network}-{loss}" for network in NEW for loss in ("cox", "nll")]
ORDER_INVARIANT = ("abmil", "clam-sb", "dsmil")  # TransMIL's grid and landmarks follow the tile order


def padded_batch(lengths: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return x, mask


def test_every_head_name_is_registered():
    assert ARCHITECTURES == ("abmil", *NEW)
    assert [h for h in HEADS if h.split("-")[0] in ("abmil", "transmil", "clam", "dsmil")] == [
        "abmil-cox", "abmil-nll", *SURVIVAL]
    assert GRADE_HEADS == ("logreg", "abmil", *NEW)
    with pytest.raises(EvaluationError, match="unknown MIL network"):
        build_network("mil-of-dreams", 4, 1)


# Lengths 3..60 tiles: TransMIL (hidden 32: 16 landmarks) attends the short bags exactly and the long ones by
# Nyström, both in one batch.
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("n_out", [1, 4])
def test_padded_tiles_never_change_an_output(architecture, n_out):
    torch.manual_seed(0)
    network = build_network(architecture, 16, n_out, hidden=32).eval()
    lengths = [60, 3, 17, 40, 9]
    x, mask = padded_batch(lengths)
    junk = x.clone()
    junk[~mask] = 1e3 * torch.randn(int((~mask).sum()), 16)  # what padding holds must not matter either
    with torch.no_grad():
        out, attention = network(x, mask)
        out_junk, attention_junk = network(junk, mask)
        for i, n in enumerate(lengths):
            alone, alone_attention = network(x[i: i + 1, :n], mask[i: i + 1, :n])
            torch.testing.assert_close(alone[0], out[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(alone_attention[0], attention[i, :n], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out_junk, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attention_junk, attention)
    assert out.shape == (len(lengths), n_out) and torch.isfinite(out).all()
    assert (attention[~mask] == 0).all()
    # The training objective too (CLAM's instance loss included), with dropout off.
    y = torch.tensor([0, 1, 0, 1, 1]) % n_out
    loss = lambda o: torch.nn.functional.cross_entropy(o, y) if n_out > 1 else o.square().mean()  # noqa: E731
    torch.testing.assert_close(network.objective(junk, mask, loss, y if n_out > 1 else None),
                               network.objective(x, mask, loss, y if n_out > 1 else None))


@pytest.mark.parametrize("architecture", ORDER_INVARIANT)
def test_tile_order_never_changes_an_output(architecture):
    torch.manual_seed(0)
    network = build_network(architecture, 16, 3, hidden=32).eval()
    x, mask = padded_batch([25, 25, 25])
    order = torch.randperm(25)
    with torch.no_grad():
        out, attention = network(x, mask)
        shuffled, shuffled_attention = network(x[:, order], mask)
    torch.testing.assert_close(shuffled, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shuffled_attention, attention[:, order])


def test_masks_need_not_be_a_prefix():
    """Real tiles anywhere in a bag: TransMIL keeps them in their order, the others ignore where they sit."""
    torch.manual_seed(0)
    for architecture in ARCHITECTURES:
        network = build_network(architecture, 16, 2, hidden=32).eval()
        x, _ = padded_batch([20])
        spread, mask = torch.zeros(1, 40, 16), torch.zeros(1, 40, dtype=torch.bool)
        spread[0, 1::2], mask[0, 1::2] = x[0], True
        with torch.no_grad():
            out, attention = network(x, torch.ones(1, 20, dtype=torch.bool))
            out_spread, attention_spread = network(spread, mask)
        torch.testing.assert_close(out_spread, out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(attention_spread[0, 1::2], attention[0])


def test_clam_instance_loss_and_dsmil_average():
    logits, target = torch.tensor([[2.0, 0.0], [0.5, 1.5]]), torch.tensor([1, 1])
    expected = (np.log(np.exp(3.0) + 1.0) + np.log(np.exp(0.5 + 1 - 1.5) + 1.0)) / 2  # log Σ exp(s_j + [j != y] - s_y)
    assert float(smooth_top1_svm(logits, target)) == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    x, mask = padded_batch([30, 12])
    clam = build_network("clam-sb", 16, 3, hidden=32, instance_loss="ce", k_sample=4).eval()
    y = torch.tensor([2, 0])
    bag = lambda o: torch.nn.functional.cross_entropy(o, y)  # noqa: E731
    with torch.no_grad():
        assert float(clam.objective(x, mask, bag)) == pytest.approx(float(bag(clam(x, mask)[0])))  # survival: none
        assert float(clam.objective(x, mask, bag, y)) != pytest.approx(float(bag(clam(x, mask)[0])))
    assert clam.config["instance_loss"] == "ce" and clam.config["k_sample"] == 4
    dsmil = build_network("dsmil", 16, 3, hidden=32).eval()
    with torch.no_grad():
        top, scores, _ = dsmil._parts(x, mask)
        h = dsmil.embed(x[0, :30])
        torch.testing.assert_close(top[0], dsmil.instance(h).max(0).values)  # the max-instance score
        torch.testing.assert_close(dsmil(x, mask)[0], (top + scores) / 2)


class _Slide:
    """What a heatmap reads of a slide, in blocks of 7 rows."""

    slide_id, attrs = "S", {}

    def __init__(self, tiles: np.ndarray) -> None:
        self.tiles = tiles

    def embeddings(self, rows=None):
        return self.tiles if rows is None else self.tiles[rows]

    def row_blocks(self, block_rows=None):
        return (slice(i, i + 7) for i in range(0, len(self.tiles), 7))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_heads_and_heatmaps_serve_every_network(architecture, tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bags = np.empty(6, dtype=object)
    bags[:] = [rng.normal(size=(int(n), 16)).astype(np.float32) for n in rng.integers(5, 40, size=6)]
    model = MILModel(build_network(architecture, 16, 3, hidden=32), "ce", np.zeros(16, np.float32),
                     np.ones(16, np.float32))
    save_grade_head(tmp_path / "grade", architecture, model, bags, ["G1", "G2", "G3"], "G1-G4", "tiles", "fp", {})
    saved = load_head(tmp_path / "grade")
    assert saved.card["network"]["architecture"] == architecture
    np.testing.assert_allclose(saved.abmil.outputs(list(bags)), model.outputs(list(bags)), rtol=1e-5, atol=1e-6)
    nll = MILModel(build_network(architecture, 16, 4, hidden=32), "nll", np.zeros(16, np.float32),
                   np.ones(16, np.float32), np.array([10.0, 20.0, 30.0, 40.0]))
    save_survival_head(tmp_path / "os", f"{architecture}-nll", MILHead(nll, None), bags, "OS", "tiles", "fp", {})
    np.testing.assert_allclose(load_head(tmp_path / "os").abmil.risk(list(bags)), nll.risk(list(bags)), rtol=1e-5)
    # The heatmap's scores: the slide's tiles as one bag (in blocks of rows where a tile's score is its own).
    slide = _Slide(bags[0])
    scores = tile_scores(model, slide)
    attention = model.network(torch.from_numpy(bags[0])[None], torch.ones(1, len(bags[0]), dtype=torch.bool))[1][0]
    assert scores.shape == (len(bags[0]),)
    assert (scores.argsort() == attention.detach().numpy().argsort()).all()  # the same ranks as the attention


@pytest.fixture(scope="module")
def planted_bags(tmp_path_factory):
    """test_abmil.py's cohort: 150 patients of two slides, bags of at most 24 tiles."""
    root = tmp_path_factory.mktemp("mil")
    url, table = planted_cohort(root, patients=150, slides_per_patient=2)
    store = EmbeddingStore.open(url)
    data = patient_features(store, load_clinical(table))
    return data, load_bags(store, data.slides, max_tiles=24, seed=0)


@pytest.mark.xdist_group("test_mil_heads_planted")
@pytest.mark.parametrize("head", SURVIVAL)
def test_survival_heads_find_the_planted_signal(planted_bags, head):
    data, bags = planted_bags
    folds = make_folds(data.patient_ids, data.endpoint("OS")[2], 5, 0)
    result = cross_validate(data, "OS", head, folds, seed=0, features=bags)
    assert result.summary["harrell_c"]["mean"] >= 0.75, result.summary
    assert 0.0 < result.summary["ibs"]["mean"] < 0.25
    assert set(result.models) == set(range(5))
    assert result.models[0].describe["architecture"] == head.rsplit("-", 1)[0]


@pytest.fixture(scope="module")
def permuted_bags(tmp_path_factory):
    """test_survival_heads.py's permuted cohort: 150 patients, outcomes shuffled across them."""
    root = tmp_path_factory.mktemp("mil_permuted")
    url, table = planted_cohort(root, patients=150, permute=True)
    store = EmbeddingStore.open(url)
    data = patient_features(store, load_clinical(table))
    return data, load_bags(store, data.slides, max_tiles=24, seed=0)


@pytest.mark.xdist_group("test_mil_heads_permuted")
@pytest.mark.parametrize("head", SURVIVAL)
def test_survival_heads_are_at_chance_on_permuted_outcomes(permuted_bags, head):
    data, bags = permuted_bags
    folds = make_folds(data.patient_ids, data.endpoint("OS")[2], 5, 0)
    result = cross_validate(data, "OS", head, folds, seed=0, features=bags)
    assert abs(result.summary["harrell_c"]["mean"] - 0.5) <= 0.08, result.summary


@pytest.fixture(scope="module")
def graded_bags(tmp_path_factory):
    """test_grade.py's cohort: 150 patients, bags of at most 32 tiles."""
    root = tmp_path_factory.mktemp("mil_grade")
    url, table = planted_cohort(root, patients=150)
    data = patient_features(EmbeddingStore.open(url), load_clinical(table))
    return data, load_bags(EmbeddingStore.open(url), data.slides, max_tiles=32)


@pytest.mark.xdist_group("test_mil_heads_grade")
@pytest.mark.parametrize("head", NEW)
def test_grade_heads_find_the_planted_grades(graded_bags, head):
    data, bags = graded_bags
    result = cross_validate_grade(data, make_folds(data.patient_ids, k=5, seed=0), head=head, features=bags,
                                  settings=TrainSettings(epochs=30))
    assert result.head == head and set(result.models) == set(range(5))
    assert result.summary["qwk"]["mean"] >= 0.8, result.summary
    assert result.summary["balanced_accuracy"]["mean"] > 2 * result.summary["chance"]["balanced_accuracy"]
    with pytest.raises(EvaluationError, match="trains on tiles"):
        cross_validate_grade(data, make_folds(data.patient_ids, k=5, seed=0), head=head)


@pytest.fixture(scope="module")
def cli_cohort(tmp_path_factory):
    """test_cli_abmil.py's cohort: 100 patients with thumbnails."""
    root = tmp_path_factory.mktemp("cli_mil")
    url, table = planted_cohort(root, patients=100, thumbnails=True)
    run("split", "--store", url, "--clinical", str(table), "--out", str(root / "split.csv"))
    return url, table, root / "split.csv"


def run(*args):
    result = run_main("evaluate", args, REPO_ROOT)
    assert result.code == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.xdist_group("test_mil_heads_cli")
@pytest.mark.parametrize("head", ["transmil-cox", "clam-sb-nll", "dsmil-cox"])
def test_cli_survival(cli_cohort, head, tmp_path):
    url, table, split = cli_cohort
    extra = {"dsmil-cox": ["--heatmaps", "auto"],  # a network scored on the whole slide
             "clam-sb-nll": ["--save-head", str(tmp_path / "head")]}.get(head, [])
    stdout = run("survival", "--store", url, "--clinical", str(table), "--head", head, "--split", str(split),
                 "--max-tiles", "16", "--epochs", "15", *extra, "--out", str(tmp_path))
    assert "re-encoded nothing (tile embeddings read from the store)" in stdout
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["head"] == head and report["pooling"] == "tiles" and report["abmil"]["max_tiles"] == 16
    assert report["summary"]["harrell_c"]["mean"] >= 0.75, report["summary"]
    for drawn in report.get("heatmaps", []):
        assert drawn["fold"] == read_split(split)[drawn["slide_id"].split("-")[0]]
    if head == "clam-sb-nll":  # what train.generate --slide reads
        store = EmbeddingStore.open(url)
        prediction = load_head(tmp_path / "head", store.fingerprint).predict(store.slide("PT0000-S0"))
        assert prediction["head"] == head and np.isfinite(prediction["risk"])


@pytest.mark.xdist_group("test_mil_heads_cli")
def test_cli_grade_heatmaps_and_sweep(cli_cohort, tmp_path):
    url, table, split = cli_cohort
    run("grade", "--store", url, "--clinical", str(table), "--head", "transmil", "--split", str(split),
        "--max-tiles", "16", "--epochs", "5", "--heatmaps", "auto", "--out", str(tmp_path / "grade"))
    report = json.loads((tmp_path / "grade" / "metrics.json").read_text())
    assert report["head"] == "transmil" and len(report["heatmaps"]) == 2
    run("sweep", "--store", url, "--clinical", str(table), "--tasks", "OS", "grade", "--heads", "transmil-nll",
        "clam-sb-cox", "dsmil-nll", "--grade-heads", "clam-sb", "dsmil", "--poolings", "mean", "--max-tiles", "16",
        "--epochs", "2", "--out", str(tmp_path / "sweep"))
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert [(r["task"], r["head"], r["pooling"]) for r in rows] == [
        ("OS", "transmil-nll", "tiles"), ("OS", "clam-sb-cox", "tiles"), ("OS", "dsmil-nll", "tiles"),
        ("grade", "clam-sb", "tiles"), ("grade", "dsmil", "tiles")]
    assert all(r["error"] is None for r in rows)

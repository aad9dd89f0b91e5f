"""ABMIL heads: the torch losses against independent definitions and scikit-survival, and the heads on
a planted-signal cohort read from the store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sksurv.datasets import load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.preprocessing import OneHotEncoder

from evaluate.abmil import (
    cox_partial_nll,
    discrete_time_nll,
    load_bags,
    quantile_bins,
)
from evaluate.features import patient_features
from evaluate.survival import cross_validate
from slidecache.cohorts.clinical import load_clinical
from slidecache.cohorts.splits import make_folds
from slidecache.errors import EvaluationError
from store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort

pytestmark = pytest.mark.xdist_group("test_abmil")  # its module fixture is built once, on one worker


def reference_nll(eta: np.ndarray, time: np.ndarray, event: np.ndarray, ties: str) -> float:
    """The textbook definition, one event time at a time (Efron 1977; Breslow 1974)."""
    loglik = 0.0
    for t in np.unique(time[event]):
        dead = (time == t) & event
        d = int(dead.sum())
        r = np.exp(eta[time >= t]).sum()
        dsum = np.exp(eta[dead]).sum()
        loglik += eta[dead].sum()
        loglik -= d * np.log(r) if ties == "breslow" else sum(np.log(r - k / d * dsum) for k in range(d))
    return -loglik


@pytest.fixture(scope="module")
def whas500():
    x, y = load_whas500()
    x = OneHotEncoder().fit_transform(x).to_numpy(dtype=np.float64)
    return x, y["lenfol"].astype(np.float64), y["fstat"].astype(bool), y


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_loss_equals_the_definition(whas500, ties):
    x, time, event, _ = whas500
    assert len(np.unique(time[event])) < event.sum()  # whas500 has tied event times: ties matter
    rng = np.random.default_rng(0)
    for scale in (0.0, 0.05, 0.5):
        eta = rng.normal(scale=scale, size=len(time)) + 30.0  # a large offset: the shift must cancel exactly
        ours = cox_partial_nll(torch.from_numpy(eta), torch.from_numpy(time), torch.from_numpy(event), ties)
        assert float(ours) == pytest.approx(reference_nll(eta, time, event, ties), rel=1e-10, abs=1e-8)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_minimising_cox_loss_recovers_sksurv_coefficients(whas500, ties):
    x, time, event, y = whas500
    expected = CoxPHSurvivalAnalysis(ties=ties).fit(x, y).coef_
    mean, std = x.mean(0), x.std(0)
    xs = torch.from_numpy((x - mean) / std)
    beta = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([beta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    t, e = torch.from_numpy(time), torch.from_numpy(event)

    def closure():
        optimiser.zero_grad()
        loss = cox_partial_nll(xs @ beta, t, e, ties)
        loss.backward()
        return loss

    optimiser.step(closure)
    np.testing.assert_allclose(beta.detach().numpy() / std, expected, rtol=1e-4, atol=1e-6)


def test_discrete_time_nll_matches_hand_computation():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]], dtype=torch.float64)
    h = torch.sigmoid(logits).numpy()
    # patient 0: event in bin 1 → S(0)·h(1); patient 1: censored in bin 2 → S(2)
    expected = -np.log((1 - h[0, 0]) * h[0, 1]) - np.log(np.prod(1 - h[1]))
    got = discrete_time_nll(logits, torch.tensor([1, 2]), torch.tensor([True, False]))
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_quantile_bins_use_uncensored_times_only():
    times = np.array([10.0, 20, 30, 40, 50, 1000, 2000, 3000])
    events = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    np.testing.assert_allclose(quantile_bins(times, events, 4), [20, 30, 40])
    with pytest.raises(EvaluationError, match="cannot define 4 time bins"):
        quantile_bins(times, np.zeros(8, dtype=bool), 4)


@pytest.fixture(scope="module")
def planted_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("abmil")
    url, table = planted_cohort(root, patients=150, slides_per_patient=2)
    store = EmbeddingStore.open(url)
    data = patient_features(store, load_clinical(table))
    return store, data, load_bags(store, data.slides, max_tiles=24, seed=0)


def test_bags_sample_tiles_of_the_patients_own_slides(planted_bags):
    store, data, bags = planted_bags
    assert len(bags) == len(data) and bags.dtype == object
    for bag, slide_ids in zip(bags[:10], data.slides[:10]):
        total = sum(store.slide(s).n_tiles for s in slide_ids)
        assert len(bag) == min(24, total) and bag.dtype == np.float32
        every = np.concatenate([store.slide(s).embeddings() for s in slide_ids]).astype(np.float32)
        assert all((every == row).all(1).any() for row in bag)  # each sampled tile is one of the patient's
    again = load_bags(store, data.slides[:10], max_tiles=24, seed=0)
    assert all((a == b).all() for a, b in zip(again, bags[:10]))  # same seed, same bags


@pytest.mark.parametrize("head", ["abmil-cox", "abmil-nll"])
def test_abmil_heads_find_the_planted_signal(planted_bags, head):
    _, data, bags = planted_bags
    _, _, events = data.endpoint("OS")
    folds = make_folds(data.patient_ids, events, 5, 0)
    result = cross_validate(data, "OS", head, folds, seed=0, features=bags)
    assert result.summary["harrell_c"]["mean"] >= 0.8, result.summary
    assert 0.0 < result.summary["ibs"]["mean"] < 0.25
    assert set(result.models) == set(range(5))
    again = cross_validate(data, "OS", head, folds, seed=0, features=bags)
    assert again.summary == result.summary  # seeded: the same metrics


def test_abmil_head_refuses_slide_vectors(planted_bags):
    _, data, _ = planted_bags
    folds = make_folds(data.patient_ids, data.endpoint("OS")[2], 5, 0)
    with pytest.raises(EvaluationError, match="trains on tiles"):
        cross_validate(data, "OS", "abmil-cox", folds)

"""The bootstrap CI of Harrell's C from pair counts equals scikit-survival's concordance_index_censored on
every resample (the patients drawn, duplicates included), on awkward data: ties in time and in risk, heavy
censoring, an event at the longest follow-up, resamples without a comparable pair."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.bootstrap_bench import by_calls  # the definition: one scikit-survival call per resample
from evaluate import survival_metrics as sm


@st.composite
def folds(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    size = draw(st.integers(2, 40))
    times = rng.exponential(500, size)
    if draw(st.booleans()):
        times = np.round(times / 200) * 200  # many tied times
    events = rng.random(size) >= draw(st.sampled_from([0.0, 0.5, 0.9]))
    if draw(st.booleans()):
        events[np.argmax(times)] = True  # the longest follow-up is an event
    risk = rng.normal(size=size)
    if draw(st.booleans()):
        risk = np.round(risk)  # tied risks
    return times, events, risk


@settings(max_examples=150, deadline=None)
@given(fold=folds(), seed=st.integers(0, 1000))
def test_bootstrap_from_pair_counts_equals_one_sksurv_call_per_resample(fold, seed):
    times, events, risk = fold
    expected = by_calls(times, events, risk, 50, seed)
    if expected is None:
        with pytest.raises(sm.NotComputed, match="none of the 50 bootstrap resamples"):
            sm.bootstrap_ci(times, events, risk, 50, seed)
        return
    got = sm.bootstrap_ci(times, events, risk, 50, seed)
    assert got[2] == expected[2]
    np.testing.assert_allclose(got[:2], expected[:2], rtol=0, atol=1e-12)

"""Tile standardisation (issue 26): streamed statistics equal the whole-array ones on awkward feature
distributions, the projector's inputs stay finite and training produces no NaN whatever the features, the
statistics come from training patients only, and they survive save → load → merge unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from slidecache.errors import TrainingError
from store import EmbeddingStore
from tests.train.conftest import make_inputs
from train.checkpoint import load_for_inference, read_spec
from train.config import parse_args
from train.merge import merge
from train.model import SlideVLM
from train.run import setup, train
from train.standardize import STANDARDIZER_FILE, TileStandardizer, stream_statistics


def awkward_features(kind: str, rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Tile vectors as real encoders give them: a huge channel every tile shares, constant dimensions, heavy
    tails, float16 storage; each kind on top of a small varying part."""
    x = rng.normal(0.8, 0.05, size=(n, dim))
    if kind == "huge_shared_channel":
        x[:, :3] += np.array([3e4, -2e4, 900.0])  # float16 keeps ~3 digits: the spread lives in the rest
    elif kind == "constant_dims":
        x[:, : dim // 2] = 0.8125
    elif kind == "heavy_tails":
        x += rng.standard_cauchy(size=(n, dim)) * 0.1
    elif kind == "all_constant":
        x[:] = 1.5
    return np.clip(x, -6e4, 6e4).astype(np.float16).astype(np.float32)


KINDS = ["huge_shared_channel", "constant_dims", "heavy_tails", "all_constant", "plain"]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1), slides=st.integers(1, 12),
       dim=st.sampled_from([4, 16, 65]))
def test_streamed_statistics_equal_the_whole_arrays_and_standardised_inputs_are_finite(kind, seed, slides, dim):
    rng = np.random.default_rng(seed)
    parts = {f"s{i}": awkward_features(kind, rng, int(rng.integers(1, 300)), dim) for i in range(slides)}
    stats = stream_statistics(parts, lambda key, _: parts[key])
    whole = np.concatenate(list(parts.values())).astype(np.float64)
    assert stats.tiles == len(whole) and stats.items == slides
    np.testing.assert_allclose(stats.mean, whole.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats.std, whole.std(0), rtol=1e-6, atol=1e-9)
    standardizer = TileStandardizer.from_statistics(stats)
    z = standardizer(torch.from_numpy(whole).float())
    assert torch.isfinite(z).all() and z.abs().max() <= standardizer.clip
    assert (standardizer.scale[torch.from_numpy(whole.std(0) == 0)] == 0).all()  # constant: carries nothing
    # a channel of ~3e4 varies by less than one float16 step there: rounding noise, not signal
    huge = np.abs(whole.mean(0)) > 500
    assert (standardizer.scale[torch.from_numpy(huge)] == 0).all()
    varying = (standardizer.scale > 0).numpy()
    if kind != "heavy_tails" and varying.any():  # centred, unit spread (heavy tails are clipped, so not exactly)
        assert z[:, varying].mean(0).abs().max() < 1e-3
        assert (z[:, varying].std(0, unbiased=False) - 1).abs().max() < 1e-2


def test_no_training_slide_or_damaged_tiles_are_errors():
    with pytest.raises(TrainingError, match="no training slide"):
        stream_statistics([], lambda key, _: np.zeros((1, 2)))
    with pytest.raises(TrainingError, match="NaN or infinity"):
        stream_statistics(["a"], lambda key, _: np.array([[1.0, np.inf]]))


@pytest.fixture(scope="module")
def micro_llm():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return Qwen2ForCausalLM(config)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1))
def test_training_on_awkward_features_gives_no_nan(micro_llm, kind, seed):
    """A few optimiser steps of the projector and the LLM on tiles of each awkward kind: the projector's
    inputs are finite and bounded, the loss and every gradient finite."""
    rng = np.random.default_rng(seed)
    dim, context = 24, 63
    train_tiles = awkward_features(kind, rng, 200, dim)
    stats = stream_statistics(["train"], lambda key, _: train_tiles)
    model = SlideVLM(micro_llm, dim, 16, img_context_id=context, standardizer=TileStandardizer.from_statistics(stats))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # other tiles than the statistics saw, heavier-tailed still: what a new slide may bring
    tiles = torch.from_numpy(awkward_features(kind, rng, 2 * 8, dim) * rng.choice([1, 50], size=(16, 1))).float()
    tiles = tiles.reshape(2, 8, dim)
    ids = torch.tensor([[1, 2] + [context] * 8 + [3, 4, 5, 6]] * 2)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    model.train()
    for _ in range(3):
        inputs = model.standardizer(tiles)
        assert torch.isfinite(inputs).all() and inputs.abs().max() <= model.standardizer.clip
        loss = model(ids, torch.ones_like(ids), tiles, torch.ones(2, 8, dtype=torch.bool), labels).loss
        assert torch.isfinite(loss), kind
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()


@pytest.fixture(scope="module")
def leaky_split(tmp_path_factory):
    """A planted cohort whose held-out patients' tiles sit far from the training patients' (+500 on every
    dimension): statistics that saw them would be visibly shifted."""
    from slidecache.cohorts.splits import write_split

    root = tmp_path_factory.mktemp("leak")
    inputs = make_inputs(root, 8)
    store = EmbeddingStore.open(inputs.store, mode="a")
    held_out = {"PT0006", "PT0007"}
    for slide_id in store.slide_ids():
        slide = store.slide(slide_id)
        if slide.patient_id in held_out:
            emb, coords = slide.embeddings().astype(np.float32) + 500, slide.coords()
            with store.write_slide(slide_id, {"patient_id": slide.patient_id, "tile_px_level0": 448,
                                              "level0_size": slide.attrs["level0_size"]}, overwrite=True) as w:
                w.append(coords, np.ones(len(coords)), emb.astype(np.float16))
                w.commit()
    split = write_split(root / "split.csv", {f"PT{p:04d}": int(f"PT{p:04d}" in held_out) for p in range(8)})
    return inputs, split, held_out


def test_statistics_come_from_training_patients_only(leaky_split, tmp_path):
    inputs, split, held_out = leaky_split
    ready = setup(*parse_args(inputs.flags(tmp_path / "run", "--split", str(split), "--fold", "1")))
    store = EmbeddingStore.open(inputs.store)
    training = np.concatenate([store.slide(s).embeddings().astype(np.float64) for s in store.slide_ids()
                               if store.slide(s).patient_id not in held_out])
    standardizer = ready.model.standardizer
    np.testing.assert_allclose(standardizer.mean.numpy(), training.mean(0), rtol=1e-5, atol=1e-4)
    assert standardizer.mean.abs().max() < 50  # a leak of the +500 tiles would move it by ~125
    counted = ready.counts["tile_statistics"]
    assert counted["items"] == 6 and counted["from"] == "training samples only"


def test_statistics_survive_save_load_and_merge(four_slides, tmp_path):
    run = tmp_path / "run"
    result = train(*parse_args(four_slides.flags(run, "--max_steps", "2", "--save_strategy", "no")))
    trained = result.model.standardizer
    assert read_spec(run).standardized_tiles and (run / STANDARDIZER_FILE).is_file()
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["data_counts"]["tile_statistics"]["tiles"] > 0
    assert manifest["config"]["data"]["standardize_tiles"] is True
    loaded, _, _ = load_for_inference(run, torch.device("cpu"))
    merged, _, _ = load_for_inference(merge(run, tmp_path / "merged"), torch.device("cpu"))
    tiles = torch.randn(1, 5, trained.dim) * 3 + trained.mean.cpu()
    mask = torch.ones(1, 5, dtype=torch.bool)
    for other in (loaded, merged):
        assert torch.equal(other.standardizer.mean, trained.mean.cpu())
        assert torch.equal(other.standardizer.scale, trained.scale.cpu())
        assert torch.allclose(other.visual_tokens(tiles, mask), loaded.visual_tokens(tiles, mask), atol=1e-6)
    (run / STANDARDIZER_FILE).unlink()
    with pytest.raises(TrainingError, match="cannot be used without their statistics"):
        load_for_inference(run, torch.device("cpu"))


def test_raw_tiles_on_request_and_old_checkpoints_load(four_slides, tmp_path):
    run = tmp_path / "raw"
    train(*parse_args(four_slides.flags(run, "--max_steps", "1", "--save_strategy", "no",
                                        "--standardize_tiles", "False")))
    assert not read_spec(run).standardized_tiles and not (run / STANDARDIZER_FILE).exists()
    spec = json.loads((run / "slidecache_model.json").read_text())
    del spec["standardized_tiles"]  # a checkpoint written before issue 26
    (run / "slidecache_model.json").write_text(json.dumps(spec))
    model, _, _ = load_for_inference(run, torch.device("cpu"))
    assert model.standardizer is None

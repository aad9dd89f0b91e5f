"""`python -m store import-h5` on folders as they come from TRIDENT/CLAM runs: some files bad, some batched,
some from another encoder. The good ones are imported, the bad ones listed, and nothing of a bad one is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from store import EmbeddingStore
from store.verify import verify_store
from tests.conftest import REPO_ROOT


def import_h5(folder: Path, store: Path, encoder: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "store", "import-h5", str(folder), str(store), "--encoder", encoder],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def write_h5(folder: Path, name: str, features: np.ndarray, coords: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    with h5py.File(folder / f"{name}.h5", "w") as f:
        f["features"] = features
        f["coords"] = coords


def rows(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    features = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return features, np.stack([np.arange(n) * 224, np.zeros(n, np.int64)], axis=1)


def test_good_files_are_imported_and_bad_ones_listed(tmp_path):
    h5 = tmp_path / "h5"
    features, coords = rows(4, 16)
    write_h5(h5, "a-batched", features[None], coords[None])  # (1, N, D) and (1, N, 2): one slide of a batch
    write_h5(h5, "b-good", *rows(5, 16, seed=1))
    nan, _ = rows(5, 16, seed=2)
    nan[3, 7] = np.nan
    write_h5(h5, "c-nan", nan, coords[:1].repeat(5, 0))
    big, _ = rows(5, 16, seed=3)
    big[2, 0] = 1e6  # finite in float32, inf in the store's float16
    write_h5(h5, "d-overflow", big, coords[:1].repeat(5, 0))
    (h5 / "e-junk.h5").write_text("not hdf5")

    result = import_h5(h5, tmp_path / "store", "test-encoder")

    assert result.returncode == 1, result.stderr  # some files refused, as extraction exits 1 for failed slides
    assert "imported 2 slides" in result.stdout and "Traceback" not in result.stderr
    refused = [line for line in result.stderr.splitlines() if line.startswith("refused: ")]
    assert len(refused) == 3, result.stderr
    assert "c-nan.h5: features row 3 holds NaN" in refused[0]
    assert "d-overflow.h5: features row 2 holds values beyond float16" in refused[1]
    assert "e-junk.h5: not a readable HDF5 file" in refused[2]
    store = EmbeddingStore.open(str(tmp_path / "store"))
    assert store.slide_states() == {"a-batched": True, "b-good": True}  # nothing at all of the refused ones
    batched = store.slide("a-batched")
    np.testing.assert_array_equal(batched.coords(), coords)
    np.testing.assert_array_equal(batched.embeddings(), features.astype(np.float16))
    assert verify_store(store) == []


def test_a_folder_of_bad_files_leaves_no_store(tmp_path):
    h5 = tmp_path / "h5"
    features, coords = rows(3, 8)
    features[0, 0] = np.inf
    write_h5(h5, "inf", features, coords)
    features, coords = rows(3, 8)
    features[1, 1] = 70000.0  # float16 overflows above 65504
    write_h5(h5, "overflow", features.astype(np.float64), coords)

    result = import_h5(h5, tmp_path / "store", "test-encoder")

    assert result.returncode == 1, result.stderr
    assert "imported 0 slides: nothing written to" in result.stdout
    assert "inf.h5" in result.stderr and "overflow.h5" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "store").exists()


def test_features_of_another_width_than_the_named_encoder_are_refused(tmp_path):
    h5 = tmp_path / "h5"
    write_h5(h5, "a-narrow", *rows(3, 128))  # e.g. virchow2-tiny's width, not UNI2-h's
    wide, coords = rows(3, 1536)
    write_h5(h5, "b-uni", wide, coords)

    result = import_h5(h5, tmp_path / "store", "uni2-h")

    assert result.returncode == 1, result.stderr
    assert "imported 1 slides" in result.stdout
    (refused,) = [line for line in result.stderr.splitlines() if line.startswith("refused: ")]
    assert "a-narrow.h5: features are 128-d but encoder uni2-h makes 1536-d embeddings" in refused
    store = EmbeddingStore.open(str(tmp_path / "store"))
    assert store.slide_states() == {"b-uni": True} and store.embedding_dim == 1536

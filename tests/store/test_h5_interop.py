"""TRIDENT/CLAM .h5 export and import, round trip."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from store import EmbeddingStore
from store.errors import InteropError
from store.h5io import export_h5, import_h5
from store.verify import verify_store
from tests.store.helpers import spec, write_slide


def test_round_trip_store_h5_store(tmp_path):
    src = EmbeddingStore.create_or_open(str(tmp_path / "src"), kind="slides", spec=spec())
    originals = {sid: write_slide(src, sid, n, seed=i, patient_id=f"P{i}")
                 for i, (sid, n) in enumerate([("s1", 700), ("s2", 33)])}
    files = export_h5(src, tmp_path / "h5")
    assert sorted(p.name for p in files) == ["s1.h5", "s2.h5"]
    with h5py.File(tmp_path / "h5" / "s1.h5") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (700, 32)
        assert f["coords"].shape == (700, 2)
        attrs = dict(f["coords"].attrs)
        assert attrs["patch_size"] == 224 and attrs["patch_size_level0"] == 448  # 224 px at 0.5 µm from 0.25 µm/px
        assert attrs["target_magnification"] == 20.0 and attrs["level0_magnification"] == 40.0
        assert attrs["name"] == "s1"

    dst = import_h5(tmp_path / "h5", str(tmp_path / "dst"), "test-encoder")
    assert dst.imported and dst.slide_ids() == ["s1", "s2"]
    assert dst.spec["encoder"]["weights_sha256"] == "unknown" and dst.spec["tiling"]["target_mpp"] == 0.5
    for sid, (_, coords, _, emb, _) in originals.items():
        s = dst.slide(sid)
        np.testing.assert_array_equal(s.embeddings(), emb)  # float16 → float32 → float16 is exact
        np.testing.assert_array_equal(s.coords(), coords)
        assert np.isnan(s.tissue().astype(np.float32)).all() and s.attrs["tissue"] == "unknown"
        assert s.patient_id == originals[sid][0].patient_id
        assert s.attrs["mpp"] == 0.25
    assert verify_store(dst) == []


def test_import_of_foreign_h5_without_our_attributes(tmp_path):
    (tmp_path / "h5").mkdir()
    with h5py.File(tmp_path / "h5" / "TCGA-AA-0001-01Z-00-DX1.h5", "w") as f:
        f["features"] = np.random.default_rng(0).normal(size=(1, 5, 16)).astype(np.float32)  # (1, N, D) variant
        f["coords"] = np.arange(10).reshape(5, 2)
        f["coords"].attrs["patch_size"] = 256
    store = import_h5(tmp_path / "h5", str(tmp_path / "dst"), "uni_v1")
    s = store.slide("TCGA-AA-0001-01Z-00-DX1")
    assert s.n_tiles == 5 and s.patient_id == "TCGA-AA-0001-01Z-00-DX1"
    assert store.spec["tiling"]["tile_px"] == 256 and store.spec["tiling"]["target_mpp"] == "unknown"


@pytest.mark.parametrize("content, message", [
    ({"features": np.zeros((3, 4))}, "needs datasets 'features' and 'coords'"),
    ({"features": np.zeros((3, 4)), "coords": np.zeros((2, 2))}, "do not pair up"),
])
def test_bad_h5_files_name_the_file(tmp_path, content, message):
    (tmp_path / "h5").mkdir()
    with h5py.File(tmp_path / "h5" / "bad.h5", "w") as f:
        for k, v in content.items():
            f[k] = v
    with pytest.raises(InteropError, match=message) as err:
        import_h5(tmp_path / "h5", str(tmp_path / "dst"), "x")
    assert "bad.h5" in str(err.value)


def test_not_an_h5_file(tmp_path):
    (tmp_path / "h5").mkdir()
    (tmp_path / "h5" / "junk.h5").write_text("not hdf5")
    with pytest.raises(InteropError, match="junk.h5: not a readable HDF5"):
        import_h5(tmp_path / "h5", str(tmp_path / "dst"), "x")

"""TRIDENT/CLAM .h5 export and import, round trip."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from slidecache.errors import InteropError
from store import EmbeddingStore
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
        assert attrs["patch_size_level0"] == 448 and attrs["target_patch_size"] == 224  # 224 px at 0.5 µm, 0.25 µm/px
        # CLAM reads read_region(coord, patch_level, (patch_size, patch_size)): level 0 needs the level-0 side
        assert attrs["patch_level"] == 0 and attrs["patch_size"] == 448
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
    assert s.n_tiles == 5 and s.patient_id == "TCGA-AA-0001"  # the barcode's patient, as on every path
    assert store.spec["tiling"]["tile_px"] == 256 and store.spec["tiling"]["target_mpp"] == "unknown"


def test_import_split_works_on_an_imported_tcga_store(tmp_path):
    from evaluate.cli import main as evaluate_main
    from slidecache.cohorts.splits import read_split

    (tmp_path / "h5").mkdir()
    for i in range(4):
        with h5py.File(tmp_path / "h5" / f"TCGA-AA-000{i}-01Z-00-DX1.h5", "w") as f:
            f["features"] = np.ones((3, 8), np.float32)
            f["coords"] = np.zeros((3, 2), np.int64)
    import_h5(tmp_path / "h5", str(tmp_path / "dst"), "uni_v1")
    for fold in range(2):  # CLAM-style split files of slide ids
        ids = [f"TCGA-AA-000{i}-01Z-00-DX1" for i in range(4)]
        (tmp_path / f"splits_{fold}.csv").write_text(
            ",train,val,test\n" + "".join(f"{k},{ids[k] if k % 2 != fold else ''},,{ids[k] if k % 2 == fold else ''}\n"
                                          for k in range(4)))
    code = evaluate_main(["import-split", str(tmp_path / "splits_0.csv"), str(tmp_path / "splits_1.csv"),
                          "--store", str(tmp_path / "dst"), "--out", str(tmp_path / "split.csv")])
    assert code == 0
    assert read_split(tmp_path / "split.csv") == {"TCGA-AA-0000": 0, "TCGA-AA-0001": 1, "TCGA-AA-0002": 0,
                                                   "TCGA-AA-0003": 1}


def test_exported_clam_attributes_name_a_level_they_fit(tmp_path):
    """Tiles read unresampled from a pyramid level: CLAM's pair names that level at the tile size."""
    src = EmbeddingStore.create_or_open(str(tmp_path / "src"), kind="slides", spec=spec())
    coords = np.array([[0, 0], [448, 0]], np.int64)
    with src.write_slide("s", {"patient_id": "p", "mpp": 0.25, "tile_px_level0": 448,
                               "tiling": {"level": 1, "level_downsample": 2.0, "read_px": 224, "resample": "none"}}) as w:
        w.append(coords, np.ones(2), np.ones((2, 32), np.float16))
        w.commit()
    export_h5(src, tmp_path / "h5")
    with h5py.File(tmp_path / "h5" / "s.h5") as f:
        attrs = dict(f["coords"].attrs)
    assert (attrs["patch_level"], attrs["patch_size"], list(attrs["downsample"])) == (1, 224, [2.0, 2.0])
    assert attrs["patch_size_level0"] == 448


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

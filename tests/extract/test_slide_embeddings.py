"""`python -m extract slide-embeddings`, run as a user types it in a fresh working directory, over real tile stores
on disk: written with the store's own writer under the fingerprint spec extraction gives CONCH v1.5's random twin at
its card's tiling (512 px at 0.5 µm/px; encoding real slides with that ViT-L would take minutes on two cores), with
random features of its width. TITAN's random twin (its full architecture) reads them. Checked: the vectors are the
slide encoder's own on the stored features, a rerun embeds nothing, a slide written again is recomputed, a store of
the wrong tile encoder or tiling is refused naming both, another slide encoder under one set name is refused, a
corrupt slide is recorded while the others go on; the TRIDENT .h5 export is laid out as TRIDENT writes it and an
import gives the set back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from extract.config import ExtractConfig
from extract.inference import expected_encoder
from extract.slide_encoders import REGISTRY, build_slide_encoder
from extract.targets import store_spec
from slidecache.slide_embeddings import SLIDE_ENCODERS, slide_encoder_facts, trident_folder
from store import EmbeddingStore
from tests.readme import run_in_process, run_main, to_argv

EMBED = ("python -m extract slide-embeddings --store STORE --slide-encoder NAME [--weights HUB_ID_OR_FILE] "
         "[--device auto|cpu|cuda] [--precision auto|fp32|fp16|bf16] [--set NAME] [--limit N] [--retry-failed] "
         "[--any-tiling]")
EXPORT = "python -m store export-slide-h5 STORE DIR [--set NAME]"
IMPORT = "python -m store import-slide-h5 DIR STORE --slide-encoder NAME [--set NAME]"
RM = "python -m store rm-slide-embeddings STORE NAME"
ENCODER = "titan-random"
MPP = 0.25  # a 40x scan: a 512 px tile at 0.5 µm/px covers 1024 level-0 px
SLIDES = {"S0": 60, "S1": 120, "S2": 200, "S3": 30}


def tile_spec(encoder: str, overrides: dict | None = None) -> dict:
    """The fingerprint spec extraction writes for `encoder` at its shipped config's tiling (or `overrides`')."""
    config = "configs/extract/conch-v1.5.yaml" if encoder.startswith("conch") else None
    cfg = ExtractConfig.for_command(config, {"encoder": encoder, **(overrides or {})})
    return store_spec(cfg, expected_encoder(cfg, "cpu")[0])


def write_tiles(store: EmbeddingStore, slide_id: str, n: int, seed: int, side_lv0: float) -> None:
    """n tiles of a tissue-shaped region (distinct cells of a grid in shuffled order) with random features."""
    rng = np.random.default_rng(seed)
    grid = int(np.ceil(np.sqrt(n * 1.5)))
    cells = rng.permutation(grid * grid)[:n]
    coords = (np.stack([cells % grid, cells // grid], 1) * side_lv0 + [4096, 2048]).astype(np.int64)
    features = rng.normal(0, 1, (n, store.embedding_dim)).astype(np.float16)
    attrs = {"patient_id": slide_id, "mpp": MPP, "mpp_source": "test", "tile_px_level0": side_lv0}
    with store.write_slide(slide_id, attrs, overwrite=slide_id in store) as writer:
        writer.append(coords, rng.uniform(0.3, 1, n), features)
        writer.commit()


def make_store(path: Path, encoder: str = "conch-v1.5-random", overrides: dict | None = None) -> str:
    spec = tile_spec(encoder, overrides)
    store = EmbeddingStore.create_or_open(str(path), kind="slides", spec=spec)
    side = spec["tiling"]["tile_px"] * spec["tiling"]["target_mpp"] / MPP
    for seed, (slide_id, n) in enumerate(SLIDES.items()):
        write_tiles(store, slide_id, n, seed, side)
    with store.write_slide("EMPTY", {"patient_id": "EMPTY", "mpp": MPP}) as writer:
        writer.commit(empty_reason="no tissue")
    return str(path)


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """The CONCH v1.5 (random twin) tile store; tests copy it before changing it."""
    path = tmp_path_factory.mktemp("tiles") / "tiles.zarr"
    make_store(path)
    return path


@pytest.fixture
def store_copy(tiles, tmp_path) -> Path:
    shutil.copytree(tiles, tmp_path / "tiles.zarr")
    return tmp_path / "tiles.zarr"


def embed(cwd: Path, *extra: str, store: str = "tiles.zarr", encoder: str = ENCODER):
    result = run_in_process(to_argv(EMBED, {"STORE": store, "NAME": encoder}), cwd) if not extra else \
        run_main("extract", ["slide-embeddings", "--store", store, "--slide-encoder", encoder, *extra], cwd)
    assert "Traceback" not in result.log.replace("traceback_tail", "")
    return result


def expected(store: EmbeddingStore, slide_id: str):
    """What the slide encoder itself gives on the stored features (its own build, not the command's)."""
    slide = store.slide(slide_id)
    encoder = build_slide_encoder(ENCODER)
    return encoder.embed(slide.embeddings(), slide.coords(), slide.attrs["tile_px_level0"]).numpy()


@pytest.mark.readme(EMBED)
def test_the_command_embeds_every_slide_once_and_again_only_what_changed(store_copy, tmp_path):
    first = embed(tmp_path)
    assert first.code == 0, first.log
    assert "progress: 4/4 slides (0 failed)" in first.stdout and "slides/s, ETA" in first.stdout
    assert "4 embedded, 0 already embedded, 1 without tiles, 0 failed" in first.stdout
    store = EmbeddingStore.open(str(store_copy))
    ids, vectors = store.slide_embeddings(ENCODER)
    assert ids == sorted(SLIDES) and vectors.shape == (4, 768) and vectors.dtype == np.float32
    for slide_id, vector in zip(ids, vectors):
        np.testing.assert_allclose(vector, expected(store, slide_id), rtol=0, atol=1e-5)
    emb_set = store.slide_embedding_set(ENCODER)
    spec = emb_set.spec
    assert spec["tiles"] == store.fingerprint and spec["slide_encoder"]["compute_precision"] == "fp32"
    assert spec["slide_encoder"] == {**build_slide_encoder(ENCODER, meta=True).describe(), "compute_precision": "fp32"}

    again = embed(tmp_path)
    assert again.code == 0 and "0 embedded, 4 already embedded" in again.stdout

    write_tiles(EmbeddingStore.open(str(store_copy), mode="a"), "S1", 90, seed=42, side_lv0=1024)  # re-extracted
    store = EmbeddingStore.open(str(store_copy))
    assert store.slide_embeddings(ENCODER)[0] == ["S0", "S2", "S3"]  # S1's embedding is stale: left out
    third = embed(tmp_path)
    assert third.code == 0 and "1 embedded, 3 already embedded" in third.stdout
    np.testing.assert_allclose(store.slide_embedding_set(ENCODER).embedding("S1"), expected(store, "S1"), atol=1e-5)
    assert store.slide_embeddings(ENCODER)[0] == sorted(SLIDES)


def test_a_store_of_another_tile_encoder_or_tiling_is_refused_naming_both(tmp_path):
    make_store(tmp_path / "virchow2.zarr", "virchow2-tiny")
    wrong = embed(tmp_path, store="virchow2.zarr")
    assert wrong.code == 2 and "titan-random reads conch-v1.5 tile features (768-d)" in wrong.stderr
    assert "this store holds virchow2-tiny features (128-d)" in wrong.stderr
    assert "--config configs/extract/conch-v1.5.yaml" in wrong.stderr  # what to do

    make_store(tmp_path / "small.zarr", overrides={"tile_px": 224})
    small = embed(tmp_path, store="small.zarr")
    assert small.code == 2 and "card tiles 512 px at 0.5 µm/px; this store tiles 224 px at 0.5 µm/px" in small.stderr
    assert "--any-tiling" in small.stderr
    anyway = embed(tmp_path, "--any-tiling", "--limit", "1", store="small.zarr")
    assert anyway.code == 0 and "1 embedded" in anyway.stdout and "note: titan-random's card tiles 512" in anyway.stdout
    assert not (tmp_path / "virchow2.zarr" / "slide_embeddings").exists()  # a refusal writes nothing


def test_another_slide_encoder_setting_under_one_set_name_is_refused_naming_both(store_copy, tmp_path):
    assert embed(tmp_path, "--limit", "1").code == 0
    other = embed(tmp_path, "--precision", "bf16")
    assert other.code == 2, other.log
    fingerprints = [s.fingerprint[:12] for s in EmbeddingStore.open(str(store_copy)).slide_embedding_sets().values()]
    assert f"fingerprint {fingerprints[0]}" in other.stderr and "titan-random (weights random-init:seed=0, fp32)" in \
        other.stderr and "titan-random (weights random-init:seed=0, bf16)" in other.stderr
    assert "compute_precision: store has 'fp32', this run has 'bf16'" in other.stderr
    assert "--set" in other.stderr and "rm-slide-embeddings" in other.stderr
    bf16 = embed(tmp_path, "--precision", "bf16", "--set", "titan-bf16", "--limit", "1")  # CPU autocast, as CUDA's
    assert bf16.code == 0, bf16.log
    store = EmbeddingStore.open(str(store_copy))
    a, b = store.slide_embedding_set(ENCODER).embedding("S0"), store.slide_embedding_set("titan-bf16").embedding("S0")
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.99 and not np.array_equal(a, b)


def test_a_corrupt_slide_is_recorded_and_the_others_go_on(store_copy, tmp_path):
    data = store_copy / "slides" / "S2"
    data = next(p for p in data.iterdir() if p.is_dir())
    chunks = [p for p in (data / "embeddings").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not a zstd shard" * 8)
    result = embed(tmp_path)
    assert result.code == 1 and "FAILED: S2" in result.stdout and "3 embedded" in result.stdout
    emb_set = EmbeddingStore.open(str(store_copy)).slide_embedding_set(ENCODER)
    assert emb_set.slide_ids() == ["S0", "S1", "S3"] and emb_set.failures()["S2"]["attempts"] == 1
    again = embed(tmp_path)
    assert again.code == 1 and "1 failed before and not retried" in again.stdout and "FAILED" not in again.stdout
    retried = embed(tmp_path, "--retry-failed")
    assert retried.code == 1 and "FAILED: S2" in retried.stdout
    assert EmbeddingStore.open(str(store_copy)).slide_embedding_set(ENCODER).failures()["S2"]["attempts"] == 2


@pytest.mark.readme(EXPORT)
@pytest.mark.readme(IMPORT)
@pytest.mark.readme(RM)
def test_trident_export_import_round_trip_and_removal(store_copy, tmp_path):
    assert embed(tmp_path).code == 0
    exported = run_in_process(to_argv(EXPORT, {"STORE": "tiles.zarr", "DIR": "trident"}), tmp_path)
    assert exported.code == 0 and "wrote 4 slide-embedding .h5 files" in exported.stdout, exported.log
    folder = tmp_path / "trident" / "slide_features_titan-random"
    store = EmbeddingStore.open(str(store_copy))
    with h5py.File(folder / "S1.h5") as f:  # as TRIDENT's save_h5 lays out extract_slide_features' output
        features, coords = f["features"], f["coords"]
        assert features.shape == (768,) and features.dtype == np.float32 and features.chunks == (1,)
        assert features.maxshape == (None,) and features.attrs["name"] == "S1"
        assert features.attrs["savetodir"] == "trident/slide_features_titan-random"  # the folder as given
        assert coords.dtype == np.int64 and coords.chunks == (1, 2) and coords.maxshape == (None, 2)
        np.testing.assert_array_equal(coords[...], store.slide("S1").coords())
        assert coords.attrs["patch_size_level0"] == 1024 and coords.attrs["target_patch_size"] == 512
        np.testing.assert_array_equal(features[...], store.slide_embedding_set(ENCODER).embedding("S1"))

    original = store.slide_embedding_set(ENCODER)
    spec, vectors = original.spec, original.embeddings()[1]
    removed = run_in_process(to_argv(RM, {"STORE": "tiles.zarr", "NAME": ENCODER}), tmp_path)
    assert removed.code == 0 and not EmbeddingStore.open(str(store_copy)).slide_embedding_sets()
    imported = run_in_process(to_argv(IMPORT, {"DIR": "trident", "STORE": "tiles.zarr", "NAME": ENCODER}), tmp_path)
    assert imported.code == 0 and "imported 4 slide embeddings" in imported.stdout, imported.log
    back = EmbeddingStore.open(str(store_copy)).slide_embedding_set(ENCODER)
    assert back.imported and back.spec == spec  # the same fingerprint back
    np.testing.assert_array_equal(back.embeddings()[1], vectors)
    assert embed(tmp_path).stdout.count("4 already embedded") == 1  # and the command takes it as its own


def trident_file(path: Path, vector: np.ndarray, coords: np.ndarray, slide_id: str) -> None:
    """A slide-features file as TRIDENT writes one (IO.save_h5: chunks of one entry, growable; no slidecache attrs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", data=vector.astype(np.float32), chunks=(1,), maxshape=(None,))
        feats.attrs.update({"name": slide_id, "savetodir": str(path.parent)})
        c = f.create_dataset("coords", data=coords.astype(np.int64), chunks=(1, 2), maxshape=(None, 2))
        c.attrs.update({"patch_size_level0": 1024, "name": slide_id})


def test_an_import_of_trident_files_checks_encoder_width_and_tiles(store_copy, tmp_path):
    store = EmbeddingStore.open(str(store_copy))
    folder = tmp_path / "job" / "slide_features_titan"
    rng = np.random.default_rng(0)
    trident_file(folder / "S0.h5", rng.normal(size=768), store.slide("S0").coords(), "S0")
    trident_file(folder / "S1.h5", rng.normal(size=767), store.slide("S1").coords(), "S1")  # another width
    trident_file(folder / "S2.h5", rng.normal(size=768), store.slide("S3").coords(), "S2")  # other tiles
    trident_file(folder / "NOPE.h5", rng.normal(size=768), store.slide("S0").coords(), "NOPE")  # not in the store
    with h5py.File(folder / "EMPTY.h5", "w") as f:  # TRIDENT's file for a slide without tiles
        f.create_dataset("features", data=np.empty((0,), np.float32))
    # the tile store is conch-v1.5-random: the published TITAN is refused on random tile features
    refused = run_main("store", ["import-slide-h5", "job", "tiles.zarr", "--slide-encoder", "titan"], tmp_path)
    assert refused.code == 2 and "titan reads conch-v1.5 tile features (768-d)" in refused.stderr
    assert "holds conch-v1.5-random features" in refused.stderr
    folder.rename(tmp_path / "job" / "slide_features_titan-random")
    wrong_name = run_main("store", ["import-slide-h5", "job/slide_features_titan-random", "tiles.zarr",
                                    "--slide-encoder", "prism-random"], tmp_path)
    assert wrong_name.code == 2 and "embeddings of 'titan-random', not of prism-random" in wrong_name.stderr
    result = run_main("store", ["import-slide-h5", "job", "tiles.zarr", "--slide-encoder", ENCODER], tmp_path)
    assert result.code == 1 and "imported 1 slide embeddings" in result.stdout
    assert "1 files without one" in result.stdout
    assert "S1.h5: a 767-d slide embedding, but titan-random makes 768-d ones" in result.stderr
    assert "S2.h5: made from 30 tiles, not the 200 tiles" in result.stderr
    assert "NOPE.h5: slide 'NOPE' is not in" in result.stderr and "3 .h5 files refused" in result.stderr
    emb_set = EmbeddingStore.open(str(store_copy)).slide_embedding_set(ENCODER)
    assert emb_set.imported and emb_set.slide_ids() == ["S0"] and emb_set.slide_encoder["weights_id"] == "unknown"


def test_info_lists_the_sets_and_verify_checks_them(store_copy, tmp_path):
    assert embed(tmp_path).code == 0
    info = run_main("store", ["info", "tiles.zarr"], tmp_path)
    fingerprint = EmbeddingStore.open(str(store_copy)).slide_embedding_set(ENCODER).fingerprint
    assert f"slide embeddings {ENCODER}: titan-random (random-init:seed=0), 768-d, 4 slides, 0 stale, 0 failed; " \
           f"fingerprint {fingerprint}" in info.stdout
    assert run_main("store", ["verify", "tiles.zarr"], tmp_path).code == 0

    write_tiles(EmbeddingStore.open(str(store_copy), mode="a"), "S0", 50, seed=7, side_lv0=1024)
    stale = run_main("store", ["verify", "tiles.zarr"], tmp_path)
    assert stale.code == 0 and "warning: slide S0: slide-embedding set titan-random: stale" in stale.stdout
    assert "3 slides, 1 stale" in run_main("store", ["info", "tiles.zarr"], tmp_path).stdout

    marker = zarr.open_group(str(store_copy / "slide_embeddings" / ENCODER / "slides" / "S2"), mode="r+")
    marker[marker.attrs["data"]][3] = np.nan
    broken = run_main("store", ["verify", "tiles.zarr"], tmp_path)
    assert broken.code == 1 and "error: slide S2: slide-embedding set titan-random: embedding holds NaN/Inf" in \
        broken.stdout


def test_the_torch_free_facts_are_the_registry_s():
    for name, spec in REGISTRY.items():
        facts = slide_encoder_facts(name)
        assert (facts.tile_encoder, facts.tile_dim, facts.dim) == (spec.tile_encoder, spec.tile_dim,
                                                                    spec.embedding_dim), name
    assert set(SLIDE_ENCODERS) == {n for n in REGISTRY if not n.endswith("-random")}
    assert trident_folder("prov-gigapath-slide") == "slide_features_gigapath"
    assert json.loads(json.dumps(SLIDE_ENCODERS["titan"].__dict__))["trident_tile_encoder"] == "conch_v15"


def test_the_tile_spacing_comes_from_the_store_and_its_flags_take_three_forms(tiles):
    from extract.cli import build_slide_embeddings_parser
    from extract.slide_embeddings import tile_spacing

    slide = EmbeddingStore.open(str(tiles)).slide("S0")
    tiling = {"tile_px": 512, "target_mpp": 0.5, "stride_px": 512}
    assert tile_spacing(slide, tiling) == 1024  # the recorded level-0 tile side
    slide.attrs.pop("tile_px_level0")
    assert tile_spacing(slide, dict(tiling, stride_px=256)) == 512  # from mpp, and half a tile apart
    assert tile_spacing(slide, {"tile_px": "unknown", "target_mpp": 0.5}) is None
    parser = build_slide_embeddings_parser()
    forms = ((["--retry-failed"], True), (["--retry-failed", "False"], False), (["--any-tiling=no"], False))
    for words, value in forms:
        args = parser.parse_args(words + ["--store", "s", "--slide-encoder", "titan"])
        assert getattr(args, words[0].split("=")[0].lstrip("-").replace("-", "_")) is value

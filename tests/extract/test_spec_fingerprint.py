"""What a store's fingerprint hashes, pinned: the tiling spec and the store spec the shipped extraction configs
gave before the config was split into a spec and run options (issue 28), written out literally. A change here
locks every existing store out of its own next run: these dicts must not move."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from extract.config import SPEC_FIELDS, ExtractConfig, ExtractSpec, RunOptions
from extract.inference import expected_encoder
from extract.slide_prep import tissue_params
from extract.targets import store_spec
from slidecache.provenance import fingerprint
from store import EmbeddingStore
from train.slide_report import extraction_config_of

TISSUE = {"method": "otsu-saturation+ink-filter+morphology", "min_tissue": 0.25, "saturation_range": [0.03, 0.08],
          "thumbnail_max_side": 2048, "thumbnail_px_per_tile": 16, "thumbnail_min_side": 512}
TILING = {"target_mpp": 0.5, "tile_px": 224, "stride_px": 224,
          "resample": "box average for integer factors, else bicubic", "tissue": TISSUE, "tokens": None}
TINY_ENCODER = {"name": "virchow2-tiny", "weights_id": "random-init:seed=0", "weights_sha256": None,
                "pooling": "cls+mean_patch(no_registers)",
                "preprocessing": {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "dim": 128, "dtype": "float16"}
TINY_STORE = {"encoder": {**TINY_ENCODER, "compute_precision": "fp32"}, "tiling": TILING}
TINY_FINGERPRINT = "a130cef3100cefc585d1e372abf1244d2ba6bcc20f0a178143ac83aac8684de9"
# virchow2.yaml with --encoder virchow2-tiny (the real weights are gated): precision auto is bf16 on a GPU
AUTO_ON_GPU = {"encoder": {**TINY_ENCODER, "compute_precision": "bf16"}, "tiling": TILING}
AUTO_ON_GPU_FINGERPRINT = "d3624db8085eccff1d997ade561856471ba79b5b09506c44bf308805bf3f80c0"
# every spec setting moved, and run options that must not count (batch, read chunk, executor, readers, mpp)
VARIANT = {"tokens": "4x4", "stride_px": 112, "compile": True, "precision": "bf16", "min_tissue": 0.5,
           "thumbnail_max_side": 1024, "batch_size": 8, "read_chunk": 16, "executor": "local",
           "readers": ["openslide"], "mpp_override": 0.25}
VARIANT_STORE = {"encoder": {**TINY_ENCODER, "compute_precision": "bf16", "compiled": True},
                 "tiling": {**TILING, "stride_px": 112, "tokens": "4x4",
                            "tissue": {**TISSUE, "min_tissue": 0.5, "thumbnail_max_side": 1024}}}
VARIANT_FINGERPRINT = "4e456e74ba144eba59ed7155e0cdb7e9b6bc7317b3844c4ea00784368e1e8da5"


def _tiling(cfg: ExtractConfig) -> dict[str, Any]:
    return cfg.spec.tiling_spec(tissue_params(cfg).describe())


def _store_spec(cfg: ExtractConfig, device: str) -> dict[str, Any]:
    """The spec a run on this device fingerprints its store with, as extract/job.py builds it."""
    return store_spec(cfg, expected_encoder(cfg, device)[0])


@pytest.mark.parametrize("name", ["virchow2", "virchow2-tiny"])
def test_the_shipped_configs_tile_as_before(name):
    assert _tiling(ExtractConfig.from_yaml(f"configs/extract/{name}.yaml")) == TILING


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_tiny_config_fingerprints_its_store_as_before(device):
    spec = _store_spec(ExtractConfig.from_yaml("configs/extract/virchow2-tiny.yaml"), device)
    assert spec == TINY_STORE and fingerprint(spec) == TINY_FINGERPRINT


def test_the_default_config_fingerprints_its_store_as_before():
    cfg = ExtractConfig.from_yaml("configs/extract/virchow2.yaml", {"encoder": "virchow2-tiny"})
    assert _store_spec(cfg, "cpu") == TINY_STORE
    assert _store_spec(cfg, "cuda") == AUTO_ON_GPU and fingerprint(AUTO_ON_GPU) == AUTO_ON_GPU_FINGERPRINT


def test_every_spec_setting_counts_and_no_run_option_does():
    cfg = ExtractConfig.from_yaml("configs/extract/virchow2-tiny.yaml", VARIANT)
    spec = _store_spec(cfg, "cpu")
    assert spec == VARIANT_STORE and fingerprint(spec) == VARIANT_FINGERPRINT


def test_the_spec_is_what_the_fingerprint_reads_and_the_run_options_the_rest():
    cfg = ExtractConfig.from_yaml("configs/extract/virchow2-tiny.yaml", VARIANT)
    assert cfg.spec == ExtractSpec(encoder="virchow2-tiny", target_mpp=0.5, tile_px=224, stride_px=112,
                                   min_tissue=0.5, tokens="4x4", precision="bf16", compile=True,
                                   thumbnail_max_side=1024)
    assert cfg.run == RunOptions(batch_size=8, read_chunk=16, readers=("openslide",), mpp_override=0.25,
                                 executor="local")
    assert ExtractConfig.of(cfg.spec, cfg.run) == cfg
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    assert SPEC_FIELDS.isdisjoint(run_fields)
    assert SPEC_FIELDS | run_fields == {f.name for f in dataclasses.fields(ExtractConfig)}
    # any run option, changed, leaves the store's spec as it is
    other_run = dataclasses.replace(cfg, **{"batch_size": 32, "read_chunk": 64, "encoder_threads": 3, "limit": 1,
                                            "num_encoders": 2, "retry_failed": True, "reader_cpus": 2.0,
                                            "object_store_memory": 1, "qc_dir": "qc", "extra": {"a": 1}})
    assert _store_spec(other_run, "cpu") == VARIANT_STORE


def test_a_store_is_extended_with_its_own_spec_and_this_commands_run_options(tmp_path):
    """python -m train.generate --slide: the store's spec, with the command's own run options."""
    made = ExtractConfig.from_yaml("configs/extract/virchow2-tiny.yaml", {**VARIANT, "executor": "ray", "limit": 5,
                                                                          "qc_dir": "qc", "num_encoders": 2})
    store = EmbeddingStore.create_or_open(str(tmp_path / "s.zarr"), kind="slides", spec=VARIANT_STORE,
                                          config=made.to_dict())
    cfg = extraction_config_of(store, mpp_override=0.3)
    assert cfg.spec == made.spec and _store_spec(cfg, "cpu") == VARIANT_STORE
    assert cfg.run == RunOptions(mpp_override=0.3, executor="local", retry_failed=True)
    assert extraction_config_of(store, weights="other.safetensors").weights == "other.safetensors"

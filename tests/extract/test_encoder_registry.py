"""The encoders users compare: each full architecture's shapes on the meta device, against numbers taken from
the model cards (written here, not read back from the registry); a depth-1 variant of each builds, saves and
reloads through the local-file path; remote-code-only models and code-running pickles are refused."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from extract.tile_encoders import REGISTRY, EncoderError, build_encoder, pool_tile_embedding
from store.embedding_store import EmbeddingStore
from tests.store.helpers import spec as store_spec
from tests.store.helpers import write_slide

# name: (tile embedding width, parameters low-high, tokens at 224 px incl. class + registers, grid) from the cards:
# Virchow-2 "632M, 2560-d (class ‖ mean patch), 4 registers"; UNI2-h "ViT-H/14, 681M, 1536-d, 8 registers";
# H-optimus-0/1 "ViT-g/14, 1.1B, 1536-d, 4 registers"; Prov-GigaPath "ViT-g, 1.13B, 16 px patches, 1536-d";
# Phikon-v2 "ViT-L/16, ~0.3B, 1024-d, no registers".
CARDS = {
    "virchow2": (2560, 625e6, 640e6, 1 + 4 + 256, 16),
    "uni2-h": (1536, 675e6, 690e6, 1 + 8 + 256, 16),
    "h-optimus-0": (1536, 1.10e9, 1.15e9, 1 + 4 + 256, 16),
    "h-optimus-1": (1536, 1.10e9, 1.15e9, 1 + 4 + 256, 16),
    "prov-gigapath": (1536, 1.12e9, 1.15e9, 1 + 196, 14),
    "phikon-v2": (1024, 0.30e9, 0.31e9, 1 + 196, 14),
}
HOPTIMUS_MEAN = [0.707223, 0.578729, 0.703617]  # bioptimus' cards
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def _random_twin(name: str):
    """The gated entry's architecture with random weights: its '-random' twin, checked to be the same."""
    twin = REGISTRY[f"{name}-random"]
    assert replace(twin, name=name, weights=REGISTRY[name].weights, description="") == replace(REGISTRY[name], description="")
    return twin


@pytest.mark.parametrize("name", sorted(CARDS))
def test_full_architecture_matches_its_model_card(name):
    dim, low, high, n_tokens, grid = CARDS[name]
    encoder = build_encoder(f"{name}-random", meta=True, spec=_random_twin(name))
    params = sum(p.numel() for p in encoder.model.parameters())
    with torch.device("meta"):
        tokens = encoder.tokens(torch.empty(2, 3, 224, 224))
        embedding = pool_tile_embedding(tokens, encoder.num_prefix_tokens, encoder.pooling)
    assert low < params < high, f"{name}: {params / 1e6:.1f}M parameters"
    assert tokens.shape[:2] == (2, n_tokens) and encoder.grid == grid
    assert embedding.shape == (2, dim) == (2, encoder.embedding_dim) == (2, encoder.describe()["dim"])
    mean = encoder.describe()["preprocessing"]["mean"]
    assert mean == pytest.approx(HOPTIMUS_MEAN if name.startswith("h-optimus") else IMAGENET_MEAN)
    deviation = encoder.describe()["preprocessing"].get("input_deviation", "")
    assert ("256" in deviation) == (name == "prov-gigapath")  # the card's resize-and-crop, recorded


def _save(encoder, folder, as_state_dict: bool):
    """What a user has on disk: safetensors, a torch state dict (.bin), or a transformers folder."""
    folder.mkdir()
    model = encoder.model
    if hasattr(model, "backbone"):  # transformers: config.json + model.safetensors
        model.backbone.config.to_json_file(str(folder / "config.json"))
        save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, folder / "model.safetensors")
        return folder
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if as_state_dict:
        torch.save(state, folder / "pytorch_model.bin")
        return folder / "pytorch_model.bin"
    save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("name", [n for n in CARDS if n != "virchow2"])
def test_depth_one_variant_saves_and_reloads_through_the_local_file_path(name, tmp_path):
    variant = REGISTRY[name].variant(f"{name}-depth1", depth=1, seed=3)
    built = build_encoder(variant.name, spec=variant)
    path = _save(built, tmp_path / "weights", as_state_dict=name in ("uni2-h", "prov-gigapath"))
    loaded = build_encoder(variant.name, weights=str(path), spec=variant)
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(pixels), built.embed(pixels))
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64 and loaded.weights_id.endswith((".bin", ".safetensors"))
    assert built.embed(pixels).shape == (2, CARDS[name][0])
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = REGISTRY["phikon-v2"].variant("phikon-depth1", depth=1)
    folder = _save(build_encoder(small.name, spec=small), tmp_path / "phikon", as_state_dict=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 768}))
    with pytest.raises(EncoderError, match="hidden_size: file 768"):
        build_encoder(small.name, weights=str(folder), spec=small)
    (folder / "config.json").unlink()
    with pytest.raises(EncoderError, match="needs its config.json"):
        build_encoder(small.name, weights=str(folder / "model.safetensors"), spec=small)
    uni = REGISTRY["uni2-h"].variant("uni-depth1", depth=1)
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "other.bin")
    with pytest.raises(EncoderError, match="does not match the architecture"):
        build_encoder(uni.name, weights=str(tmp_path / "other.bin"), spec=uni)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


@pytest.mark.parametrize("writer", ["torch.save", "legacy pickle"])
def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path, monkeypatch, writer):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MARKER", str(marker))
    folder = tmp_path / "uni"
    folder.mkdir()
    if writer == "torch.save":
        torch.save({"w": _RunsCode()}, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _RunsCode()}))
    uni = REGISTRY["uni2-h"].variant("uni-depth1", depth=1)
    with pytest.raises(EncoderError, match=r"UnpicklingError.*never loaded"):
        build_encoder(uni.name, weights=str(folder), spec=uni)  # a folder: its pytorch_model.bin is found
    assert not marker.exists()


@pytest.mark.parametrize("name", ["titan", "CONCH", "conch_v1_5", "prism"])
def test_remote_code_only_encoders_are_refused_with_a_reason(name):
    with pytest.raises(EncoderError, match="trust_remote_code") as refused:
        build_encoder(name)
    assert "Registered:" in str(refused.value) and "uni2-h" in str(refused.value)


def test_gated_hub_ids_name_the_files_they_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="model.safetensors or pytorch_model.bin of 'MahmoodLab/UNI2-h'"):
        build_encoder("uni2-h")


def test_a_class_token_stores_cls_pooling_is_the_whole_vector(tmp_path):
    """pooled('cls') is the class-token part of the slide vector: all of a class-token encoder's embedding,
    the first half of Virchow-2's class ‖ mean patch."""
    for pooling, width in (("cls", 32), ("cls+mean_patch(no_registers)", 16)):
        spec = store_spec(32)
        spec["encoder"]["pooling"] = pooling
        store = EmbeddingStore.create_or_open(str(tmp_path / f"{width}.zarr"), kind="slides", spec=spec)
        view, *_ = write_slide(store, "S1", 10)
        cls = store.slide("S1").pooled("cls")
        assert cls.shape == (width,)
        np.testing.assert_array_equal(cls, store.slide("S1").pooled("mean")[:width])


def test_the_torch_free_width_table_matches_every_registered_build():
    from slidecache.tile_embeddings import embedding_width

    for name, spec in REGISTRY.items():
        built = build_encoder(name, spec=spec.variant(spec.name), meta=True).embedding_dim
        assert embedding_width(name) == built, name
    assert embedding_width("another-tools-encoder") is None

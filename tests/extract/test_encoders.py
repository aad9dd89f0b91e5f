"""The encoder registry: tile embedding = class token ‖ mean of patch tokens, registers excluded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from extract.tile_encoders import REGISTRY, EncoderError, build_encoder, pool_tile_embedding, pool_token_grid


def test_registry_names():
    assert {"virchow2", "virchow2-random", "virchow2-tiny"} <= set(REGISTRY)
    with pytest.raises(EncoderError, match="unknown encoder 'nope'"):
        build_encoder("nope")


def test_tiny_embedding_matches_a_hand_computation():
    enc = build_encoder("virchow2-tiny")
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.model.forward_features(x)  # (B, 1 + 4 + 256, C), final norm applied
        emb = enc.embed(x)
    assert tokens.shape == (3, 261, 64) and enc.num_prefix_tokens == 5
    by_hand = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
    torch.testing.assert_close(emb, by_hand)
    with_registers = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=1)
    assert not torch.allclose(emb, with_registers)  # the registers really are left out
    assert enc.describe()["dim"] == 128 and enc.describe()["preprocessing"]["interpolation"] == "bicubic"


def test_token_grid_pooling():
    tokens = torch.arange(2 * 261 * 3, dtype=torch.float32).reshape(2, 261, 3)
    grid = pool_token_grid(tokens, 5, 4)  # 16x16 → 4x4: each output the mean of a 4x4 block
    assert grid.shape == (2, 16, 3)
    patches = tokens[:, 5:].reshape(2, 16, 16, 3)
    torch.testing.assert_close(grid[:, 0], patches[:, :4, :4].mean((1, 2)))
    with pytest.raises(EncoderError, match="multiple"):
        pool_token_grid(tokens, 5, 3)


def test_seeded_random_init_is_reproducible():
    a, b = build_encoder("virchow2-tiny"), build_encoder("virchow2-tiny")
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), name


def test_local_safetensors_weights_load_and_are_hashed(tmp_path):
    source = build_encoder("virchow2-tiny")
    state = {k: v.clone() + 0.5 for k, v in source.model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    # The registry's tiny entry with a weights override takes the real loading path.
    loaded = build_encoder("virchow2-tiny", weights=str(tmp_path))
    assert loaded.weights_id == "model.safetensors" and len(loaded.weights_sha256) == 64
    torch.testing.assert_close(loaded.model.state_dict()["cls_token"], state["cls_token"])
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    # The model is built on the meta device and filled from the file: every tensor is the file's, none left
    # empty, and it encodes exactly as the same weights copied into an initialised model.
    assert not any(t.is_meta for t in [*loaded.model.parameters(), *loaded.model.buffers()])
    source.model.load_state_dict(state)
    tiles = torch.rand(2, 3, 224, 224)
    torch.testing.assert_close(loaded.model(tiles), source.model(tiles))
    # A bf16 file gives the fp32 model an initialised one would have been.
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "bf16.safetensors")
    half = build_encoder("virchow2-tiny", weights=str(tmp_path / "bf16.safetensors"))
    assert {p.dtype for p in half.model.parameters()} == {torch.float32}


def test_bad_weights_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(EncoderError, match=r"not a state dict torch.load\(weights_only=True\) can read"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "w.bin"))
    (tmp_path / "w.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(EncoderError, match="must be .safetensors or a state dict"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "w.ckpt"))
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(EncoderError, match="does not match the architecture"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "w.safetensors"))
    partial = {k: v for k, v in build_encoder("virchow2-tiny").model.state_dict().items() if k != "cls_token"}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(EncoderError, match="1 missing keys"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "partial.safetensors"))
    with pytest.raises(EncoderError, match="holds no model.safetensors"):  # the registry's file for virchow2
        build_encoder("virchow2-tiny", weights=str(tmp_path))
    with pytest.raises(EncoderError, match="gated"):
        build_encoder("virchow2", weights="paige-ai/Virchow2")  # offline here: a clear message, not a stack


def test_full_virchow2_architecture_shapes_and_pooling():
    """The full ViT-H/14 on the meta device (shapes without 2.5 GB or 13 s of random init): Virchow-2's model
    card gives 632M parameters, 261 tokens (1 class + 4 registers + 16x16 patches) of width 1280, and the
    2560-d tile embedding class ‖ mean of the patch tokens. The full model runs for real in the slow
    tests/demo/test_real_model_path.py; the pooling's numbers are checked on the tiny one above."""
    from extract.tile_encoders import REGISTRY, build_model

    with torch.device("meta"):
        model = build_model(REGISTRY["virchow2-random"])
        tokens = model.forward_features(torch.empty(2, 3, 224, 224))
        emb = pool_tile_embedding(tokens, model.num_prefix_tokens)
    assert 625e6 < sum(p.numel() for p in model.parameters()) < 640e6
    assert tokens.shape == (2, 261, 1280) and model.num_prefix_tokens == 5 and emb.shape == (2, 2560)


def test_patch_grid_is_known_without_building_the_encoder():
    from extract.tile_encoders import patch_grid

    assert patch_grid("virchow2") == patch_grid("virchow2-tiny") == build_encoder("virchow2-tiny").grid == 16
    with pytest.raises(EncoderError, match="unknown encoder"):
        patch_grid("uni2")


def test_the_fingerprint_without_building_is_the_built_encoders(tmp_path):
    """A rerun over a complete store checks its fingerprint from expected_encoder_spec (no model built): it
    must equal what the encoder actor would have described, random or from a weights file, with tokens."""
    from extract.config import ExtractConfig
    from extract.inference import BatchEncoder, expected_encoder

    save_file(build_encoder("virchow2-tiny").model.state_dict(), tmp_path / "model.safetensors")
    for cfg in (ExtractConfig(encoder="virchow2-tiny"), ExtractConfig(encoder="virchow2-tiny", tokens="4x4"),
                ExtractConfig(encoder="virchow2-tiny", weights=str(tmp_path / "model.safetensors"), precision="bf16")):
        built = BatchEncoder(cfg, torch.device("cpu"))
        assert expected_encoder(cfg, "cpu") == (built.describe(), built.token_shape), cfg
    assert expected_encoder(ExtractConfig(encoder="virchow2-random"), "cuda")[0]["compute_precision"] == "bf16"


"""The encoder registry: tile embedding = class token ‖ mean of patch tokens, registers excluded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from extract.encoders import REGISTRY, EncoderError, build_encoder, pool_tile_embedding, pool_token_grid


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


def test_bad_weights_are_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(EncoderError, match="only .safetensors"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "w.bin"))
    save_file({"unrelated": torch.zeros(1)}, tmp_path / "w.safetensors")
    with pytest.raises(EncoderError, match="does not match the architecture"):
        build_encoder("virchow2-tiny", weights=str(tmp_path / "w.safetensors"))
    with pytest.raises(EncoderError, match="holds no model.safetensors"):
        build_encoder("virchow2-tiny", weights=str(tmp_path))
    with pytest.raises(EncoderError, match="gated"):
        build_encoder("virchow2", weights="paige-ai/Virchow2")  # offline here: a clear message, not a stack


@pytest.mark.slow
def test_full_virchow2_architecture_shapes_and_pooling():
    enc = build_encoder("virchow2-random")
    assert 625e6 < sum(p.numel() for p in enc.model.parameters()) < 640e6
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = enc.model.forward_features(x)
        emb = pool_tile_embedding(tokens, enc.num_prefix_tokens)
    assert tokens.shape == (2, 261, 1280) and emb.shape == (2, 2560) and enc.embedding_dim == 2560
    torch.testing.assert_close(emb[:, 1280:], tokens[:, 5:].mean(1))
    torch.testing.assert_close(emb[:, :1280], tokens[:, 0])


def test_patch_grid_is_known_without_building_the_encoder():
    from extract.encoders import patch_grid

    assert patch_grid("virchow2") == patch_grid("virchow2-tiny") == build_encoder("virchow2-tiny").grid == 16
    with pytest.raises(EncoderError, match="unknown encoder"):
        patch_grid("uni2")

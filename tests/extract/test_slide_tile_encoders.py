"""The tile encoders the slide encoders read: Virchow (v1) for PRISM, CONCH v1.5 for TITAN. Card facts written here
from the cards and public code (not read back from the registry), CONCH v1.5's published key list loaded strictly,
depth-1 variants saved and reloaded through the hub's file names, and the tile size each card prescribes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from extract.conch_tower import dino_resized
from extract.config import ExtractConfig
from extract.tile_encoders import REGISTRY, build_encoder, pool_tile_embedding, registered
from slidecache.errors import ConfigError, EncoderError
from slidecache.tile_embeddings import embedding_width
from store import EmbeddingStore
from tests.extract import published_keys as published

IMAGENET_MEAN = [0.485, 0.456, 0.406]
# name: (embedding width, parameters low-high, input px, tokens incl. class, grid, resize, card tile px at 0.5 µm/px)
# Virchow card: ViT-H/14 632M, 224 px, class ‖ mean patch 2560-d, no registers, bicubic. CONCH v1.5 (TRIDENT's
# conchv1_5.py, TITAN's README): ViT-L/16 + attentional pooler, 768-d, resize 448 bilinear, 512 px tiles at 20x.
CARDS = {
    "virchow": (2560, 625e6, 640e6, 224, 1 + 256, 16, "bicubic", 224),
    "conch-v1.5": (768, 0.30e9, 0.31e9, 448, 1 + 784, 28, "bilinear", 512),
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_full_architecture_matches_its_card(name):
    dim, low, high, px, n_tokens, grid, resize, tile_px = CARDS[name]
    encoder = build_encoder(f"{name}-random", meta=True)
    params = sum(p.numel() for p in encoder.model.parameters())
    with torch.device("meta"):
        tokens = encoder.tokens(torch.empty(2, 3, px, px))
        embedding = encoder.pool(tokens)
    prep = encoder.describe()["preprocessing"]
    assert low < params < high, f"{name}: {params / 1e6:.1f}M parameters"
    assert tokens.shape[:2] == (2, n_tokens) and encoder.grid == grid
    assert embedding.shape == (2, dim) == (2, encoder.embedding_dim) == (2, encoder.describe()["dim"])
    assert prep["input_size"] == [3, px, px] and prep["interpolation"] == resize and prep["mean"] == IMAGENET_MEAN
    assert REGISTRY[name].tile_px == tile_px == ExtractConfig.from_yaml(f"configs/extract/{name}.yaml").tile_px
    assert embedding_width(name) == embedding_width(f"{name}-random") == dim


def test_conch_loads_its_published_keys_strictly():
    keys = published.conch_v15()
    model = build_encoder("conch-v1.5-random", meta=True).model
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    model.load_state_dict({k: torch.empty(s, device="meta") for k, s in keys.items()}, strict=True, assign=True)


def test_conch_resizes_its_position_table_the_dino_way():
    table = torch.randn(1, 197, 8)
    assert dino_resized(table, 14, 14) is table  # 224 px: the table as it is
    grid = table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)  # iBOT/DINO: scale factor (w0 + 0.1) / 14
    expected = F.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic").permute(0, 2, 3, 1)
    ours = dino_resized(table, 28, 28)
    torch.testing.assert_close(ours[:, 1:], expected.reshape(1, 784, 8), rtol=0, atol=0)
    timm_way = resample_abs_pos_embed(table, new_size=(28, 28), num_prefix_tokens=1)
    assert (timm_way - ours).abs().max() > 1e-4  # why timm's own resize is not used


@pytest.mark.parametrize("name, filename", [("conch-v1.5", "pytorch_model_vision.bin"),
                                            ("virchow", "model.safetensors")])
def test_depth_one_variant_reloads_through_the_hub_file_name(name, filename, tmp_path):
    variant = REGISTRY[name].variant(f"{name}-depth1", depth=1, seed=3)
    built = build_encoder(variant.name, spec=variant)
    state = {k: v.contiguous() for k, v in built.model.state_dict().items()}
    torch.save(state, tmp_path / filename) if filename.endswith(".bin") else save_file(state, tmp_path / filename)
    loaded = build_encoder(variant.name, weights=str(tmp_path), spec=variant)
    px = CARDS[name][3]
    pixels = torch.rand(2, 3, px, px)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(pixels), built.embed(pixels))
    assert loaded.embed(pixels).shape == (2, CARDS[name][0]) and loaded.weights_id == filename


def test_attention_pooling_is_the_model_s_not_a_token_rule():
    encoder = build_encoder("conch-v1.5-random", meta=True)
    with pytest.raises(EncoderError, match="TileEncoder.pool"):
        pool_tile_embedding(torch.zeros(1, 5, 4), 1, encoder.pooling)


@pytest.mark.parametrize("name, points_to", [("titan", "slide_encoders"), ("prism", "'virchow'"),
                                             ("conch_v1", "'conch-v1.5'")])
def test_slide_encoder_names_say_where_they_are(name, points_to):
    with pytest.raises(EncoderError, match="trust_remote_code") as refused:
        registered(name)
    assert points_to in str(refused.value)


@pytest.mark.recipe("extract/conch-v1.5.yaml")
@pytest.mark.recipe("extract/virchow.yaml")
@pytest.mark.parametrize("name, tile_px, width", [("conch-v1.5", 512, 768), ("virchow", 224, 2560)])
def test_each_new_tile_encoder_config_extracts_at_its_own_settings(name, tile_px, width, synthetic_slides, tmp_path):
    """`python -m extract --config configs/extract/NAME.yaml` with the full architecture (random weights: the real
    ones are gated): the card's tile size and width reach the store; CONCH v1.5 has no class-token part."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    (tmp_path / "slides").mkdir()
    shutil.copy(synthetic_slides / "syn0.tiff", tmp_path / "slides" / "syn0.tiff")
    result = subprocess.run([sys.executable, "-m", "extract", "--cohort", "slides", "--store", "store.zarr", "--config",
                             str(REPO_ROOT / "configs" / "extract" / f"{name}.yaml"), "--encoder", f"{name}-random",
                             "--executor", "local"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    store = EmbeddingStore.open(str(tmp_path / "store.zarr"))
    slide = store.slide("syn0")
    assert store.spec["tiling"]["tile_px"] == tile_px and store.embedding_dim == width and slide.n_tiles > 0
    assert np.isfinite(slide.embeddings()).all()
    if name == "conch-v1.5":
        with pytest.raises(ConfigError, match="no class token"):
            slide.pooled("cls")
    else:
        assert slide.pooled("cls").shape == (width // 2,)

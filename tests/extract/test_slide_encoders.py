"""Slide encoders (PRISM, TITAN, Prov-GigaPath's slide encoder): each full architecture takes a state dict of
exactly the published key names and shapes, strictly (tests/extract/published_keys.py, written from the public
model code); tiny variants of the same code check what the models promise: the order of the tiles does not
matter (PRISM, TITAN: by the model; GigaPath: by our canonical order, since LongNet itself is order-dependent),
padding does not leak (PRISM's mask, TITAN's background rows) or is handled as the reference does (LongNet's
zero-padded segments, against a brute-force reading of the definition), one tile and 50,000 tiles work; weights
load from local files, safely; wrong inputs are refused with a reason."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from extract.slide_encoders import REGISTRY, SlideEncoder, build_slide_encoder
from extract.slide_encoders.attention import attention_with_lse, biased_attention, chunked_attention_with_lse
from extract.slide_encoders.gigapath import _DilatedAttention, sincos_2d
from extract.slide_encoders.titan import alibi_slopes
from extract.slide_encoders.weights import alias_groups, load_slide_state
from slidecache.errors import EncoderError
from tests.extract import published_keys as published

# name: (tile encoder, tile width, slide embedding width, card tile px at 0.5 µm/px) from the cards and code
CARDS = {"prism": ("virchow", 2560, 1280, 224), "titan": ("conch-v1.5", 768, 768, 512),
         "prov-gigapath-slide": ("prov-gigapath", 1536, 768, 256)}
TINY = {  # the same code at test size (tile widths shrunk too)
    "prism": dict(latent_seq=8, latent_dim=32, context_dim=48, mhsa_heads=4, perceiver_depth=4, transformer_depth=1),
    "titan": dict(embed_dim=24, depth=2, num_heads=12, tile_dim=48, pooler_queries=4, pooler_heads=2),
    "prov-gigapath-slide": dict(embed_dim=32, depth=2, num_heads=16, ffn_dim=48, tile_dim=48, output_layer=2),
}
FAST = {  # for 50,000 tiles on two CPU cores: one layer, one head where the model allows
    "prism": dict(TINY["prism"], perceiver_depth=2),
    "titan": dict(TINY["titan"], depth=1, num_heads=1),
    "prov-gigapath-slide": dict(TINY["prov-gigapath-slide"], depth=1, output_layer=1),
}
SPACING = 512


def _tiny(name: str, arch: dict | None = None, seed: int = 0) -> SlideEncoder:
    spec = REGISTRY[f"{name}-random"].variant(f"{name}-tiny", seed=seed, **(arch or TINY[name]))
    return build_slide_encoder(spec.name, spec=spec)


def _slide(n: int, dim: int, seed: int = 0, side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n tiles of a tissue-shaped region: distinct cells of a grid, in a shuffled order, at SPACING px."""
    g = torch.Generator().manual_seed(seed)
    side = side or max(2, math.ceil(math.sqrt(n * 1.5)))
    cells = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([cells % side, cells // side], 1) * SPACING + torch.tensor([4096, 2048])
    return torch.randn(n, dim, generator=g), coords


def _meta_state(keys: dict[str, tuple[int, ...]], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(shape, device="meta") for k, shape in keys.items()}


# --- the published key lists, strictly --------------------------------------------------------------------------

PUBLISHED = {
    "prism": lambda: (published.prism()[0], "image_resampler.", published.PRISM_OTHER),
    "titan": lambda: (published.titan(), "vision_encoder.", published.TITAN_OTHER),
    "prov-gigapath-slide": lambda: (published.gigapath_slide(), "", {}),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_full_architecture_loads_the_published_keys_strictly(name):
    keys, prefix, other = PUBLISHED[name]()
    encoder = build_slide_encoder(name, weights=None, meta=True, spec=REGISTRY[f"{name}-random"])
    model = encoder.model
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == keys  # both ways: no name missing, none extra, every shape the published one
    load_slide_state(model, {**_meta_state(keys, prefix), **_meta_state(other)}, prefix,
                     REGISTRY[name].ignored_prefixes, name)
    tile, tile_dim, dim, tile_px = CARDS[name]
    spec = REGISTRY[name]
    assert (spec.tile_encoder, spec.tile_dim, spec.embedding_dim, spec.tile_px) == (tile, tile_dim, dim, tile_px)
    assert REGISTRY[f"{name}-random"].arch == spec.arch and spec.weights and not REGISTRY[f"{name}-random"].weights


def test_prism_shares_its_published_layers_and_loads_a_file_that_keeps_one_name_per_tensor():
    keys, groups = published.prism()
    model = build_slide_encoder("prism-random", meta=True).model
    assert sorted(map(sorted, alias_groups(model))) == sorted(map(sorted, groups))
    assert sum(len(g) > 1 for g in groups) and len(groups) < len(keys)  # layers 2-7 share layer 1's xattn, etc.
    deduped = {min(g): keys[min(g)] for g in groups}  # what safetensors' save_model keeps
    load_slide_state(model, _meta_state(deduped, "image_resampler."), "image_resampler.")
    short = dict(deduped)
    short.pop("perceiver.layers.1.xattn.xattn.to_kv.weight")
    with pytest.raises(EncoderError, match="1 missing keys"):
        load_slide_state(model, _meta_state(short))


@pytest.mark.parametrize("change, match", [
    (lambda s: s.pop("norm.weight"), "1 missing keys"),
    (lambda s: s.update({"decoder_embed.weight": torch.empty(2, 2, device="meta")}), "1 unexpected"),
    (lambda s: s.update({"cls_token": torch.empty(1, 1, 1024, device="meta")}), "another shape"),
])
def test_a_state_dict_that_differs_from_the_published_one_is_refused(change, match):
    state = _meta_state(published.gigapath_slide())
    change(state)
    with pytest.raises(EncoderError, match=match):
        load_slide_state(build_slide_encoder("prov-gigapath-slide-random", meta=True).model, state)


def test_keys_outside_the_slide_encoder_and_its_known_neighbours_are_refused():
    state = {**_meta_state(published.titan(), "vision_encoder."), "logit_scale": torch.empty((), device="meta")}
    with pytest.raises(EncoderError, match="belong to no part of the model"):
        load_slide_state(build_slide_encoder("titan-random", meta=True).model, state, "vision_encoder.",
                         ("text_encoder.",))


# --- shapes of the full architectures ----------------------------------------------------------------------------

def test_full_prism_gives_a_1280_d_embedding_and_512_latents():
    model = build_slide_encoder("prism-random", meta=True).model
    with torch.device("meta"):
        embedding, latents = model(torch.empty(1, 300, 2560))
    assert embedding.shape == (1, 1280) and latents.shape == (1, 512, 1280)


@pytest.mark.parametrize("name", ["titan", "prov-gigapath-slide"])
def test_full_positional_encoders_give_their_card_width(name):
    encoder = build_slide_encoder(f"{name}-random")
    features, coords = _slide(40, CARDS[name][1])
    out = encoder.embed(features.half().numpy(), coords.numpy().astype(np.int32), SPACING)  # as a store holds them
    assert out.shape == (CARDS[name][2],) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert encoder.describe()["dim"] == CARDS[name][2] and encoder.describe()["weights_id"] == "random-init:seed=0"


# --- invariances ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
def test_the_order_of_the_tiles_does_not_matter(name):
    encoder = _tiny(name)
    features, coords = _slide(300, encoder.spec.tile_dim)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(5))
    a, b = encoder.embed(features, coords, SPACING), encoder.embed(features[perm], coords[perm], SPACING)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6 if name == "prism" else 0)


def test_gigapath_needs_the_canonical_order_because_longnet_itself_depends_on_it():
    encoder = _tiny("prov-gigapath-slide", dict(TINY["prov-gigapath-slide"], segment_length=(8, 16, 32)))
    features, coords = _slide(100, 48)
    cells = torch.round(coords / SPACING).long()
    with torch.inference_mode():
        a = encoder.model(features, cells)
        b = encoder.model(features.flip(0), cells.flip(0))
    assert (a - b).abs().max() > 1e-4  # segments are runs of the sequence: another order, another result


def test_titan_and_gigapath_read_a_40x_slide_as_its_20x_twin():
    for name in ("titan", "prov-gigapath-slide"):
        encoder = _tiny(name)
        features, coords = _slide(200, 48)
        torch.testing.assert_close(encoder.embed(features, coords, SPACING),
                                   encoder.embed(features, coords * 2, 2 * SPACING), rtol=0, atol=0)


def test_titan_sees_only_relative_positions_and_drops_background_rows():
    encoder = _tiny("titan")
    features, coords = _slide(200, 48)
    base = encoder.embed(features, coords, SPACING)
    shifted = encoder.embed(features, coords + torch.tensor([7 * SPACING, 3 * SPACING]), SPACING)
    padded = encoder.embed(torch.cat([features, torch.zeros(5, 48)]),
                           torch.cat([coords, torch.tensor([[0, 0], [99 * SPACING, 0], [0, 50 * SPACING],
                                                            [SPACING, SPACING], [3 * SPACING, 0]])]), SPACING)
    torch.testing.assert_close(shifted, base, rtol=0, atol=0)
    torch.testing.assert_close(padded, base, rtol=0, atol=0)  # all-zero rows: background, as in the reference


def test_prism_gives_a_padded_slide_in_a_batch_what_it_gets_alone():
    model = _tiny("prism").model
    a, _ = _slide(120, 48, seed=1)
    b, _ = _slide(300, 48, seed=2)
    batch = torch.zeros(2, 300, 48)
    batch[0, :120], batch[1] = a, b
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, :120], mask[1] = True, True
    with torch.inference_mode():
        together, latents = model(batch, mask)
        alone = model(a.unsqueeze(0))[0][0]
    torch.testing.assert_close(together[0], alone, rtol=0, atol=1e-5)
    assert latents.shape == (2, 8, 32)


def _dilated_by_definition(x: torch.Tensor, att: _DilatedAttention) -> torch.Tensor:
    """LongNet's dilated attention read off its definition, one query at a time: for each (segment length,
    dilation), a head of group r sees, in its query's segment of the zero-padded projections, the positions
    r, r + dilation, ...; zero-padded slots count (score 0, value 0); the branches are mixed by log-sum-exp."""
    length, dim = x.shape
    h = att.heads
    q, k, v = (p(x).view(length, h, -1) for p in (att.q_proj, att.k_proj, att.v_proj))
    out = torch.zeros(length, h, dim // h)
    for i in range(length):
        for head in range(h):
            parts = []
            for segment, ratio in zip(att.segment_length, att.dilated_ratio):
                segment = min(segment, length)
                group = head // (h // ratio)
                start = i // segment * segment
                if (i - start) % ratio != group:
                    continue  # this head does not see position i in this branch
                padded = -(-segment // ratio) * ratio
                slots = [start + j for j in range(group, padded, ratio)]
                keys = torch.stack([k[s, head] if s < length and s - start < segment else torch.zeros(dim // h)
                                    for s in slots])
                vals = torch.stack([v[s, head] if s < length and s - start < segment else torch.zeros(dim // h)
                                    for s in slots])
                scores = keys @ q[i, head] / math.sqrt(dim // h)
                parts.append((torch.logsumexp(scores, 0), torch.softmax(scores, 0) @ vals))
            weights = torch.softmax(torch.stack([p[0] for p in parts]), 0)
            out[i, head] = sum(w * p[1] for w, p in zip(weights, parts))
    return att.out_proj(att.inner_attn_ln(out.reshape(length, dim)))


@pytest.mark.parametrize("length", [1, 2, 7, 37])
def test_longnet_padding_is_the_reference_s_zero_slots(length):
    torch.manual_seed(0)
    att = _DilatedAttention(16, 4, segment_length=(8, 12, 32), dilated_ratio=(1, 2, 4)).eval()
    x = torch.randn(length, 16)
    with torch.inference_mode():
        torch.testing.assert_close(att(x), _dilated_by_definition(x, att), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_tile_and_fifty_thousand_tiles(name):
    for n, arch in ((1, TINY[name]), (50_000, FAST[name])):
        encoder = _tiny(name, arch)
        features, coords = _slide(n, encoder.spec.tile_dim, side=250 if n > 1 else None)
        out = encoder.embed(features, coords, SPACING)
        assert out.shape == (encoder.embedding_dim,) and bool(torch.isfinite(out).all()), (name, n)


def test_chunked_attention_is_the_whole_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 50, 8, generator=g) for _ in range(3))
    whole, whole_lse = chunked_attention_with_lse(q, k, v)
    for out, lse in (chunked_attention_with_lse(q, k, v, budget=70), attention_with_lse(q, k, v)):
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, whole_lse, rtol=1e-5, atol=1e-6)
    scores = torch.einsum("bmd,bnd->bmn", q, k) / math.sqrt(8)
    torch.testing.assert_close(whole_lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-6)
    bias = torch.randn(2, 50, 50, generator=g)
    q4, k4, v4 = (t[:2].unsqueeze(0) for t in (q, k, v))
    expected = torch.softmax(torch.einsum("bhmd,bhnd->bhmn", q4, k4) / math.sqrt(8) + bias, -1) @ v4
    got = biased_attention(q4, k4, v4, lambda s, e: bias[:, s:e], budget=150)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# --- the published position rules -------------------------------------------------------------------------------

def test_titan_alibi_slopes_and_distances_are_the_reference_numbers():
    # vision_transformer.py get_slopes(12): 2^-1..2^-8, then every other slope of 16 heads: 2^-0.5, -1.5, -2.5, -3.5
    assert alibi_slopes(12) == pytest.approx([2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)],
                                             rel=1e-15)
    assert alibi_slopes(8) == [2.0**-e for e in range(1, 9)]
    # the reference: float64 distances rounded to float32; ours on the CPU: float32 direct cdist (titan.py)
    a = torch.arange(2000, dtype=torch.float32)
    cells = torch.stack(torch.meshgrid(a, a, indexing="ij"), -1).reshape(-1, 2)
    ours = torch.cdist(torch.zeros(1, 2), cells, compute_mode="donot_use_mm_for_euclid_dist")[0]
    assert torch.equal(ours, cells.double().square().sum(-1).sqrt().float())


def test_gigapath_positions_are_mae_s_sincos_table_and_its_segment_schedule():
    def mae_table(dim: int, grid: int) -> np.ndarray:  # gigapath/pos_embed.py, get_2d_sincos_pos_embed (no cls)
        gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

        def one(pos: np.ndarray) -> np.ndarray:
            omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=float) / (dim / 4.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        return np.concatenate([one(gw), one(gh)], axis=1)

    grid = 40  # the table row of cell (x, y) is x * grid + y (LongNetViT.coords_to_pos); the values do not
    table = torch.from_numpy(mae_table(768, grid)).float()  # depend on the grid's size (1000 in the model)
    cells = torch.tensor([[0, 0], [3, 7], [39, 1], [12, 38]])
    torch.testing.assert_close(sincos_2d(cells, 768), table[cells[:, 0] * grid + cells[:, 1]], rtol=0, atol=1e-6)
    schedule = np.power(2, np.linspace(np.log2(1024), int(np.log2((262144 // 256) ** 2)), 5)).astype(int)
    assert tuple(schedule) == REGISTRY["prov-gigapath-slide"].arch["segment_length"]


# --- weights from files, safely ---------------------------------------------------------------------------------

def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One name per tensor, the first in sorted order, as safetensors' save_model keeps (PRISM's shared layers)."""
    seen: dict[int, str] = {}
    return {k: v.contiguous() for k, v in sorted(state.items())
            if seen.setdefault(v.untyped_storage().data_ptr(), k) == k}


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_weights_reload_from_the_published_file_layout(name, tmp_path):
    built = _tiny(name, seed=3)
    spec = built.spec
    own = _dedupe(built.model.state_dict(keep_vars=False))
    if spec.nested_key:  # GigaPath: a torch checkpoint dict, other entries beside the weights
        path = tmp_path / "slide_encoder.pth"
        torch.save({spec.nested_key: own, "epoch": 7}, path)
    else:
        path = tmp_path / "model.safetensors"
        extra = {"text_decoder.w" if name == "prism" else "text_encoder.w": torch.zeros(2)}
        save_file({**{spec.state_prefix + k: v for k, v in own.items()}, **extra}, path)
    loaded = build_slide_encoder(spec.name, weights=str(tmp_path), spec=spec)  # a folder: its file is found
    features, coords = _slide(64, spec.tile_dim)
    torch.testing.assert_close(loaded.embed(features, coords, SPACING), built.embed(features, coords, SPACING))
    assert loaded.weights_id == path.name and len(loaded.weights_sha256) == 64
    assert not any(t.is_meta for t in loaded.model.state_dict().values())


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_a_checkpoint_that_would_run_code_is_refused_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("MARKER", str(marker))
    torch.save({"model": {"w": _RunsCode()}}, tmp_path / "slide_encoder.pth")
    spec = REGISTRY["prov-gigapath-slide-random"].variant("g", **TINY["prov-gigapath-slide"])
    with pytest.raises(EncoderError, match="weights_only"):
        build_slide_encoder("g", weights=str(tmp_path / "slide_encoder.pth"), spec=spec)
    assert not marker.exists()


def test_gated_hub_ids_name_the_file_they_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError, match="slide_encoder.pth of 'prov-gigapath/prov-gigapath'"):
        build_slide_encoder("prov-gigapath-slide")
    with pytest.raises(EncoderError, match="unknown slide encoder 'chief'.*prism"):
        build_slide_encoder("chief")


# --- inputs and stores ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, features, coords, spacing, match", [
    ("titan", torch.randn(3, 47), torch.zeros(3, 2), SPACING, r"\(48\)-wide"),
    ("titan", torch.randn(3, 48), torch.zeros(3, 3), SPACING, "must be \\(N, 2\\)"),
    ("titan", torch.randn(0, 48), torch.zeros(0, 2), SPACING, "no tiles"),
    ("prism", torch.full((2, 48), float("nan")), torch.zeros(2, 2), SPACING, "NaN"),
    ("prism", torch.randn(2, 48), torch.zeros(2, 2), 0, "positive number"),
    ("titan", torch.randn(2, 48), torch.tensor([[0, 0], [100, 0]]), SPACING, "two tiles fell in one cell"),
    ("titan", torch.zeros(2, 48), torch.tensor([[0, 0], [SPACING, 0]]), SPACING, "background"),
    ("prov-gigapath-slide", torch.randn(2, 48), torch.tensor([[0, 0], [1000 * SPACING, 0]]), SPACING,
     "1000 x 1000 grid"),
])
def test_inputs_that_cannot_be_used_are_refused_with_a_reason(name, features, coords, spacing, match):
    with pytest.raises(EncoderError, match=match):
        _tiny(name).embed(features, coords, spacing)


def test_a_slide_encoder_checks_the_tile_store_it_reads():
    titan = build_slide_encoder("titan-random", meta=True)
    card = {"tile_px": 512, "target_mpp": 0.5, "stride_px": 512}
    assert titan.check_tiles({"name": "conch-v1.5-random", "dim": 768}, card) == []
    assert titan.check_tiles({"name": "conch-v1.5", "dim": 768}, card) == []
    notes = titan.check_tiles({"name": "conch-v1.5", "dim": 768}, dict(card, tile_px=224, stride_px=224))
    assert len(notes) == 1 and "512 px at 0.5" in notes[0]
    with pytest.raises(EncoderError, match="reads conch-v1.5 tile features \\(768-d\\); this store holds virchow2"):
        titan.check_tiles({"name": "virchow2", "dim": 2560}, card)
    real = dataclasses.replace(titan, weights_sha256="0" * 64)  # real weights: random tile features are refused
    with pytest.raises(EncoderError, match="conch-v1.5-random"):
        real.check_tiles({"name": "conch-v1.5-random", "dim": 768}, card)

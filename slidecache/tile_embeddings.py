"""What a stored tile embedding is, without torch: how each encoder pools its tokens into one vector, and the
width that gives for each registered encoder. The registry builds the models (extract/tile_encoders.py); the
store reads the pooling from its fingerprint; `store import-h5` checks another tool's features against the
width. A test checks the widths against the registry's builds, so the two cannot drift."""

from __future__ import annotations

# How an encoder's tokens (B, 1 + R + P, C) become the tile embedding:
CLS_MEAN_PATCH = "cls+mean_patch(no_registers)"  # concat(tokens[:, 0], tokens[:, 1 + R:].mean(1)): 2C (Virchow-2)
CLS = "cls"  # tokens[:, 0]: C (UNI2-h, H-optimus-0/1, Prov-GigaPath, Phikon-v2)
# a learned query attends over all tokens, then a LayerNorm (CONCH v1.5): the pooler's width, no class-token part
ATTN_POOL = "attn_pool_contrast+ln"
POOLINGS = (CLS_MEAN_PATCH, CLS, ATTN_POOL)

# name → width of the stored tile embedding; a "-random" twin has its family's width
EMBEDDING_WIDTHS: dict[str, int] = {
    "virchow2": 2560,  # class token ‖ mean of patch tokens, 2 x 1280
    "virchow": 2560,  # the same for Virchow (v1): PRISM's input
    "conch-v1.5": 768,  # the attention pooler's width: TITAN's input
    "virchow2-small": 768,
    "virchow2-tiny": 128,
    "uni2-h": 1536,
    "h-optimus-0": 1536,
    "h-optimus-1": 1536,
    "prov-gigapath": 1536,
    "phikon-v2": 1024,
}


def class_token_width(pooling: str, width: int) -> int:
    """The leading values of a `width`-wide tile embedding that are the class token: all of a class-token
    encoder's, half of a class ‖ mean-patch one's, none of a learned pooler's (CONCH v1.5)."""
    return width if pooling == CLS else width // 2 if pooling == CLS_MEAN_PATCH else 0


def embedding_width(name: str) -> int | None:
    """The width of a registered encoder's embedding; None for a name the registry does not know (another
    tool's encoder: its features are taken as they are)."""
    return EMBEDDING_WIDTHS.get(name.removesuffix("-random"))


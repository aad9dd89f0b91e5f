"""The embedding width of each registered tile encoder, without torch: what `store import-h5` checks another
tool's features against. The registry builds the models (extract/tile_encoders.py); a test checks this table
against the widths those builds give, so the two cannot drift."""

from __future__ import annotations

# name → width of the stored tile embedding; a "-random" twin has its family's width
EMBEDDING_WIDTHS: dict[str, int] = {
    "virchow2": 2560,  # class token ‖ mean of patch tokens, 2 x 1280
    "virchow2-small": 768,
    "virchow2-tiny": 128,
    "uni2-h": 1536,
    "h-optimus-0": 1536,
    "h-optimus-1": 1536,
    "prov-gigapath": 1536,
    "phikon-v2": 1024,
}


def embedding_width(name: str) -> int | None:
    """The width of a registered encoder's embedding; None for a name the registry does not know (another
    tool's encoder: its features are taken as they are)."""
    return EMBEDDING_WIDTHS.get(name.removesuffix("-random"))

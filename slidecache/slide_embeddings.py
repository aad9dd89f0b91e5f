"""What a stored slide embedding is, without torch: for each registered slide encoder, the tile features it reads,
the width of its slide embedding, and its name in TRIDENT (whose folders `slide_features_<name>/` hold one .h5 per
slide). The registry builds the models (extract/slide_encoders/); `store import-slide-h5` checks another tool's
slide embeddings against these facts, and `extract slide-embeddings --help` lists the names without importing
torch. A test checks the table against the registry's builds, so the two cannot drift."""

from __future__ import annotations

from dataclasses import dataclass

RANDOM = "-random"


@dataclass(frozen=True)
class SlideEncoderFacts:
    tile_encoder: str  # our tile encoder (slidecache.tile_embeddings) whose features it reads
    tile_dim: int
    dim: int  # the slide embedding's width
    trident: str  # TRIDENT's enc_name of the slide encoder (its folder slide_features_<trident>)
    trident_tile_encoder: str  # TRIDENT's name of the tile encoder (features_<name>/), as an imported store may hold


SLIDE_ENCODERS: dict[str, SlideEncoderFacts] = {
    "prism": SlideEncoderFacts("virchow", 2560, 1280, "prism", "virchow"),
    "titan": SlideEncoderFacts("conch-v1.5", 768, 768, "titan", "conch_v15"),
    "prov-gigapath-slide": SlideEncoderFacts("prov-gigapath", 1536, 768, "gigapath", "gigapath"),
}


def slide_encoder_facts(name: str) -> SlideEncoderFacts | None:
    """The facts of a registered slide encoder or its `-random` twin; None for a name the registry does not know."""
    return SLIDE_ENCODERS.get(name.removesuffix(RANDOM))


def trident_name(name: str) -> str:
    """The name TRIDENT gives a slide encoder (gigapath for prov-gigapath-slide); a random twin keeps its suffix,
    so its embeddings are never mistaken for the published model's; an unknown name stays as it is."""
    facts = slide_encoder_facts(name)
    if facts is None:
        return name
    return facts.trident + (RANDOM if name.endswith(RANDOM) else "")


def trident_folder(name: str) -> str:
    """TRIDENT's folder of a slide encoder's embeddings: slide_features_<its TRIDENT name>."""
    return f"slide_features_{trident_name(name)}"


def reads_tile_encoder(name: str, tile_encoder: str) -> bool:
    """Whether slide encoder `name` reads the features of a store made by `tile_encoder`: our name, or TRIDENT's
    name for it (as `store import-h5 --encoder` may have recorded it); the random tile twin only for the random
    slide twin (published weights on random features would give numbers that mean nothing)."""
    facts = slide_encoder_facts(name)
    if facts is None:
        return True  # another tool's slide encoder: nothing to check against
    random = {facts.tile_encoder + RANDOM} if name.endswith(RANDOM) else set()
    return tile_encoder in {facts.tile_encoder, facts.trident_tile_encoder} | random

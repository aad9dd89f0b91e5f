"""The stores one extraction fills, and which slides each of them lacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from extract.config import ExtractConfig, check_one_read
from extract.slide_prep import tissue_params
from extract.summary import SlideOutcome, SlideStatus
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import ConfigError, StoreNotFound
from slidecache.labels import distinct_labels
from store.embedding_store import EmbeddingStore


@dataclass(eq=False)  # identity: one store of a run
class Target:
    """A store the run fills: its config, its encoder actors and, once they are ready, the store itself."""

    url: str
    cfg: ExtractConfig
    label: str  # "" when the run fills one store
    actors: list[int] = field(default_factory=list)  # indices into Extraction.actors
    described: list[Any] = field(default_factory=list)  # refs of the actors' describe calls
    existing: EmbeddingStore | None = None  # the store as it was before the run, if it existed
    store: EmbeddingStore | None = None  # open for writing (once the encoders are ready)
    encoder_spec: dict[str, Any] = field(default_factory=dict)
    token_shape: Any = None

    def named(self, text: str) -> str:
        """A log line's subject, with the store's label when the run fills several."""
        return f"{self.label}: {text}" if self.label else text


def targets_for(stores: list[tuple[str, ExtractConfig]]) -> list[Target]:
    """One store, or several filled from one read: those must differ and agree on everything but the encoder
    (extract.config.check_one_read); they are labelled by their encoder's name (#2, #3 ... for repeats)."""
    if not stores:
        raise ConfigError("an extraction fills at least one store; none given")
    labels = [""]
    if len(stores) > 1:
        labels = distinct_labels([cfg.encoder for _, cfg in stores])
        urls = [url for url, _ in stores]
        if len(set(urls)) < len(urls):
            raise ConfigError(f"the stores of one run must differ; given {urls}")
        check_one_read(dict(zip(labels, (cfg for _, cfg in stores))))
    for url, _ in stores:
        if url.startswith("memory://"):
            raise ConfigError(f"{url}: a memory:// store lives in one process, and extraction writes from its "
                              "encoder processes; use a folder or an s3:// URL")
    return [Target(url, cfg, label) for (url, cfg), label in zip(stores, labels)]


def store_spec(cfg: ExtractConfig, encoder_spec: dict[str, Any]) -> dict[str, Any]:
    """What the store's fingerprint hashes: the encoder as it describes itself, and the tiling."""
    return {"encoder": encoder_spec, "tiling": cfg.tiling_spec(tissue_params(cfg).describe())}


def existing_store(target: Target, storage_options: dict[str, Any]) -> EmbeddingStore | None:
    try:
        return EmbeddingStore.open(target.url, storage_options=storage_options)
    except StoreNotFound:
        return None


def slides_to_extract(entries: list[SlideEntry], targets: list[Target],
            limit: int | None) -> tuple[list[tuple[SlideEntry, list[Target]]], list[SlideOutcome]]:
    """Each slide some store lacks, with the stores that lack it (at most `limit` slides), and the outcomes of
    the others: complete (skipped) or failed before and not retried, per store."""
    books = []
    for target in targets:
        store = target.existing
        books.append((target, *((set(store.slide_ids()), store.failures()) if store is not None else (set(), {}))))
    todo, outcomes = [], []
    for entry in entries:
        missing = []
        for target, complete, failed in books:
            if entry.slide_id in complete:
                outcomes.append(SlideOutcome(entry.slide_id, SlideStatus.SKIPPED, error="complete", store=target.label))
            elif entry.slide_id in failed and not target.cfg.retry_failed:
                record = failed[entry.slide_id]
                outcomes.append(SlideOutcome(
                    entry.slide_id, SlideStatus.FAILED_BEFORE, store=target.label,
                    error=f"{record.get('error_class')}: {record.get('message')} (retry with --retry-failed)"))
            else:
                missing.append(target)
        if missing:
            todo.append((entry, missing))
    return (todo if limit is None else todo[:limit]), outcomes

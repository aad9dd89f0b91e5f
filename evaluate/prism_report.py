"""`python -m evaluate prism-report`: PRISM's own reports (paige-ai/Prism, its Perceiver and BioGPT decoder,
extract/slide_encoders/prism_decoder.py) for the slides of a store of Virchow (v1) tile features, as a baseline
scored beside our reporter: predictions.jsonl in the format `python -m train.generate` writes and `python -m
evaluate report --predictions` reads ({id, slide, patient_id, text} per slide), and predictions_manifest.json
beside it (weights and their sha256, tokenizer, settings, seed, device, precision, the slides that failed).

Decoding as PRISM's model card: beam search with 5 beams, no sampling, from BioGPT's BOS; fp16 autocast on CUDA,
fp32 on the CPU. One bad slide (no tiles, NaN features, NaN out at fp16) is recorded and skipped."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from extract.slide_embeddings import autocast, check_tile_store, resolve_precision
from extract.slide_encoders import SlideEncoder, registered_slide_encoder
from extract.slide_encoders.prism_decoder import PRISM_HUB_ID, RANDOM_WEIGHTS, PrismReporter, load_prism_reporter
from slidecache.cohorts.ids import SlideMatcher, patient_key
from slidecache.devices import pick_device
from slidecache.errors import ConfigError, EncoderError, EvaluationError
from slidecache.json_out import dumps
from slidecache.provenance import provenance
from store.backends import display_url
from store.embedding_store import EmbeddingStore

PREDICTIONS = "predictions.jsonl"


@dataclass(frozen=True)
class PrismReportSettings:
    store: str
    out: str  # folder: predictions.jsonl and predictions_manifest.json
    weights: str = PRISM_HUB_ID  # hub id, model.safetensors or its folder, or prism-random
    tokenizer: str | None = None  # BioGPT's vocab.json + merges.txt: a folder or hub id (default: beside, else hub)
    slides: tuple[str, ...] = ()  # default: every slide of the store
    references: str | None = None  # or: only the slides these references name
    device: str = "auto"
    precision: str = "auto"
    max_new_tokens: int = 128
    num_beams: int = 5
    any_tiling: bool = False
    seed: int = 0
    progress_every: int = 10  # slides between progress lines


@dataclass
class PrismReportResult:
    predictions: Path
    manifest: Path
    written: int
    failed: dict[str, str] = field(default_factory=dict)  # slide → error
    seconds: float = 0.0

    def lines(self) -> list[str]:
        failed = f"{len(self.failed)} slides failed, listed in {self.manifest.name}" if self.failed else "none failed"
        return [f"wrote {self.written} PRISM reports to {self.predictions} ({failed}) in {self.seconds:.1f} s; score "
                f"them with `python -m evaluate report --predictions {self.predictions} --references ...`"]


def _check(settings: PrismReportSettings) -> None:
    if settings.slides and settings.references:
        raise ConfigError("give --slides or --references (the slides the references name), not both")
    if settings.num_beams < 1 or settings.max_new_tokens < 1:
        raise ConfigError(f"--num-beams and --max-new-tokens must be at least 1 (got {settings.num_beams}, "
                          f"{settings.max_new_tokens})")


def _store_reader(weights: str) -> SlideEncoder:
    """PRISM's resampler as extract's store check sees it, before a weights file is fetched: `prism`, or
    `prism-random`, which also reads the random Virchow twin's features."""
    random = weights == RANDOM_WEIGHTS
    spec = registered_slide_encoder("prism-random" if random else "prism")
    # check_tiles reads the spec and whether the weights are random (the sha256 is not known before the file is)
    return SlideEncoder(spec, torch.nn.Identity(), weights, None if random else "(hashed when loaded)")


def select_slides(store: EmbeddingStore, slides: tuple[str, ...], references: str | None) -> tuple[list[str], str]:
    """The slides to report on and a line saying how they were chosen: `slides` (each must be in the store), the
    store's slides that `references` names (matched as `evaluate report` matches them), or all."""
    where = display_url(store.url)
    every = store.slide_ids()
    if slides:
        absent = [s for s in slides if s not in set(every)]
        if absent:
            raise EvaluationError(f"{where} holds no complete slide {', '.join(map(repr, absent[:5]))} (of "
                                  f"{len(absent)} asked for); `python -m store ls {where}` lists its {len(every)}")
        return list(dict.fromkeys(slides)), f"{len(slides)} slides named by --slides"
    if references is None:
        return every, f"all {len(every)} slides of the store"
    from evaluate.report_inputs import ids_and_texts, read_reference_sets

    path = Path(references)
    keys = list(read_reference_sets(path)) if path.suffix == ".json" else list(ids_and_texts(path))
    patients = {s: patient_key(store.slide(s).patient_id) for s in every}
    chosen = sorted(s for s in SlideMatcher(patients).rekey(keys, str(path), EvaluationError) if s in patients)
    if not chosen:
        raise EvaluationError(f"none of the {len(keys)} report ids of {path} names a slide of {where} (matched by "
                              "slide id, TCGA barcode or patient id): is it this store's cohort?")
    return chosen, f"{len(chosen)} slides of the store that {path.name} names"


def run_prism_report(settings: PrismReportSettings, config: Mapping[str, Any] | None = None,
                     log: Callable[[str], None] = print) -> PrismReportResult:
    _check(settings)
    started = time.perf_counter()
    device = pick_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    store = EmbeddingStore.open(settings.store)
    check_tile_store(_store_reader(settings.weights), store, settings.any_tiling)  # refused before any download
    slides, chosen = select_slides(store, settings.slides, settings.references)
    reporter = load_prism_reporter(settings.weights, settings.tokenizer, device, settings.seed)
    notes = check_tile_store(reporter.slide_encoder(), store, settings.any_tiling)  # the loaded widths
    if settings.max_new_tokens > reporter.max_new_tokens:
        raise ConfigError(f"--max-new-tokens {settings.max_new_tokens}: PRISM's decoder ({reporter.weights_id}) has "
                          f"positions for {reporter.max_new_tokens} new tokens after its start token: give at most "
                          f"{reporter.max_new_tokens}")
    log(f"[prism-report] {display_url(store.url)}: {chosen}, reported by PRISM ({reporter.weights_id}) on {device} "
        f"({precision}), {settings.num_beams} beams, at most {settings.max_new_tokens} new tokens"
        + "".join(f"\n[prism-report] note: {n}" for n in notes))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    predictions = out / PREDICTIONS
    partial = predictions.with_name(predictions.name + ".partial")
    failed: dict[str, str] = {}
    written = tokens = 0
    with open(partial, "w", encoding="utf-8") as f:
        for done, slide_id in enumerate(slides, 1):
            try:  # one bad slide is recorded; the rest go on
                row = _report(reporter, store, slide_id, settings, device, precision)
                f.write(json.dumps(row) + "\n")
                written, tokens = written + 1, tokens + row["new_tokens"]
            except Exception as e:  # noqa: BLE001 (recorded with its class in the manifest)
                failed[slide_id] = f"{type(e).__name__}: {e}"
                log(f"[prism-report] FAILED: {slide_id}: {failed[slide_id]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # after an out-of-memory slide, the next one gets the memory back
            if done % settings.progress_every == 0 or done == len(slides):
                elapsed = max(time.perf_counter() - started, 1e-9)
                log(f"[prism-report] progress: {done}/{len(slides)} slides ({len(failed)} failed), "
                    f"{done / elapsed:.2f} slides/s, {tokens / elapsed:.1f} new tokens/s")
    partial.replace(predictions)
    seconds = time.perf_counter() - started
    manifest = predictions.with_name(f"{predictions.stem}_manifest.json")
    record = provenance({**(config or {}), "store": settings.store, "weights": settings.weights,
                         "max_new_tokens": settings.max_new_tokens, "num_beams": settings.num_beams,
                         "do_sample": False, "seed": settings.seed}) | {
        "reporter": reporter.describe(), "store_fingerprint": store.fingerprint, "device": str(device),
        "autocast": None if precision == "fp32" else precision, "slides": chosen, "reports": written,
        "new_tokens": tokens, "seconds": round(seconds, 3), "slides_per_second": len(slides) / max(seconds, 1e-9),
        "failed": failed, "tiling_notes": notes}
    manifest.write_text(dumps(record))
    if not written:
        raise EvaluationError(f"no slide gave a PRISM report ({len(failed)} failed; first: "
                              f"{next(iter(failed.items()), ('', 'none'))}); see {manifest}")
    return PrismReportResult(predictions, manifest, written, failed, seconds)


def _report(reporter: PrismReporter, store: EmbeddingStore, slide_id: str, settings: PrismReportSettings,
            device: torch.device, precision: str) -> dict[str, Any]:
    """One slide's prediction row."""
    started = time.perf_counter()
    slide = store.slide(slide_id)
    if not slide.n_tiles:
        raise EncoderError(f"slide {slide_id!r} has no tiles ({slide.attrs.get('empty_reason') or 'empty'})")
    with autocast(device, precision):
        ids = reporter.generate(slide.embeddings(), settings.num_beams, settings.max_new_tokens)
    return {"id": slide_id, "slide": slide_id, "patient_id": patient_key(slide.patient_id),
            "text": reporter.text(ids), "new_tokens": len(ids), "seconds": round(time.perf_counter() - started, 3)}

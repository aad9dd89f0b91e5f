"""One new slide → a report page: `python -m train.generate --checkpoint RUN --store STORE --slide PATH`.

The slide is read, tiled and encoded exactly as the store's own slides were (the extraction config the store
recorded: encoder, weights, tiling, tissue), into a one-slide store in the page folder whose fingerprint must
equal the store's; a slide the store already holds is read from it and not encoded again. The checkpoint
writes the report; saved survival and grade heads (`python -m evaluate ... --save-head DIR`) add the risk
group and the grade; a MIL head's tile attention is drawn over the thumbnail. The page (report.html,
self-contained) and report.json record the models that made each part.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slidecache.cohorts.ids import patient_id_for, validate_slide_id
from slidecache.cohorts.slides import SlideEntry
from slidecache.errors import ConfigError, SlideReadError, StoreNotFound
from slidecache.provenance import provenance, spec_differences
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from store.slide_view import SlideView

SLIDE_STORE = "slide_store.zarr"
PAGE, RECORD, PICTURE = "report.html", "report.json", "thumbnail.png"


def slide_entry(path: str | Path) -> SlideEntry:
    """The cohort entry of one slide file (or DICOM folder), named as a slide folder would name it."""
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"--slide {path}: no such file or folder")
    slide_id = validate_slide_id(path.name if path.is_dir() else path.stem)
    return SlideEntry(slide_id, str(path), patient_id_for(slide_id))


def extraction_config_of(store: EmbeddingStore, weights: str | None = None,
                         mpp_override: float | None = None) -> Any:
    """The store's recorded extraction spec, to encode one more slide as its own were (the fingerprint check
    below proves it), run with this command's own run options."""
    from extract.config import ExtractConfig, ExtractSpec, RunOptions

    recorded = dict(store.provenance.get("config") or {})
    if store.imported or not recorded or store.kind != "slides":
        raise ConfigError(f"{display_url(store.url)} records no extraction config (an imported or images store): a "
                          "new slide cannot be encoded as its slides were; extract it into a slidecache store first")
    tiling = store.spec["tiling"]  # the fingerprinted values win (older stores recorded `tokens` redacted)
    recorded |= {k: tiling[k] for k in ("target_mpp", "tile_px", "stride_px", "tokens") if k in tiling}
    spec = ExtractSpec.from_recorded(recorded)
    if spec.weights and not weights and str(spec.weights).endswith(".safetensors") and not Path(spec.weights).is_file():
        raise ConfigError(f"the store was encoded with local weights {spec.weights}, absent here: pass --weights PATH")
    spec = dataclasses.replace(spec, weights=weights or spec.weights)
    return ExtractConfig.of(spec, RunOptions(mpp_override=mpp_override, executor="local", retry_failed=True))


def encode_new_slide(entry: SlideEntry, store: EmbeddingStore, page_dir: Path, weights: str | None = None,
                     log: Any = print, mpp_override: float | None = None) -> EmbeddingStore:
    """The one-slide store page_dir/slide_store.zarr, the slide encoded with the store's encoder and tiling."""
    from extract.executors import executor_session
    from extract.job import Extraction
    from extract.summary import SlideStatus

    cfg = extraction_config_of(store, weights, mpp_override)
    url = str(page_dir / SLIDE_STORE)
    with executor_session(cfg) as executor:
        summary = Extraction([entry], [(url, cfg)], log=log, executor=executor).run()
    outcome = summary.outcomes[0]
    if outcome.status not in (SlideStatus.DONE, SlideStatus.SKIPPED):
        why = outcome.error or ("no tissue tiles found" if outcome.status == SlideStatus.EMPTY else outcome.status)
        raise SlideReadError(f"--slide {entry.path}: not encoded ({why})")
    encoded = EmbeddingStore.open(url)
    if encoded.fingerprint != store.fingerprint:
        diffs = "; ".join(spec_differences(store.spec, encoded.spec)) or "the fingerprints differ"
        raise ConfigError(f"--slide {entry.path} was encoded differently from {display_url(store.url)}'s slides "
                          f"({diffs}): give the weights the store was made with (--weights)")
    return encoded


def _open_if_present(url: Path) -> EmbeddingStore | None:
    try:
        return EmbeddingStore.open(str(url)) if url.exists() else None
    except StoreNotFound:
        return None


def _why_not_reusable(held: EmbeddingStore, entry: SlideEntry, mpp_override: float | None) -> str | None:
    """Why the slide `held` has under this name is not this file read this way (None: reuse it)."""
    from extract.slide_source import source_difference

    attrs = held.slide(entry.slide_id).attrs
    difference = source_difference(attrs.get("source"), entry.path)
    if difference is None and mpp_override is not None and not math.isclose(float(attrs.get("mpp") or 0), mpp_override):
        difference = f"it was read at {attrs.get('mpp')} µm/px, --mpp-override is {mpp_override}"
    return difference


def store_holding(entry: SlideEntry, store: EmbeddingStore, page_dir: Path, weights: str | None = None,
                  log: Any = print, mpp_override: float | None = None) -> tuple[EmbeddingStore, bool]:
    """(a store holding the slide, whether it was encoded now): the store itself when it holds this very file
    (by content, not by name) read at this pixel size, else the page folder's one-slide store, encoded anew when
    it holds another file or another reading."""
    if entry.slide_id in store:
        difference = _why_not_reusable(store, entry, mpp_override)
        if difference is None:
            log(f"[slide] {entry.slide_id} is in {display_url(store.url)} already (fingerprint "
                f"{store.fingerprint[:12]}, same file content): not encoded again")
            return store, False
        log(f"[slide] {display_url(store.url)} holds another reading of {entry.slide_id} ({difference}): "
            f"encoding {entry.path} itself")
    cached = page_dir / SLIDE_STORE
    earlier = _open_if_present(cached)
    if earlier is not None and earlier.fingerprint == store.fingerprint and entry.slide_id in earlier:
        difference = _why_not_reusable(earlier, entry, mpp_override)
        if difference is None:
            log(f"[slide] {entry.slide_id} was encoded into {earlier.url} by an earlier run: not encoded again")
            return earlier, False
        log(f"[slide] {cached} holds another reading of {entry.slide_id} ({difference}): replacing it")
    if cached.exists():  # this page's own cache, of another file or encoder: the page is rewritten below anyway
        shutil.rmtree(cached)
    log(f"[slide] encoding {entry.path} with the store's encoder and tiling into {cached}")
    return encode_new_slide(entry, store, page_dir, weights, log, mpp_override), True


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def draw_picture(slide: SlideView, page_dir: Path, attention_head: Any = None) -> Path | None:
    """thumbnail.png: the stored thumbnail, with a MIL head's tile attention over it when one is given."""
    path = page_dir / PICTURE
    if attention_head is not None:
        from slidecache.heads.heatmap import draw_heatmap

        draw_heatmap(attention_head, slide, path, f"{slide.slide_id}: attention of the saved MIL head")
        return path
    stored = slide.thumbnail()
    if stored is None:
        return None
    path.write_bytes(_png(stored[0][..., :3]))
    return path


def _row(name: str, value: Any) -> str:
    return f"<tr><th>{html.escape(name)}</th><td>{html.escape(str(value))}</td></tr>"


def write_page(page_dir: Path, record: dict[str, Any], picture: Path | None) -> Path:
    """report.html, self-contained (the picture inlined), so it can be mailed or archived as one file."""
    image = ("<p>no thumbnail stored for this slide</p>" if picture is None else
             f'<img id="thumbnail" alt="slide thumbnail" src="data:image/png;base64,'
             f'{base64.b64encode(picture.read_bytes()).decode()}">')
    predictions = "".join(_row(k, v) for k, v in record["prediction_rows"])
    versions = "".join(_row(k, v) for k, v in record["version_rows"])
    text = html.escape(record["report"]).replace("\n", "<br>")
    warnings = "".join(f'<p class="warning">warning: {html.escape(w)}</p>'
                       for w in record.get("generation_warnings", []))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(record['slide_id'])}: slidecache report</title>
<style>
body {{ font-family: sans-serif; margin: 16px; display: grid; grid-template-columns: 520px 1fr; gap: 24px; }}
h1 {{ grid-column: 1 / 3; font-size: 20px; margin: 0; }}
#thumbnail {{ width: 512px; border: 1px solid #ccc; }}
#report {{ font-size: 15px; line-height: 1.5; background: #f6f6f6; padding: 12px; }}
.warning {{ background: #fff4d6; padding: 6px; }}
table {{ border-collapse: collapse; font-size: 13px; }} th, td {{ text-align: left; padding: 3px 8px; border-bottom: 1px solid #ddd; }}
</style></head>
<body>
<h1>{html.escape(record['slide_id'])}</h1>
<div>{image}</div>
<div>
<h2>Report</h2><p id="report">{text}</p>{warnings}
<h2>Predictions</h2><table id="predictions">{predictions or _row("heads", "none given")}</table>
<h2>Models</h2><table id="versions">{versions}</table>
</div>
</body></html>
"""
    path = page_dir / PAGE
    partial = path.with_name(PAGE + ".partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)
    return path


def prediction_rows(predictions: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    rows = []
    if "survival" in predictions:
        p = predictions["survival"]
        rows.append((f"{p['endpoint']} risk group", f"{p['risk_group']} (risk {p['risk']:.3f}; cut {p['risk_cut']:.3f}, "
                                                     f"the median of the patients the {p['head']} head was fitted on)"))
    if "grade" in predictions:
        p = predictions["grade"]
        ranked = ", ".join(f"{c} {v:.2f}" for c, v in sorted(p["probabilities"].items(), key=lambda kv: -kv[1]))
        rows.append(("grade", f"{p['grade']} ({p['head']} head: {ranked})"))
    return rows


def version_rows(checkpoint: str, spec: Any, store: EmbeddingStore, heads: dict[str, Any]) -> list[tuple[str, str]]:
    encoder = store.spec["encoder"]
    manifest = Path(checkpoint) / "run_manifest.json"
    trained_with = json.loads(manifest.read_text()).get("code_version", "?") if manifest.is_file() else "?"
    rows = [("reporter", f"{checkpoint} (LLM {spec.llm_path}, LoRA r{spec.lora_rank}, at most {spec.max_tiles} tiles; "
                         f"trained with slidecache {trained_with})"),
            ("encoder", f"{encoder.get('name')} ({encoder.get('weights_id', '?')}"
                        f"{', sha256 ' + str(encoder['weights_sha256'])[:12] if encoder.get('weights_sha256') else ''})"),
            ("store", f"{display_url(store.url)} (fingerprint {store.fingerprint[:12]})")]
    for task, (folder, head) in heads.items():
        rows.append((f"{task} head", f"{folder} ({head.card['head']}, {head.card.get('patients')} patients, "
                                     f"slidecache {head.card.get('code_version', '?')})"))
    return rows + [("this page", f"slidecache {provenance()['code_version']}")]


def report_slide(checkpoint: str, slide_path: str | Path, store_url: str, page_dir: str | Path | None = None,
                 survival_head: str | None = None, grade_head: str | None = None, weights: str | None = None,
                 prompt: str | None = None, max_new_tokens: int = 128, seed: int = 0, device: str = "auto",
                 log: Any = print, mpp_override: float | None = None) -> dict[str, Any]:
    """Encode (or reuse) the slide, write its report and head predictions, and the page. Returns report.json."""
    import torch

    from slidecache.devices import pick_device
    from slidecache.heads.saved import load_head
    from train.annotations import QUESTION
    from train.checkpoint import load_for_inference
    from train.data import ConversationEncoder, Sample, SlideConversationDataset
    from train.generation import generate_batch, open_checked
    from train.generation_checks import check_generations

    torch.manual_seed(seed)
    entry = slide_entry(slide_path)
    page = Path(page_dir) if page_dir else Path("slide_reports") / entry.slide_id
    page.mkdir(parents=True, exist_ok=True)
    spec, store = open_checked(checkpoint, store_url)  # checkpoint, heads and slide checked before the LLM is built
    heads = {task: (folder, load_head(folder, store.fingerprint))
             for task, folder in (("survival", survival_head), ("grade", grade_head)) if folder}
    for task, (folder, head) in heads.items():
        if head.task != task:
            raise ConfigError(f"--{task}-head {folder} holds a {head.task} head")
    holder, encoded_now = store_holding(entry, store, page, weights, log, mpp_override)
    slide = holder.slide(entry.slide_id)
    if slide.n_tiles == 0:
        raise SlideReadError(f"--slide {slide_path}: no tissue tiles ({slide.attrs.get('empty_reason', 'empty')})")

    target = pick_device(device)
    model, loaded, _ = load_for_inference(checkpoint, target)
    question = QUESTION if prompt is None else prompt if "<image>" in prompt else f"<image>\n{prompt}"
    sample = Sample(f"--slide {slide_path}", entry.slide_id, [entry.slide_id],
                    [{"from": "human", "value": question}, {"from": "gpt", "value": ""}])
    dataset = SlideConversationDataset([sample], holder.url, ConversationEncoder(loaded.tokenizer, spec.system_message),
                                       spec.max_tiles, 1 << 20, training=False, seed=seed,
                                       resampler_tokens=spec.resampler_tokens)
    texts, _ = generate_batch(model, loaded, [dataset[0]], target, {"max_new_tokens": max_new_tokens,
                                                                     "do_sample": False, "use_cache": True})
    warnings = check_generations(texts).warnings()
    for warning in warnings:
        log(f"warning: {warning}")
    predictions = {task: head.predict(slide) for task, (_, head) in heads.items()}
    attention = next((h.abmil for _, h in heads.values() if h.abmil is not None), None)
    picture = draw_picture(slide, page, attention)
    record = {"slide_id": entry.slide_id, "slide": str(slide_path), "page_dir": str(page), "encoded_now": encoded_now,
              "tiles": int(slide.n_tiles), "tiles_used": int(min(slide.n_tiles, spec.max_tiles)),
              "report": texts[0], "generation_warnings": warnings, "predictions": predictions,
              "heatmap": attention is not None,
              "prediction_rows": prediction_rows(predictions),
              "version_rows": version_rows(checkpoint, spec, store, heads),
              "store_fingerprint": store.fingerprint, "checkpoint": checkpoint,
              "heads": {task: {"folder": folder, **head.card} for task, (folder, head) in heads.items()}}
    write_page(page, record, picture)
    manifest = provenance({"checkpoint": checkpoint, "slide": str(slide_path), "store": store_url,
                           "survival_head": survival_head, "grade_head": grade_head, "prompt": question,
                           "max_new_tokens": max_new_tokens, "seed": seed, "device": str(target),
                           "mpp_override": mpp_override})
    (page / RECORD).write_text(json.dumps(record | {"provenance": manifest}, indent=2, default=str))
    return record

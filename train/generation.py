"""Generation from a checkpoint and the store, as a library: batches of reports, one image's answer, and the
checks that a checkpoint and a store belong together. `python -m train.generate` is its command."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from slidecache.devices import pick_device
from slidecache.errors import TrainingError
from slidecache.provenance import provenance
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from train.checkpoint import ModelSpec, load_for_inference, read_spec
from train.data import (
    Collator,
    ConversationEncoder,
    SlideConversationDataset,
    load_samples,
    patient_of,
    select_by_split,
)
from train.generation_checks import check_generations

DEFAULT_IMAGE_PROMPT = "Describe this image."


def open_checked(checkpoint: str, store_url: str) -> tuple[ModelSpec, EmbeddingStore]:
    """The checkpoint's spec and the store, refused unless the store is the one it trained on (no model built)."""
    spec = read_spec(checkpoint)
    store = EmbeddingStore.open(store_url)
    if spec.store_fingerprint != store.fingerprint:
        raise TrainingError(f"the checkpoint was trained on a store with fingerprint {spec.store_fingerprint[:12]}, "
                            f"{display_url(store_url)} has {store.fingerprint[:12]}: its embeddings come from another "
                            "encoder or tiling")
    return spec, store


def load_checked(checkpoint: str, store_url: str, device: torch.device) -> tuple[Any, Any, Any, EmbeddingStore]:
    """The checkpoint's model on `device` and the store, refused unless the store is the one it trained on."""
    spec, store = open_checked(checkpoint, store_url)
    model, loaded, _ = load_for_inference(checkpoint, device)
    return model, loaded, spec, store


def _generate(model: Any, loaded: Any, batch: dict[str, torch.Tensor], target: torch.device,
              options: dict[str, Any]) -> tuple[list[str], int]:
    """(decoded texts, new tokens) for one collated batch; bf16 autocast on CUDA."""
    batch = {k: v.to(target) for k, v in batch.items() if k != "labels"}
    with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
        new_tokens = model.generate(**batch, **options)
    count = int((new_tokens != loaded.tokenizer.pad_token_id).sum())  # finished rows are padded
    return [t.strip() for t in loaded.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)], count


def generate_batch(model: Any, loaded: Any, items: list[dict[str, Any]], target: torch.device,
                   options: dict[str, Any]) -> tuple[list[str], int]:
    """Generation for dataset items (input_ids, labels, tiles), collated left-padded."""
    return _generate(model, loaded, Collator(loaded.tokenizer.pad_token_id, left_pad=True)(items), target, options)


def generate_reports(checkpoint: str, store_url: str, meta_path: str, out: str | Path, split: str | None = None,
                     fold: int = -1, subset: str = "test", batch_size: int = 8, max_new_tokens: int = 128,
                     do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9, seed: int = 0,
                     device: str = "auto", max_seq_length: int = 1 << 20) -> dict:
    torch.manual_seed(seed)
    target = pick_device(device)
    model, loaded, spec, store = load_checked(checkpoint, store_url, target)
    samples = load_samples(meta_path, seed)
    if split:
        samples, _ = select_by_split(samples, store, split, fold, subset)
    encoder = ConversationEncoder(loaded.tokenizer, spec.system_message)
    dataset = SlideConversationDataset(samples, store_url, encoder, spec.max_tiles, max_seq_length, training=False,
                                       seed=seed, resampler_tokens=spec.resampler_tokens)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(loaded.tokenizer.pad_token_id, left_pad=True))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    started, done, tokens, written = time.perf_counter(), 0, 0, []
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True}  # the KV cache
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    with open(partial, "w", encoding="utf-8") as f:
        for batch in loader:
            texts, new_tokens = _generate(model, loaded, batch, target, options)
            tokens += new_tokens
            for text in texts:
                sample = dataset.samples[done]
                visual = sample.slides[0] if len(sample.slides) == 1 else sample.slides
                row = ({"id": sample.id, "image": sample.meta.get("image"), "key": visual} if sample.kind == "image"
                       else {"id": sample.id, "slide": visual, "patient_id": patient_of(store, sample.slides[0])})
                f.write(json.dumps(row | {"text": text, "reference": sample.reference}) + "\n")
                written.append(text)
                done += 1
            elapsed = time.perf_counter() - started
            rate = done / elapsed
            print(f"  {done}/{len(dataset)} reports, {rate:.2f}/s, {tokens / elapsed:.1f} tokens/s, "
                  f"ETA {(len(dataset) - done) / rate:.0f} s", flush=True)
    partial.replace(out)
    check = check_generations(written)
    for warning in check.warnings():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    manifest = provenance({"checkpoint": checkpoint, "store": store_url, "meta_path": meta_path, "split": split,
                           "fold": fold, "subset": subset if split else None, "seed": seed, **options}) | {
        "reports": done, "new_tokens": tokens, "tokens_per_second": tokens / max(time.perf_counter() - started, 1e-9),
        "device": str(target), "autocast": "bf16" if target.type == "cuda" else None,
        "generation_check": check.as_dict()}
    (out.parent / f"{out.stem}_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return {"reports": done, "seconds": time.perf_counter() - started, "new_tokens": tokens,
            "warnings": check.warnings()}


def answer_image(checkpoint: str, image: str, store_url: str, prompt: str = DEFAULT_IMAGE_PROMPT,
                 weights: str | None = None, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, device: str = "auto") -> str:
    """Encode a new image with the store's encoder and tiling (train.live_image) and answer `prompt` about it."""
    from train.live_image import encode_image

    torch.manual_seed(seed)
    target = pick_device(device)
    model, loaded, spec, store = load_checked(checkpoint, store_url, target)
    visual = encode_image(image, store, weights, target)
    conversation = [{"from": "human", "value": f"<image>\n{prompt}"}, {"from": "gpt", "value": ""}]
    ids, labels = ConversationEncoder(loaded.tokenizer, spec.system_message).encode(conversation, [len(visual)],
                                                                                    prompt_only=True)
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "use_cache": True}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    texts, _ = generate_batch(model, loaded, [{"input_ids": ids, "labels": labels, "tiles": visual}], target, options)
    for warning in check_generations(texts).warnings():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return texts[0]

"""Reports regenerated with the slide taken away: the generation half of the grounding check
(`python -m evaluate report --checkpoint RUN --store STORE`; scoring in evaluate/grounding.py).

For each annotation id given, three greedy generations with the same prompt and settings:
- `original`: the sample's own slides;
- `swapped`: the tiles of a donor sample's slides (another patient, chosen by the caller);
- `blank`: as many tiles as the sample's own, each the training mean tile (zeros once standardised), so the
  image carries nothing.
A reporter that reads the slide follows the donor; an image-blind one writes the same report three times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slidecache.devices import pick_device
from slidecache.errors import TrainingError
from slidecache.jsonl import read_jsonl
from train.data import ConversationEncoder, Sample, SlideConversationDataset, _parse_row
from train.generation import generate_batch, load_checked

CONDITIONS = ("original", "swapped", "blank")


def annotation_samples(path: str | Path, ids: set[str]) -> dict[str, Sample]:
    """The samples of an annotation jsonl (InternVL conversations with "slide") whose id is in `ids`."""
    found: dict[str, Sample] = {}
    for number, row in read_jsonl(path, TrainingError):
        if str(row.get("id")) in ids and "conversations" in row:
            sample = _parse_row(row, f"{path}, line {number}")
            found.setdefault(sample.id, sample)
    missing = sorted(ids - set(found))
    if missing:
        raise TrainingError(f"{path}: no annotation with conversations for {len(missing)} ids (e.g. {missing[:3]}): "
                            "give the annotations the reports were generated from as --references")
    return found


def ablated_reports(checkpoint: str, store_url: str, annotations: str | Path, donors: dict[str, str],
                    batch_size: int = 8, max_new_tokens: int = 128, seed: int = 0, device: str = "auto"
                    ) -> dict[str, dict[str, str]]:
    """{condition: {id: text}} for each id in `donors` (id → the donor's id, both annotation ids)."""
    torch.manual_seed(seed)
    target = pick_device(device)
    model, loaded, spec, store = load_checked(checkpoint, store_url, target)
    samples = annotation_samples(annotations, set(donors) | set(donors.values()))
    if any(s.kind != "slide" for s in samples.values()):
        raise TrainingError("the grounding check swaps slides: it needs slide annotations, not images")
    encoder = ConversationEncoder(loaded.tokenizer, spec.system_message)
    ids = sorted(donors)
    own = [samples[i] for i in ids]
    # the donor's tiles under the receiving sample's conversation (its id kept: the output is keyed by it)
    swapped = [Sample(s.source, s.id, samples[donors[s.id]].slides, s.conversations, s.meta, s.kind) for s in own]
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "use_cache": True}
    out: dict[str, dict[str, str]] = {}
    for condition, chosen in (("original", own), ("swapped", swapped), ("blank", own)):
        dataset = SlideConversationDataset(chosen, store_url, encoder, spec.max_tiles, 1 << 20, training=False,
                                           seed=seed, resampler_tokens=spec.resampler_tokens)
        texts: list[str] = []
        for start in range(0, len(dataset), batch_size):
            items: list[dict[str, Any]] = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            if condition == "blank":
                items = [item | {"tiles": model.blank_tiles(len(item["tiles"])).numpy()} for item in items]
            texts += generate_batch(model, loaded, items, target, options)[0]
        out[condition] = dict(zip(ids, texts))
    return out

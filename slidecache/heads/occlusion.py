"""Occlusion of tiles for heads without attention (slide-vector heads on a pooling of the tiles): a tile's score is
the head's output for the patient with every tile minus its output with that tile (or its group of k×k
neighbouring tiles, on a large slide) left out of the slide's pooled vector, the patient's other slides kept.

The left-out vectors are closed forms of per-group sums (mean, cls) or per-group maxima (max), read from the
stored rows block by block, never the whole slide at once: the slide's own vector stays the one stored at commit
(store/slide_writer.py: float64 sum of the float16 rows over n, or their max; cls the class-token half of the
mean) and the patient's vector the mean of its slides' as evaluate/features.py averages them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from slidecache.errors import EvaluationError
from slidecache.heads.slide_tiles import SlideTiles

MAX_EVALUATIONS = 2000  # head evaluations per slide: larger slides occlude k×k groups of tiles
PREDICT_BATCH = 512  # left-out patient vectors per call of the head


@dataclass(frozen=True)
class Occlusion:
    """Every tile's score (its group's, when tiles are occluded in groups) and how it was made."""

    scores: np.ndarray  # (n_tiles,) head output with every tile minus without the tile's group
    group_side: int  # k: groups are k×k cells of the tile grid (1: each tile alone)
    groups: int
    evaluations: int  # head evaluations: one per group and one with every tile
    full_output: float  # the head's output for the patient with every tile

    def record(self) -> dict[str, object]:
        occluded = "each tile" if self.group_side == 1 else f"{self.group_side}x{self.group_side} tile groups"
        return {"method": "occlusion", "occluded": occluded, "group_side_tiles": self.group_side,
                "groups": self.groups, "evaluations": self.evaluations, "full_output": self.full_output,
                "score_range": [float(self.scores.min()), float(self.scores.max())]}


def grid_groups(coords: np.ndarray, tile: float, max_groups: int = MAX_EVALUATIONS) -> tuple[np.ndarray, int]:
    """(group of each tile, k): the smallest k whose k×k cells of the tile grid number at most `max_groups`."""
    cells = np.rint((coords - coords.min(axis=0)) / tile).astype(np.int64)
    side = max(1, int(np.sqrt(len(coords) / max_groups)))
    while True:
        cell = cells // side
        _, groups = np.unique(cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1], return_inverse=True)
        if groups.max() + 1 <= max_groups:
            return groups.reshape(-1), side
        side += 1


def _group_reductions(slide: SlideTiles, groups: np.ndarray, n_groups: int, kind: str, width: int) -> np.ndarray:
    """(n_groups, width) per-group sums (float64, as the writer sums) or maxima of the stored rows' first `width`
    dimensions, streamed block by block."""
    mean = kind != "max"
    out = np.zeros((n_groups, width)) if mean else np.full((n_groups, width), -np.inf, dtype=np.float32)
    for rows in slide.row_blocks():
        block = slide.embeddings(rows)[:, :width]
        order = np.argsort(groups[rows], kind="stable")
        sorted_groups = groups[rows][order]
        starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
        present = sorted_groups[starts]
        if mean:
            out[present] += np.add.reduceat(block[order].astype(np.float64), starts, axis=0)
        else:
            out[present] = np.maximum(out[present], np.maximum.reduceat(block[order], starts, axis=0).astype(np.float32))
    return out


def slide_vectors_without_groups(slide: SlideTiles, groups: np.ndarray, kind: str) -> np.ndarray:
    """(n_groups, D) the slide's pooled vector with each group's tiles left out (closed forms). A slide of one
    group has no such vector: the caller leaves the slide out of the patient's average instead."""
    n_groups = int(groups.max()) + 1
    if n_groups < 2:
        raise EvaluationError(f"slide {slide.slide_id!r}: one tile group, nothing left when it is left out")
    width = len(slide.pooled(kind))  # cls: the class-token half of the mean
    reduced = _group_reductions(slide, groups, n_groups, kind, width)
    counts = np.bincount(groups, minlength=n_groups)
    if kind != "max":
        remaining = len(groups) - counts
        return (reduced.sum(axis=0) - reduced) / np.maximum(remaining, 1)[:, None]
    # Without group g, each dimension's max is the best other group's: the second best where g holds the best.
    top_two = np.partition(reduced, n_groups - 2, axis=0)[n_groups - 2:]
    best_group = reduced.argmax(axis=0)
    without = np.broadcast_to(top_two[1], reduced.shape).copy()
    holders = best_group[None, :] == np.arange(n_groups)[:, None]
    without[holders] = np.broadcast_to(top_two[0], reduced.shape)[holders]
    return without.astype(np.float64)


def occlusion_scores(slide: SlideTiles, other_slides: Sequence[SlideTiles], kind: str,
                     predict: Callable[[np.ndarray], np.ndarray], tile: float,
                     max_evaluations: int = MAX_EVALUATIONS) -> Occlusion:
    """Occlude `slide`'s tiles (in groups when there are more than `max_evaluations`) from the patient vector:
    the mean over `slide` and `other_slides` (the patient's others) of their `kind`-pooled vectors."""
    if not slide.attrs.get("n_tiles"):
        raise EvaluationError(f"--heatmaps: slide {slide.slide_id!r} has no tiles to occlude")
    groups, side = grid_groups(slide.coords().astype(np.float64), tile, max_evaluations)
    n_groups = int(groups.max()) + 1
    pooled = [slide.pooled(kind)] + [s.pooled(kind) for s in other_slides]
    full = np.mean(pooled, axis=0).astype(np.float32)  # the patient vector the head was fitted on
    others = np.sum([p.astype(np.float64) for p in pooled[1:]], axis=0) if other_slides else 0.0
    if n_groups == 1:  # one group is the whole slide: leaving it out leaves the patient's other slides
        if not other_slides:
            raise EvaluationError(f"--heatmaps: slide {slide.slide_id!r} has {len(groups)} tile(s) in one group and "
                                  "its patient no other slide: without it there is no patient vector to compare with")
        without = (others / len(other_slides))[None, :]
    else:
        without = (others + slide_vectors_without_groups(slide, groups, kind)) / len(pooled)
    full_output = float(np.asarray(predict(full[None, :])).reshape(-1)[0])
    left_out = np.concatenate([np.asarray(predict(without[start:start + PREDICT_BATCH]), dtype=np.float64).reshape(-1)
                               for start in range(0, n_groups, PREDICT_BATCH)])
    return Occlusion((full_output - left_out)[groups], side, n_groups, n_groups + 1, full_output)

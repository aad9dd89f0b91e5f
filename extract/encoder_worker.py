"""One encoder and the writers of the slides pinned to it: what a Ray encoder actor runs, and what the
single-node executor runs on a thread of the driver. A plain class, so it needs no Ray to import or run."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from extract.config import ExtractConfig


class EncoderWorker:
    """Calls come in the order the driver sent them: open_slide → encode_append × chunks → commit_slide."""

    def __init__(self, config: ExtractConfig, store_url: str, storage_options: dict[str, Any], node: str,
                 device: str | None = None) -> None:
        from extract.writers import PinnedWriters

        self.encoder = self._build_encoder(config, device)
        self.writers = PinnedWriters(store_url, storage_options, self.encoder.token_shape)
        self.node = node
        self.busy_s = 0.0  # time inside the encoder: the bench's busy fraction
        self.tiles = 0

    @staticmethod
    def _build_encoder(config: ExtractConfig, device: str | None) -> Any:
        import torch

        from extract.inference import BatchEncoder

        return BatchEncoder(config, torch.device(device) if device else None)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"encoder": self.encoder.describe(), "token_shape": self.encoder.token_shape,
                "device": str(self.encoder.device), "pid": os.getpid(), "threads": torch.get_num_threads(),
                "node": self.node}

    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "tiles": self.tiles}

    def open_slide(self, slide_id: str, attrs: dict[str, Any], pictures: tuple[np.ndarray, np.ndarray],
                   downsample: float, token: str, own_tokens: list[str]) -> str:
        thumbnail, mask = pictures
        return self.writers.open(slide_id, attrs, thumbnail, mask, downsample, token, own_tokens)

    def encode_append(self, slide_id: str, start: int, tiles: np.ndarray, coords: np.ndarray,
                      tissue: np.ndarray) -> int:
        if self.writers.refused(slide_id):  # another job has it: nothing to encode
            return 0
        self.writers.expect(slide_id, start)  # WriterRestarted before any encoding, if this process restarted
        began = time.perf_counter()
        emb, grid = self.encoder(tiles)
        self.busy_s += time.perf_counter() - began
        self.tiles += len(tiles)
        return self.writers.append(slide_id, start, coords, tissue, emb, grid)

    def commit_slide(self, slide_id: str, extra_attrs: dict[str, Any], empty_reason: str | None) -> dict[str, Any]:
        return {"rows": self.writers.commit(slide_id, extra_attrs, empty_reason), "node": self.node}

    def abort_slide(self, slide_id: str) -> None:
        self.writers.abort(slide_id)

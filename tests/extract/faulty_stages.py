"""Faulty stand-ins for the extraction's stages, given to an executor (extract.stages.Stages) by the fault tests:
each crashes a real process, or holds one, at the point where a real fault would.

- `ReaderExitingOn(TEXT)`: a reader process reading tiles of a slide whose path contains TEXT exits at once (a
  decoder's segfault, the OOM killer).
- `EncoderExitingOnUniformTile`: an encoder process handed a tile of one single colour (which no scanned tissue
  is) exits at once: a crash Ray sees as a dead actor (a kill, the OOM killer, a segfault in a kernel).
- `ImageEncoderExitingOn(TEXT)`: an `extract images` encoder process handed an image whose name contains TEXT
  exits at once.
- `pausing_after_first_append(S, PATH)`: an encoder that sleeps S seconds after its first append, or until PATH
  exists, holding its slides' leases, so that a second job over the same slides overlaps it.

Ray actors import this module by name: the driver's working directory (the repository root) is on their path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from extract.encoder_worker import EncoderWorker
from extract.image_worker import DynamicTiling, ImageEncoderWorker, ImageEntry, ImageOutcome
from extract.stages import read_in_reader

PAUSE_MESSAGE = "fault injection: pausing"  # what a pausing encoder prints, for a test to wait on


@dataclass(frozen=True)
class ReaderExitingOn:
    """The read stage, exiting its process on slides whose path contains `text`. A picklable callable (the local
    executor pickles its stages into its reader processes)."""

    text: str

    def __call__(self, reader: str, path: str, plan: Any, coords: np.ndarray) -> np.ndarray:
        if self.text in path:
            os._exit(18)  # no cleanup: what a SIGKILL or the OOM killer leaves
        return read_in_reader(reader, path, plan, coords)


class _ExitingOnUniformTile:
    """An encoder that exits its process when handed a tile of one single colour, else encodes as `encoder`."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def __call__(self, tiles: np.ndarray) -> Any:
        flat = tiles.reshape(len(tiles), -1, tiles.shape[-1])
        if len(tiles) and bool(((flat == flat[:, :1]).all(axis=(1, 2))).any()):
            os._exit(17)  # no cleanup: what a SIGKILL or the OOM killer leaves
        return self._encoder(tiles)


class EncoderExitingOnUniformTile(EncoderWorker):
    @staticmethod
    def _build_encoder(config: Any, device: str | None) -> Any:
        return _ExitingOnUniformTile(EncoderWorker._build_encoder(config, device))


class PausingAfterFirstAppend(EncoderWorker):
    """Sleeps `pause_s` after its first append, or until the file
    `resume_when` exists, whichever comes first (a test resumes it once another job is done, however slow)."""

    pause_s = 0.0
    resume_when = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.appended = False

    def _encode_append(self, i: int, slide_id: str, start: int, tiles: np.ndarray, coords: np.ndarray,
                       tissue: np.ndarray) -> int:
        rows = super()._encode_append(i, slide_id, start, tiles, coords, tissue)
        if not self.appended:
            self.appended = True
            self._pause()
        return rows

    def _pause(self) -> None:
        print(f"[extract] {PAUSE_MESSAGE} {self.pause_s:.0f} s after the first append", flush=True)
        deadline = time.monotonic() + self.pause_s
        while time.monotonic() < deadline and not (self.resume_when and os.path.exists(self.resume_when)):
            time.sleep(0.2)


def pausing_after_first_append(seconds: float, resume_when: str = "") -> type[EncoderWorker]:
    """An encoder worker class that pauses `seconds` after its first append, or until `resume_when` exists."""
    return type("PausingEncoderWorker", (PausingAfterFirstAppend,), {"pause_s": seconds, "resume_when": resume_when})


class ImageEncoderExitingOn(ImageEncoderWorker):
    """`extract images`' encoder, exiting its process when a batch holds an image whose name contains TEXT (set
    on a subclass: Ray builds the actor from the class alone)."""

    text = "poison"

    def encode_images(self, entries: list[ImageEntry], tiling: DynamicTiling) -> list[ImageOutcome]:
        if any(self.text in entry.image for entry in entries):
            os._exit(17)
        return super().encode_images(entries, tiling)

"""The one error hierarchy of slidecache.

Every error we raise derives from SlidecacheError and also from the builtin a caller would expect
(ValueError for bad input, KeyError for a missing slide, FileNotFoundError for a missing store), so
`except ValueError` still works for code that does not know us. Messages name the file, slide or line
and say what to do. Lives in `slidecache`, the library every stage imports.
"""

from __future__ import annotations


class SlidecacheError(Exception):
    """Base of every error slidecache raises on purpose."""


class ConfigError(SlidecacheError, ValueError):
    """A configuration value or command-line option that cannot be used."""


class StoreError(SlidecacheError):
    """Something about an embedding store as a whole."""


class StoreNotFound(StoreError, FileNotFoundError):
    """Opening a store that does not exist for reading."""


class StoreSchemaError(StoreError, ValueError):
    """A store whose root attributes are missing, of another schema version, or of another kind."""


class FingerprintMismatch(StoreError, ValueError):
    """Writing into a store made with a different encoder or tiling: the numbers would not mix."""


class StoreAccessError(StoreError, OSError):
    """A store location that cannot be used: no credentials, access denied, an unreachable endpoint."""


class SlideNotFound(StoreError, KeyError):
    """A slide id that is not (completely) in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class SlideWriteError(StoreError, ValueError):
    """Rows handed to a slide writer that do not fit the slide (shape, dtype, NaN, after commit)."""


class SlideBusy(StoreError, RuntimeError):
    """A slide that another live writer owns (its lease is current): that writer will commit it."""


class SlideOwnershipLost(SlideBusy):
    """This writer's slide was taken over by another (its lease expired); nothing of this writer is kept."""


class WriterRestarted(SlidecacheError, RuntimeError):
    """A slide's writer process restarted (killed, its node lost) and lost the rows it held: the slide is
    written again from its first tile, taking over its own lease at once."""


class InvalidSlideId(SlidecacheError, ValueError):
    """A slide id that could escape its folder or cannot be a key (separators, '..', control chars)."""


class CohortError(SlidecacheError, ValueError):
    """A cohort table or folder that cannot be turned into a slide list."""


class ClinicalTableError(SlidecacheError, ValueError):
    """A clinical table cell or column that cannot be parsed: the message names file, row and column."""


class InteropError(SlidecacheError, ValueError):
    """A TRIDENT/CLAM .h5 file that does not have the expected layout."""


class EncoderError(SlidecacheError, ValueError):
    """An encoder name, weights file or input that cannot be used."""


class SlideReadError(SlidecacheError, OSError):
    """A slide no reader could open or decode (names the file and each reader's complaint)."""


class ImageReadError(SlidecacheError, OSError):
    """An image of an InternVL-format dataset that is missing or cannot be decoded (`extract images`)."""


class ReaderDied(SlideReadError):
    """A reader process died under one of a slide's read tasks every time it ran (single-node executor)."""


class MppError(SlidecacheError, ValueError):
    """A slide whose physical pixel size is missing or implausible."""


class EvaluationError(SlidecacheError, ValueError):
    """Inputs an evaluation cannot use: no shared patients, a fold without events, an unknown endpoint."""


class AnnotationError(SlidecacheError, ValueError):
    """A training annotation that cannot be used: bad JSON, an unknown slide, a placeholder count mismatch,
    a sample longer than --max_seq_length. The message names the file and line."""


class PipelineError(SlidecacheError, RuntimeError):
    """A multi-stage run that cannot go on, e.g. every slide failed to extract: nothing to train or evaluate."""


class TrainingError(SlidecacheError, RuntimeError):
    """A training or generation run that cannot proceed: bad flags, a missing checkpoint, an LLM that will not load."""

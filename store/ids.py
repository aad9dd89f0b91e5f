"""Slide and patient identifiers."""

from __future__ import annotations

import hashlib
import re

from store.errors import InvalidSlideId

# TCGA barcode: TCGA-<TSS>-<participant>... ; the patient is the first 12 characters (TCGA-XX-XXXX).
TCGA_BARCODE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}(?:$|[-.])", re.IGNORECASE)
_FORBIDDEN = re.compile(r"[/\\\x00-\x1f\x7f]")
MAX_ID_LENGTH = 255


def validate_slide_id(slide_id: str) -> str:
    """Return the id unchanged, or raise InvalidSlideId saying what is wrong with it.

    Slide ids become zarr keys and h5 file names, so they must not hold separators, '..', control
    characters, nor be empty, '.', or start with '.' (hidden debris names are ours).
    """
    if not isinstance(slide_id, str):
        raise InvalidSlideId(f"slide id must be a string, got {type(slide_id).__name__}: {slide_id!r}")
    problem = None
    if not slide_id.strip():
        problem = "it is empty"
    elif _FORBIDDEN.search(slide_id):
        problem = "it contains a path separator or a control character"
    elif ".." in slide_id:
        problem = "it contains '..'"
    elif slide_id.startswith("."):
        problem = "it starts with '.'"
    elif slide_id != slide_id.strip():
        problem = "it has leading or trailing white space"
    elif len(slide_id) > MAX_ID_LENGTH:
        problem = f"it is longer than {MAX_ID_LENGTH} characters"
    if problem:
        raise InvalidSlideId(f"invalid slide id {slide_id!r}: {problem}; rename the slide or give an id column")
    return slide_id


def tcga_patient_id(identifier: str) -> str | None:
    """'TCGA-CR-7395-01Z-00-DX1.<uuid>' → 'TCGA-CR-7395'; None when it is not a TCGA barcode."""
    if TCGA_BARCODE.match(identifier):
        return identifier[:12].upper()
    return None


def patient_id_for(slide_id: str, patient_column: str | None = None) -> str:
    """TCGA barcode prefix when the slide id is one, else the table's patient id, else the slide id."""
    return tcga_patient_id(slide_id) or (patient_column.strip() if patient_column else None) or slide_id


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_key(dataset: str, image: str) -> str:
    """The store id of the image `image` of meta dataset `dataset`: readable, unique, and the same on every
    machine (it depends on the names in the annotations, not on where the files live)."""
    readable = _UNSAFE.sub("_", f"{dataset}__{image}").replace("..", "_.").lstrip(".")[:180]
    return f"{readable}-{hashlib.sha1(f'{dataset}/{image}'.encode()).hexdigest()[:10]}"

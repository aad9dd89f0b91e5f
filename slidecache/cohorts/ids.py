"""Slide and patient identifiers."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from slidecache.errors import InvalidSlideId, SlidecacheError

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


def tcga_site(identifier: str) -> str | None:
    """The tissue source site of a TCGA barcode ('TCGA-CR-7395' → 'CR': site-preserving folds keep each site in
    one fold, against batch effects); None when it is not a TCGA barcode."""
    return identifier[5:7].upper() if TCGA_BARCODE.match(identifier) else None


def patient_key(identifier: str) -> str:
    """The key that joins a patient across stores, clinical tables, splits and reports: the TCGA patient
    barcode when `identifier` is a TCGA barcode (of a slide, sample or patient), else `identifier` as given."""
    return tcga_patient_id(identifier) or identifier


def patient_id_for(slide_id: str, patient_column: str | None = None) -> str:
    """TCGA barcode prefix when the slide id is one, else the table's patient id, else the slide id."""
    return tcga_patient_id(slide_id) or (patient_column.strip() if patient_column else None) or slide_id


class SlideMatcher:
    """The one matching of report ids to slides: the import's (against the store's slides) and `evaluate
    report`'s (against the predicted slides). A slide id exactly, else by its TCGA barcode (the part before
    the first '.') when that names one slide, else a patient id (all its slides)."""

    def __init__(self, patient_of: Mapping[str, str]) -> None:
        self.patient_of = dict(patient_of)
        self.by_barcode: dict[str, list[str]] = defaultdict(list)
        self.by_patient: dict[str, list[str]] = defaultdict(list)
        for slide, patient in self.patient_of.items():
            self.by_barcode[slide.split(".")[0]].append(slide)
            self.by_patient[patient].append(slide)

    def slides_for(self, key: str) -> list[str]:
        if key in self.patient_of:
            return [key]
        barcode = key.split(".")[0]
        if len(self.by_barcode.get(barcode, [])) == 1:
            return list(self.by_barcode[barcode])
        patient = tcga_patient_id(key) if len(barcode) <= 12 else None
        return sorted(self.by_patient.get(patient or key, []))

    def rekey(self, keys: Sequence[str], source: str, error: type[SlidecacheError]) -> dict[str, str]:
        """{slide: report id} for `keys` (report ids): an id naming a slide exactly keeps it (so non-TCGA ids
        such as 'a.png' and 'a.jpg' stay apart), the others take the slides they match, an id matching none
        keeps its own key. Two ids matching one slide raise `error` naming both and `source`."""
        out = {key: key for key in keys if key in self.patient_of}
        for key in keys:
            if key in self.patient_of:
                continue
            for slide in [s for s in self.slides_for(key) if out.get(s) != s] or [key]:  # exact claims stand
                if slide in out:
                    raise error(f"{source}: {out[slide]!r} and {key!r} both match slide {slide}; keep one")
                out[slide] = key
        return out


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_key(dataset: str, image: str) -> str:
    """The store id of the image `image` of meta dataset `dataset`: readable, unique, and the same on every
    machine (it depends on the names in the annotations, not on where the files live)."""
    readable = _UNSAFE.sub("_", f"{dataset}__{image}").replace("..", "_.").lstrip(".")[:180]
    return f"{readable}-{hashlib.sha1(f'{dataset}/{image}'.encode()).hexdigest()[:10]}"

"""Cohorts: the list of slides to extract, from a folder, a CSV, or a GDC manifest.

slide_id = the file name without its final extension; a folder of DICOM instances is one slide (named
after the folder); an .mrxs file and its companion folder are one slide. patient_id = the first 12
characters when the slide id is a TCGA barcode, else the table's patient_id column, else the slide id.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from slidecache.cohorts.ids import patient_id_for, validate_slide_id
from slidecache.errors import CohortError, InvalidSlideId

SLIDE_SUFFIXES = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide", ".qptiff", ".dcm",
)
GDC_MANIFEST_COLUMNS = ("id", "filename", "md5", "size", "state")


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    path: str
    patient_id: str
    mpp: float | None = None  # a per-slide override from the cohort table
    md5: str | None = None
    size: int | None = None


def _entry(slide_id: str, path: Path | str, where: str, patient: str | None = None, **kw: object) -> SlideEntry:
    try:
        validate_slide_id(slide_id)
    except InvalidSlideId as e:
        raise CohortError(f"{where}: {e}") from e
    return SlideEntry(slide_id, str(path), patient_id_for(slide_id, patient), **kw)  # type: ignore[arg-type]


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir() if p.is_file())


def cohort_from_directory(root: str | Path) -> list[SlideEntry]:
    root = Path(root)
    entries: dict[str, SlideEntry] = {}

    def add(slide_id: str, path: Path) -> None:
        if slide_id in entries:
            raise CohortError(f"slide id {slide_id!r} is used twice in {root}: {entries[slide_id].path} and {path}; "
                              "rename one, or list the slides in a CSV with explicit slide_id values")
        entries[slide_id] = _entry(slide_id, path, str(path))

    for folder, subdirs, files in os.walk(root):
        here = Path(folder)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        if here != root and _is_dicom_folder(here):
            add(here.name, here)
            subdirs[:] = []  # the folder is one slide
            continue
        mrxs_stems = {Path(f).stem for f in files if f.lower().endswith(".mrxs")}
        subdirs[:] = [d for d in subdirs if d not in mrxs_stems]  # an .mrxs's data folder is part of it
        for name in sorted(files):
            path = here / name
            if name.startswith(".") or path.suffix.lower() not in SLIDE_SUFFIXES:
                continue
            if path.suffix.lower() == ".dcm":  # DICOM directly in the root: its folder is the slide
                add(here.name if here != root else path.stem, here if here != root else path)
                continue
            add(path.stem, path)
    if not entries:
        raise CohortError(f"no slides found in {root} (looked for {', '.join(SLIDE_SUFFIXES)} and DICOM folders)")
    return sorted(entries.values(), key=lambda e: e.slide_id)


def _read_table(path: Path, delimiter: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]
        return [h.strip() for h in reader.fieldnames or []], rows


def cohort_from_csv(path: str | Path, root: str | Path | None = None) -> list[SlideEntry]:
    """Columns: path (required), slide_id, patient_id, mpp (optional). Relative paths: against root or the CSV's folder."""
    path = Path(path)
    base = Path(root) if root else path.parent
    header, rows = _read_table(path, ",")
    if "path" not in header:
        raise CohortError(f"{path}: a cohort CSV needs a 'path' column (found {header}); optional: slide_id, patient_id, mpp")
    entries: dict[str, SlideEntry] = {}
    first_row: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, row {line}"
        if not row.get("path"):
            raise CohortError(f"{where}: empty path")
        slide_path = Path(row["path"]).expanduser()
        slide_path = slide_path if slide_path.is_absolute() else base / slide_path
        slide_id = row.get("slide_id") or slide_path.stem
        mpp = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise CohortError(f"{where}, column 'mpp': {row['mpp']!r} is not a number") from None
            if not 0 < mpp < 100:
                raise CohortError(f"{where}, column 'mpp': {mpp} µm/px is not plausible")
        if slide_id in entries:
            raise CohortError(f"{where}: slide id {slide_id!r} is already listed at row {first_row[slide_id]}; "
                              "each slide must appear once")
        entries[slide_id] = _entry(slide_id, slide_path, where, row.get("patient_id") or None, mpp=mpp)
        first_row[slide_id] = line
    if not entries:
        raise CohortError(f"{path}: the cohort table has no rows")
    return list(entries.values())


def cohort_from_gdc_manifest(path: str | Path, root: str | Path | None = None) -> list[SlideEntry]:
    """A GDC manifest (id, filename, md5, size, state); files where gdc-client puts them: root/id/filename."""
    path = Path(path)
    base = Path(root) if root else path.parent
    header, rows = _read_table(path, "\t")
    missing = [c for c in ("id", "filename") if c not in header]
    if missing:
        raise CohortError(f"{path}: not a GDC manifest, columns {missing} missing (expected {GDC_MANIFEST_COLUMNS})")
    entries: dict[str, SlideEntry] = {}
    first_row: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, row {line}"
        filename = row.get("filename", "")
        if not filename or not row.get("id"):
            raise CohortError(f"{where}: empty id or filename")
        candidate = base / row["id"] / filename
        slide_path = candidate if candidate.exists() or not (base / filename).exists() else base / filename
        size = row.get("size")
        try:
            size_bytes = int(size) if size else None
        except ValueError:
            raise CohortError(f"{where}, column 'size': {size!r} is not an integer") from None
        slide_id = Path(filename).stem
        if slide_id in entries:
            raise CohortError(f"{where}: {filename} (slide id {slide_id!r}) is already listed at row {first_row[slide_id]}; "
                              "a GDC manifest must name each slide once: remove the duplicate row")
        entries[slide_id] = _entry(slide_id, slide_path, where, md5=row.get("md5") or None, size=size_bytes)
        first_row[slide_id] = line
    if not entries:
        raise CohortError(f"{path}: the manifest lists no files")
    return list(entries.values())


def load_cohort(source: str | Path, root: str | Path | None = None) -> list[SlideEntry]:
    """A folder of slides, a cohort CSV, or a GDC manifest (tab-separated with id/filename/md5/...)."""
    source = Path(source)
    if source.is_dir():
        return cohort_from_directory(source)
    if not source.is_file():
        raise CohortError(f"cohort {source} is neither a folder nor a table; give a slide folder, a CSV or a GDC manifest")
    with open(source, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if "\t" in first and {"id", "filename"} <= {c.strip() for c in first.split("\t")}:
        return cohort_from_gdc_manifest(source, root)
    return cohort_from_csv(source, root)

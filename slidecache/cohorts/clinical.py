"""Clinical tables normalised per patient: survival endpoints in days with a boolean event, and grade.

Formats, told apart by their header:
- TCGA-CDR (Liu et al. 2018) and slidecache's own table (same columns, `patient_id` may replace
  `bcr_patient_barcode`): E = 1 means the event happened, E.time in days, for E in OS, DSS, DFI, PFI;
  "[Not Available]"-style strings, "#N/A" and blanks are missing; GX/GB grades are missing; BLCA's
  "High Grade"/"Low Grade" is kept as its own scheme; patients with Redaction == "Redacted" are dropped.
- SurvPath metadata (one row per slide): survival_months[_dss|_pfi] × 30.4375 days, censorship = 1
  means NO event (the reverse of CDR), unsuffixed columns are OS, "N/A" missing.
- SurvPath clinical: case_id, stage, grade, subtype.
Anything present but unparsable is a ClinicalTableError naming file, row (1-based line) and column.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping

from slidecache.cohorts.ids import patient_key, tcga_site
from slidecache.errors import ClinicalTableError

ENDPOINTS = ("OS", "DSS", "DFI", "PFI")
DAYS_PER_MONTH = 30.4375
MISSING = {
    "", "na", "n/a", "nan", "none", "null", "#n/a", "[not available]", "[unknown]", "[discrepancy]",
    "[not applicable]", "[not evaluated]", "[completed]",
}
_G_GRADE = re.compile(r"^G([1-4])$", re.IGNORECASE)
_HIGH_LOW = {"high grade": "High Grade", "low grade": "Low Grade"}
_MISSING_GRADES = {"gx", "gb"}  # GX: cannot be assessed; GB: borderline (ovarian), not a G1-G4 grade


@dataclass(frozen=True)
class Outcome:
    time_days: float
    event: bool


@dataclass(frozen=True)
class PatientClinical:
    patient_id: str
    cancer_type: str | None = None
    endpoints: Mapping[str, Outcome] = field(default_factory=dict)
    grade: str | None = None  # "G1".."G4", or "High Grade" / "Low Grade"
    grade_scheme: str | None = None  # "G1-G4" or "high-low"
    age: float | None = None
    stage: str | None = None
    site: str | None = None  # TCGA tissue source site (barcode characters 6-7)


@dataclass
class ClinicalTable:
    path: str
    format: str
    patients: dict[str, PatientClinical]
    dropped: dict[str, int] = field(default_factory=dict)  # reason → count
    # endpoint → why the table cannot hold it (the columns it lacks, naming the file)
    missing_columns: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patients)

    def endpoint(self, name: str) -> dict[str, Outcome]:
        """{patient_id: Outcome} for the patients who have this endpoint."""
        if name not in ENDPOINTS:
            raise ClinicalTableError(f"unknown endpoint {name!r}; choose one of {', '.join(ENDPOINTS)}")
        return {pid: p.endpoints[name] for pid, p in self.patients.items() if name in p.endpoints}

    def absent_endpoint(self, name: str) -> str | None:
        """Why no patient has endpoint `name` when the table lacks its columns (naming file and columns), else
        None: then a missing endpoint is the patients' values, not the table's shape."""
        why = self.missing_columns.get(name)
        if why is None or self.endpoint(name):
            return None
        return f"{why}: add the column(s), or evaluate another endpoint"

    def filter_cancer_type(self, cancer_type: str) -> ClinicalTable:
        kept = {pid: p for pid, p in self.patients.items() if (p.cancer_type or "").upper() == cancer_type.upper()}
        if not kept:
            types = sorted({p.cancer_type for p in self.patients.values() if p.cancer_type})
            raise ClinicalTableError(f"{self.path}: no patient of cancer type {cancer_type!r}; present: {types}")
        return ClinicalTable(self.path, self.format, kept, dict(self.dropped), dict(self.missing_columns))

    def combine(self, other: ClinicalTable) -> ClinicalTable:
        """Fill fields missing here from another table of the same patients (e.g. SurvPath grades)."""
        merged = dict(self.patients)
        for pid, extra in other.patients.items():
            base = merged.get(pid)
            if base is None:
                merged[pid] = extra
                continue
            merged[pid] = replace(
                base,
                endpoints={**extra.endpoints, **base.endpoints},
                **{f: getattr(base, f) if getattr(base, f) is not None else getattr(extra, f)
                   for f in ("cancer_type", "grade", "grade_scheme", "age", "stage", "site")},
            )
        missing = {e: f"{why}; {other.missing_columns[e]}" for e, why in self.missing_columns.items()
                   if e in other.missing_columns}  # an endpoint either table has columns for is not missing
        return ClinicalTable(f"{self.path}+{other.path}", f"{self.format}+{other.format}", merged,
                             {**other.dropped, **self.dropped}, missing)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


class _Row:
    """One table row with the parsing helpers that name file, line and column on failure."""

    def __init__(self, path: Path, line: int, values: Mapping[str, str]) -> None:
        self.path, self.line, self.values = path, line, values

    def fail(self, column: str, why: str) -> ClinicalTableError:
        return ClinicalTableError(f"{self.path}, row {self.line}, column {column!r}: {why}")

    def text(self, *columns: str) -> str | None:
        for column in columns:
            raw = self.values.get(column)
            if raw is not None:
                raw = raw.strip()
                return None if raw.lower() in MISSING else raw
        return None

    def number(self, column: str, minimum: float | None = None) -> float | None:
        raw = self.text(column)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise self.fail(column, f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise self.fail(column, f"{raw!r} is not a finite number")
        if minimum is not None and value < minimum:
            raise self.fail(column, f"{value} is below {minimum}")
        return value

    def flag(self, column: str) -> bool | None:
        value = self.number(column)
        if value is None:
            return None
        if value not in (0.0, 1.0):
            raise self.fail(column, f"{value} is not 0 or 1")
        return value == 1.0

    def grade(self, column: str) -> tuple[str | None, str | None]:
        raw = self.text(column)
        if raw is None or raw.lower() in _MISSING_GRADES:
            return None, None
        if m := _G_GRADE.match(raw):
            return f"G{m.group(1)}", "G1-G4"
        if raw.lower() in _HIGH_LOW:
            return _HIGH_LOW[raw.lower()], "high-low"
        raise self.fail(column, f"unrecognised grade {raw!r} (expected G1-G4, GX, High/Low Grade or a missing marker)")


def _read_rows(path: Path) -> tuple[list[str], list[_Row]]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t" if path.name.endswith((".tsv", ".tsv.gz")) else ",")
        rows = []
        for values in reader:
            rows.append(_Row(path, reader.line_num, values))
        return list(reader.fieldnames or []), rows


def _missing_columns(path: Path, header: list[str], needed: Mapping[str, tuple[str, str]]) -> dict[str, str]:
    """endpoint → "<file> has no column ..." for each endpoint whose (event, time) columns the header lacks."""
    missing = {}
    for endpoint, columns in needed.items():
        lacking = [c for c in columns if c not in header]
        if lacking:
            missing[endpoint] = (f"{path} has no column{'s' * (len(lacking) > 1)} {' and '.join(map(repr, lacking))} "
                                 f"(the {endpoint} endpoint needs {columns[0]!r} and {columns[1]!r})")
    return missing


def _cdr_like(path: Path, header: list[str], rows: list[_Row]) -> ClinicalTable:
    key = "bcr_patient_barcode" if "bcr_patient_barcode" in header else "patient_id"
    patients: dict[str, PatientClinical] = {}
    first_line: dict[str, int] = {}
    dropped = {"redacted": 0}
    for row in rows:
        pid = row.text(key)
        if pid is None:
            raise row.fail(key, "missing patient id")
        pid = patient_key(pid)
        if (row.text("Redaction") or "").lower() == "redacted":
            dropped["redacted"] += 1
            continue
        if pid in patients:
            raise row.fail(key, f"patient {pid} appears again (first at row {first_line[pid]}); one row per patient")
        endpoints = {}
        for name in ENDPOINTS:
            event, time = row.flag(name), row.number(f"{name}.time", minimum=0.0)
            if event is not None and time is not None:
                endpoints[name] = Outcome(time, event)
        grade, scheme = row.grade("histological_grade" if "histological_grade" in header else "grade")
        patients[pid] = PatientClinical(
            patient_id=pid,
            cancer_type=row.text("type", "cancer_type"),
            endpoints=endpoints,
            grade=grade,
            grade_scheme=scheme,
            age=row.number("age_at_initial_pathologic_diagnosis" if key == "bcr_patient_barcode" else "age", 0.0),
            stage=row.text("ajcc_pathologic_tumor_stage", "stage"),
            site=row.text("site") or tcga_site(pid),
        )
        first_line[pid] = row.line
    fmt = "tcga-cdr" if key == "bcr_patient_barcode" else "slidecache"
    missing = _missing_columns(path, header, {e: (e, f"{e}.time") for e in ENDPOINTS})
    return ClinicalTable(str(path), fmt, patients, {k: v for k, v in dropped.items() if v}, missing)


def _survpath(path: Path, header: list[str], rows: list[_Row]) -> ClinicalTable:
    suffixes = {"OS": "", "DSS": "_dss", "PFI": "_pfi", "DFI": "_dfi"}
    present = {e: s for e, s in suffixes.items() if f"survival_months{s}" in header and f"censorship{s}" in header}
    patients: dict[str, PatientClinical] = {}
    seen: dict[str, tuple[int, dict[str, Outcome]]] = {}
    for row in rows:
        pid = row.text("case_id")
        if pid is None:
            raise row.fail("case_id", "missing case id")
        endpoints = {}
        for name, s in present.items():
            months, censored = row.number(f"survival_months{s}", 0.0), row.flag(f"censorship{s}")
            if months is not None and censored is not None:
                endpoints[name] = Outcome(months * DAYS_PER_MONTH, not censored)
        if pid in seen:  # one row per slide: a patient's rows must agree
            line, before = seen[pid]
            if before != endpoints:
                raise row.fail("survival_months", f"patient {pid} has other survival values than at row {line}")
            continue
        seen[pid] = (row.line, endpoints)
        patients[pid] = PatientClinical(
            patient_id=pid,
            cancer_type=row.text("oncotree_code"),
            endpoints=endpoints,
            age=row.number("age", 0.0),
            site=row.text("site") or tcga_site(pid),
        )
    needed = {e: (f"survival_months{s}", f"censorship{s}") for e, s in suffixes.items()}
    missing = _missing_columns(path, header, needed)
    return ClinicalTable(str(path), "survpath", patients, {}, missing)


def _survpath_clinical(path: Path, header: list[str], rows: list[_Row]) -> ClinicalTable:
    patients = {}
    for row in rows:
        pid = row.text("case_id")
        if pid is None:
            raise row.fail("case_id", "missing case id")
        grade, scheme = row.grade("grade")
        patients[pid] = PatientClinical(pid, cancer_type=row.text("subtype"), grade=grade, grade_scheme=scheme,
                                        stage=row.text("stage"),
                                        site=tcga_site(pid))
    missing = {e: f"{path} is a SurvPath clinical table (case_id, grade, stage): it has no survival columns"
               for e in ENDPOINTS}
    return ClinicalTable(str(path), "survpath-clinical", patients, {}, missing)


_FORMATS: list[tuple[Callable[[set[str]], bool], Callable[[Path, list[str], list[_Row]], ClinicalTable]]] = [
    (lambda h: "bcr_patient_barcode" in h or "patient_id" in h, _cdr_like),
    (lambda h: {"case_id", "survival_months", "censorship"} <= h, _survpath),
    (lambda h: {"case_id", "grade"} <= h, _survpath_clinical),
]


def load_clinical(path: str | Path) -> ClinicalTable:
    """Read a clinical table (CSV/TSV, optionally .gz) and normalise it per patient."""
    path = Path(path)
    if not path.is_file():
        raise ClinicalTableError(f"clinical table {path} does not exist")
    header, rows = _read_rows(path)
    for matches, parse in _FORMATS:
        if matches(set(header)):
            return parse(path, header, rows)
    raise ClinicalTableError(
        f"{path}: unrecognised clinical table (columns {header[:8]}...). Expected TCGA-CDR "
        "(bcr_patient_barcode, OS, OS.time, ...), slidecache (patient_id, OS, OS.time, ...) or SurvPath "
        "(case_id, survival_months, censorship)"
    )


def load_clinical_tables(paths: Iterable[str | Path]) -> ClinicalTable:
    """Several tables of the same patients combined, earlier tables winning where both have a value."""
    tables = [load_clinical(p) for p in paths]
    if not tables:
        raise ClinicalTableError("no clinical table given")
    combined = tables[0]
    for table in tables[1:]:
        combined = combined.combine(table)
    return combined

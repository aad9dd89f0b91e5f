"""Cohort tables: folders, CSVs, GDC manifests; slide and patient ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from slidecache.cohorts.ids import patient_id_for, tcga_patient_id
from slidecache.cohorts.slides import load_cohort
from slidecache.errors import CohortError


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_directory_rules(tmp_path):
    touch(tmp_path / "TCGA-AB-1234-01Z-00-DX1.ABCD.svs")
    touch(tmp_path / "sub" / "plain.tiff")
    touch(tmp_path / "dicom_slide" / "level0.dcm")
    touch(tmp_path / "dicom_slide" / "thumb.dcm")
    touch(tmp_path / "scan.mrxs")
    touch(tmp_path / "scan" / "Data0001.dat")
    touch(tmp_path / "scan" / "Slidedat.ini")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / ".hidden.svs")
    entries = {e.slide_id: e for e in load_cohort(tmp_path)}
    assert set(entries) == {"TCGA-AB-1234-01Z-00-DX1.ABCD", "plain", "dicom_slide", "scan"}
    assert entries["TCGA-AB-1234-01Z-00-DX1.ABCD"].patient_id == "TCGA-AB-1234"
    assert entries["dicom_slide"].path == str(tmp_path / "dicom_slide")
    assert entries["scan"].path.endswith("scan.mrxs")


def test_duplicate_ids_in_a_folder(tmp_path):
    touch(tmp_path / "a" / "x.svs")
    touch(tmp_path / "b" / "x.ndpi")
    with pytest.raises(CohortError, match="'x' is used twice"):
        load_cohort(tmp_path)


def test_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(CohortError, match="no slides found"):
        load_cohort(tmp_path)
    with pytest.raises(CohortError, match="neither a folder nor a table"):
        load_cohort(tmp_path / "nope")


def test_csv(tmp_path):
    (tmp_path / "c.csv").write_text("slide_id,path,patient_id,mpp\ns1,slides/a.svs,P1,0.25\n,b.svs,,\n")
    a, b = load_cohort(tmp_path / "c.csv")
    assert (a.slide_id, a.patient_id, a.mpp, a.path) == ("s1", "P1", 0.25, str(tmp_path / "slides/a.svs"))
    assert (b.slide_id, b.patient_id, b.mpp) == ("b", "b", None)


@pytest.mark.parametrize("body, message", [
    ("slide,file\nx,y\n", "needs a 'path' column"),
    ("path,mpp\na.svs,fast\n", r"row 2, column 'mpp': 'fast' is not a number"),
    ("path,mpp\na.svs,352.8\n", "not plausible"),
    ("path,slide_id\na.svs,../x\n", r"row 2: invalid slide id '../x'"),
    ("path,slide_id\na.svs,x\nb.svs,x\n", "row 3: slide id 'x' is already listed at row 2"),
    ("path\n", "has no rows"),
])
def test_bad_csv_names_the_line(tmp_path, body, message):
    (tmp_path / "c.csv").write_text(body)
    with pytest.raises(CohortError, match=message):
        load_cohort(tmp_path / "c.csv")


def test_gdc_manifest(tmp_path):
    manifest = tmp_path / "gdc_manifest.txt"
    manifest.write_text("id\tfilename\tmd5\tsize\tstate\n"
                        "uuid-1\tTCGA-CR-7395-01Z-00-DX1.X.svs\tabc\t123\treleased\n")
    touch(tmp_path / "uuid-1" / "TCGA-CR-7395-01Z-00-DX1.X.svs")
    (entry,) = load_cohort(manifest)
    assert entry.slide_id == "TCGA-CR-7395-01Z-00-DX1.X" and entry.patient_id == "TCGA-CR-7395"
    assert entry.path == str(tmp_path / "uuid-1" / "TCGA-CR-7395-01Z-00-DX1.X.svs")
    assert (entry.md5, entry.size) == ("abc", 123)


def test_gdc_manifest_naming_one_file_twice_is_refused_with_both_rows(tmp_path):
    manifest = tmp_path / "gdc_manifest.txt"
    manifest.write_text("id\tfilename\tmd5\tsize\tstate\n"
                        "uuid-1\tTCGA-CR-7395-01Z-00-DX1.X.svs\tabc\t123\treleased\n"
                        "uuid-2\tTCGA-CR-7396-01Z-00-DX1.Y.svs\tabd\t124\treleased\n"
                        "uuid-1\tTCGA-CR-7395-01Z-00-DX1.X.svs\tabc\t123\treleased\n")
    with pytest.raises(CohortError, match=r"row 4: TCGA-CR-7395-01Z-00-DX1.X.svs .*already listed at row 2"):
        load_cohort(manifest)


def test_csv_paths_are_relative_to_the_table_not_the_working_directory(tmp_path, monkeypatch):
    cohort = tmp_path / "project" / "cohort.csv"
    touch(tmp_path / "project" / "slides" / "a.tiff")
    cohort.write_text("slide_id,path\na,slides/a.tiff\n")
    monkeypatch.chdir(tmp_path)
    (entry,) = load_cohort("project/cohort.csv")
    assert Path(entry.path).resolve() == (tmp_path / "project" / "slides" / "a.tiff").resolve()
    assert Path(entry.path).exists()


def test_patient_ids():
    assert tcga_patient_id("TCGA-CR-7395-01Z-00-DX1.5B44") == "TCGA-CR-7395"
    assert tcga_patient_id("tcga-cr-7395") == "TCGA-CR-7395"
    assert tcga_patient_id("TCGA-CR-739") is None
    assert patient_id_for("slide9", "P9") == "P9"
    assert patient_id_for("slide9", None) == "slide9"
    assert patient_id_for("TCGA-CR-7395-01Z", "other") == "TCGA-CR-7395"


def test_real_slide_folder(shared_data):
    entries = {e.slide_id: e for e in load_cohort(shared_data / "wsi")}
    assert "CMU-1-Small-Region" in entries and "openslide_boxes" in entries  # the two .dcm files are one slide
    assert entries["openslide_boxes"].path.endswith("openslide_boxes")

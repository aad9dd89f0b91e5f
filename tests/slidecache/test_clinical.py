"""Clinical tables normalised per patient."""

from __future__ import annotations

import pytest

from slidecache.cohorts.clinical import DAYS_PER_MONTH, load_clinical, load_clinical_tables
from slidecache.errors import ClinicalTableError

CDR_HEADER = "bcr_patient_barcode,type,age_at_initial_pathologic_diagnosis,ajcc_pathologic_tumor_stage,histological_grade,OS,OS.time,DSS,DSS.time,DFI,DFI.time,PFI,PFI.time,Redaction\n"


def write(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cdr_sentinels_and_grades(tmp_path):
    path = write(tmp_path, CDR_HEADER
                 + "TCGA-AA-0001,KIRC,60.0,Stage II,G2,1.0,100.0,0.0,100.0,,,1,50,\n"
                 + "TCGA-AA-0002,BLCA,[Not Available],[Discrepancy],High Grade,0,2000,#N/A,,[Not Available],,0,2000,\n"
                 + "TCGA-AA-0003,OV,50,Stage I,GX,,,0,10,0,10,0,10,\n"
                 + "TCGA-AA-0004,OV,50,Stage I,GB,1,0,1,0,1,0,1,0,\n"
                 + "TCGA-AA-0005,OV,50,Stage I,G1,1,5,1,5,1,5,1,5,Redacted\n")
    table = load_clinical(path)
    assert table.format == "tcga-cdr" and len(table) == 4 and table.dropped == {"redacted": 1}
    p1, p2, p3, p4 = (table.patients[f"TCGA-AA-000{i}"] for i in range(1, 5))
    assert p1.endpoints["OS"].event is True and p1.endpoints["OS"].time_days == 100.0
    assert p1.endpoints["DSS"].event is False and "DFI" not in p1.endpoints
    assert (p1.grade, p1.grade_scheme, p1.age, p1.stage, p1.site) == ("G2", "G1-G4", 60.0, "Stage II", "AA")
    assert (p2.grade, p2.grade_scheme, p2.age, p2.stage) == ("High Grade", "high-low", None, None)
    assert set(p2.endpoints) == {"OS", "PFI"}
    assert p3.grade is None and "OS" not in p3.endpoints
    assert p4.grade is None and p4.endpoints["OS"].time_days == 0.0
    assert set(table.endpoint("OS")) == {"TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0004"}
    assert len(table.filter_cancer_type("ov")) == 2
    with pytest.raises(ClinicalTableError, match="unknown endpoint 'XYZ'"):
        table.endpoint("XYZ")
    with pytest.raises(ClinicalTableError, match="no patient of cancer type 'LUAD'"):
        table.filter_cancer_type("LUAD")


@pytest.mark.parametrize("row, column, why", [
    ("TCGA-AA-0001,KIRC,60,S,G2,yes,100,,,,,,,\n", "OS", "'yes' is not a number"),
    ("TCGA-AA-0001,KIRC,60,S,G2,2,100,,,,,,,\n", "OS", "2.0 is not 0 or 1"),
    ("TCGA-AA-0001,KIRC,60,S,G2,1,-5,,,,,,,\n", "OS.time", "below 0"),
    ("TCGA-AA-0001,KIRC,60,S,G2,1,nan1,,,,,,,\n", "OS.time", "not a number"),
    ("TCGA-AA-0001,KIRC,60,S,Grade 2,1,5,,,,,,,\n", "histological_grade", "unrecognised grade 'Grade 2'"),
])
def test_unparsable_cells_name_file_row_column(tmp_path, row, column, why):
    path = write(tmp_path, CDR_HEADER + "TCGA-AA-0009,KIRC,60,S,G2,1,1,,,,,,,\n" + row)
    with pytest.raises(ClinicalTableError) as err:
        load_clinical(path)
    assert f"{path}, row 3, column {column!r}: " in str(err.value) and why in str(err.value)


def test_duplicate_patient_rows(tmp_path):
    path = write(tmp_path, CDR_HEADER + "TCGA-AA-0001,K,1,S,G1,1,1,,,,,,,\n" * 2)
    with pytest.raises(ClinicalTableError, match="row 3.*appears again \\(first at row 2\\)"):
        load_clinical(path)


def test_slidecache_format_uses_patient_id(tmp_path):
    path = write(tmp_path, "patient_id,cancer_type,grade,age,stage,OS,OS.time\nP1,DEMO,G3,70,II,1,300\n")
    table = load_clinical(path)
    assert table.format == "slidecache"
    assert table.patients["P1"].grade == "G3" and table.patients["P1"].endpoints["OS"].time_days == 300


def test_survpath_months_and_inverted_censorship(tmp_path):
    path = write(tmp_path, ",case_id,slide_id,age,site,survival_months,survival_months_dss,censorship,censorship_dss,oncotree_code\n"
                 "0,TCGA-4P-AA8J,a.svs,66,4P,3.4,3.4,1,1,HNSC\n"
                 "1,TCGA-4P-AA8J,b.svs,66,4P,3.4,3.4,1,1,HNSC\n"
                 "2,TCGA-BA-4074,c.svs,69,BA,15.4,N/A,0,N/A,HNSC\n")
    table = load_clinical(path)
    assert table.format == "survpath" and len(table) == 2
    os1 = table.patients["TCGA-4P-AA8J"].endpoints["OS"]
    assert os1.event is False and os1.time_days == pytest.approx(3.4 * DAYS_PER_MONTH)
    p2 = table.patients["TCGA-BA-4074"]
    assert p2.endpoints["OS"].event is True and "DSS" not in p2.endpoints and p2.site == "BA"


def test_survpath_conflicting_slide_rows(tmp_path):
    path = write(tmp_path, ",case_id,slide_id,survival_months,censorship\n0,P,a,3,1\n1,P,b,4,1\n")
    with pytest.raises(ClinicalTableError, match="row 3.*other survival values than at row 2"):
        load_clinical(path)


def test_unknown_table(tmp_path):
    with pytest.raises(ClinicalTableError, match="unrecognised clinical table"):
        load_clinical(write(tmp_path, "a,b\n1,2\n"))
    with pytest.raises(ClinicalTableError, match="does not exist"):
        load_clinical(tmp_path / "missing.csv")


@pytest.mark.shared_data
def test_real_tcga_cdr(shared_data):
    table = load_clinical(shared_data / "labels/tcga_cdr/TCGA-CDR-clinical.csv.gz")
    assert table.format == "tcga-cdr"
    assert len(table) == 11160 - 57 and table.dropped == {"redacted": 57}
    kirp = table.patients["TCGA-HE-7130"]  # cross-linked with the real H&E tile in he_tiles/
    assert kirp.cancer_type == "KIRP" and kirp.endpoints["OS"].event is False and kirp.endpoints["OS"].time_days == 1770
    grades = {p.grade for p in table.patients.values()}
    assert grades == {None, "G1", "G2", "G3", "G4", "High Grade", "Low Grade"}
    os_ = table.endpoint("OS")
    assert len(os_) > 11000 and all(o.time_days >= 0 for o in os_.values())


@pytest.mark.shared_data
def test_real_survpath_tables_join(shared_data):
    survival = load_clinical(shared_data / "labels/survpath/tcga_hnsc.csv")
    assert len(survival) == 394  # 414 slides of 394 patients
    both = load_clinical_tables([shared_data / "labels/survpath/tcga_hnsc.csv",
                                 shared_data / "labels/survpath/tcga_hnsc_clinical.csv"])
    joined = [p for p in both.patients.values() if p.endpoints and p.grade]
    assert len(joined) > 300 and {p.grade_scheme for p in joined} == {"G1-G4"}
    cdr = load_clinical(shared_data / "labels/tcga_cdr/TCGA-CDR-clinical.csv.gz")
    shared = set(survival.patients) & set(cdr.patients)
    assert len(shared) > 380  # the two sources key the same TCGA patients
    brca = load_clinical(shared_data / "labels/survpath/tcga_brca.csv")
    assert len(brca) == 871 and sum(o.event for o in brca.endpoint("OS").values()) > 0

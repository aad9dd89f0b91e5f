"""What a user reads at the end of `python -m extract`: the summary table keeps a TCGA slide id whole (they are
60 characters), and `--qc-dir`'s help names the folder the run really writes by default."""

from __future__ import annotations

import shutil

from extract.cli import build_parser
from tests.readme import run_main

TCGA_ID = "TCGA-A7-A0CE-01Z-00-DX1.83D6C1A1-5B7B-4D0E-9A1E-0E1C0A6D3B7D"


def test_the_summary_keeps_tcga_ids_whole_and_qc_goes_where_the_help_says(synthetic_slides, tmp_path):
    (tmp_path / "slides").mkdir()
    shutil.copy(synthetic_slides / "syn0.tiff", tmp_path / "slides" / f"{TCGA_ID}.tiff")
    result = run_main("extract", ["--cohort", "slides", "--store", "tcga.zarr", "--encoder", "virchow2-tiny",
                                  "--executor", "local"], tmp_path)
    assert result.code == 0, result.log[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("TCGA-"))
    assert row.split()[0] == TCGA_ID and row.split()[1] == "done"
    help_text = " ".join(build_parser().format_help().split())
    assert "STORE.qc beside a local store, e.g. tcga.zarr.qc" in help_text
    assert (tmp_path / "tcga.zarr.qc" / "summary.md").is_file()

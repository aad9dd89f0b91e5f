"""The README's main command on a small cohort: everything extracts, verifies, and a rerun encodes nothing."""

import json

from demo.pipeline import DemoSize, run


def test_demo_runs_and_second_run_reuses_the_cache(tmp_path):
    size = DemoSize(patients=2, slides_per_patient=2, height=900, width=1100)
    first = run(tmp_path, size, log=lambda m: None)
    assert first["slides_in_store"] == 4 and first["extracted_now"] == 4 and first["failed"] == []
    assert first["verify_problems"] == [] and first["h5_files"] == 4 and first["tiles_in_store"] > 4
    second = run(tmp_path, size, log=lambda m: None)
    assert second["extracted_now"] == 0 and second["skipped_complete"] == 4
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    assert manifest["provenance"]["config"]["seed"] == 0 and "torch" in manifest["provenance"]["packages"]
    assert (tmp_path / "qc" / "summary.md").is_file()

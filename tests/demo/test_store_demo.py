"""The README's main command (store stage) runs, verifies clean, and a rerun writes nothing."""

import json

from demo.store_demo import run


def test_store_demo_runs_and_reuses(tmp_path):
    first = run(tmp_path, n_slides=4)
    assert first["slides"] == 4 and first["written_now"] == 4 and first["verify_problems"] == []
    assert first["h5_files"] == 4 and first["reimported_slides"] == 4
    second = run(tmp_path, n_slides=4)
    assert second["written_now"] == 0 and second["skipped_already_complete"] == 4
    manifest = json.loads((tmp_path / "run_manifest.json").read_text())
    assert manifest["provenance"]["config"]["seed"] == 0 and "zarr" in manifest["provenance"]["packages"]

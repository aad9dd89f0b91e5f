"""QC pictures: a rerun redraws only the slides committed since the pictures were drawn (the pictures of a
cohort of thousands are minutes of work), and any slide whose picture is missing."""

from __future__ import annotations

import json

from extract.qc import write_qc
from store import EmbeddingStore
from tests.evaluate.helpers import planted_cohort
from tests.store.helpers import write_slide


def _stamps(folder):
    return {p.name: p.stat().st_mtime_ns for p in sorted((folder / "slides").iterdir())}


def test_a_rerun_redraws_only_what_changed(tmp_path):
    url, _ = planted_cohort(tmp_path, patients=4, thumbnails=True)
    qc = tmp_path / "qc"
    write_qc(url, qc)
    first = _stamps(qc)
    assert len(first) == 8 and json.loads((qc / "slides" / "PT0000-S0.geojson").read_text())["features"]
    write_qc(url, qc)
    assert _stamps(qc) == first  # nothing committed since: nothing redrawn
    store = EmbeddingStore.open(url, mode="a")
    store.delete_slide("PT0001-S0")
    write_slide(store, "PT0001-S0", 5)  # committed again: new rows, no thumbnail
    (qc / "slides" / "PT0002-S0.png").unlink()  # a picture lost
    write_qc(url, qc)
    now = _stamps(qc)
    redrawn = {name for name in now if now[name] != first.get(name)}
    assert redrawn == {"PT0001-S0.geojson", "PT0002-S0.png", "PT0002-S0.geojson"}
    assert "PT0001-S0.png" not in now  # its new commit has no thumbnail: the old picture is not left behind
    assert len(json.loads((qc / "slides" / "PT0001-S0.geojson").read_text())["features"]) == 5
    assert "4 slides in the store" in (qc / "summary.md").read_text()

"""Our HistGen protocol against HistGen's own tokenizer and metric code (run unmodified, in its own process,
by bench/histgen_parity.py) on awkward generated predictions: every scored string and every score equal.
Runs when SLIDECACHE_HISTGEN_SRC names a checkout of dddavid4real/HistGen; skips otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.evaluate.report_fixtures import HISTGEN_JSON, fixture_slides
from tests.readme import to_argv

PARITY = "python bench/histgen_parity.py --histgen-src SRC --annotation annotation.json --predictions gen.jsonl"
HISTGEN_SRC = Path(os.environ.get("SLIDECACHE_HISTGEN_SRC", "/nonexistent"))
PIECES = ["Final diagnosis", ". ", "..", "...", " 1. ", ". 2. ", " 3. ", "11. ", "__", "___", "  ", "\n", "grade 3",
          "G2-G3", "(Fuhrman)", "[ISUP]", "{x}", "3.5 cm", "a/b", "back\\slash", "it's", '"quoted"', "@#$%", "<unk>",
          "Ümlaut TÜMOR", "high-grade", "margins: negative;", "carcinoma", "tumor", "kidney", "0 of 4", "+", "=", "?!"]


def awkward_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    reports = [e["report"] for entries in json.loads(HISTGEN_JSON.read_text()).values() for e in entries]
    texts = []
    for _ in range(n):
        if rng.random() < 0.3:  # a real-looking report, cut anywhere, sometimes repeated past the length cut
            text = reports[rng.integers(len(reports))] * int(rng.integers(1, 5))
            texts.append(text[: rng.integers(1, len(text) + 1)])
        else:
            texts.append("".join(rng.choice(PIECES, size=rng.integers(1, 40))))
    return texts


@pytest.mark.readme(PARITY)
@pytest.mark.skipif(not (HISTGEN_SRC / "modules" / "tokenizers.py").is_file(),
                    reason="set SLIDECACHE_HISTGEN_SRC to a checkout of dddavid4real/HistGen to run the parity check")
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs a Java runtime")
def test_scores_match_histgen_code(tmp_path):
    test_slides = sorted(s for s, split in fixture_slides().items() if split == "test")
    predictions = tmp_path / "gen.jsonl"
    texts = awkward_texts(120, seed=3)
    shutil.copy(HISTGEN_JSON, tmp_path / "annotation.json")
    predictions.write_text("".join(json.dumps({"id": test_slides[i % len(test_slides)], "text": t}) + "\n"
                                   for i, t in enumerate(texts)))
    out = tmp_path / "parity.json"
    argv = to_argv(PARITY, {"SRC": str(HISTGEN_SRC)}).argv
    run = subprocess.run([sys.executable, str(REPO_ROOT / argv[1]), *argv[2:], "--json", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["strings_differing"] == 0 and result["max_abs_difference"] <= 1e-6, result
    assert 0 < result["ours"]["BLEU-4"] < 1 and "METEOR" in result["histgen"]

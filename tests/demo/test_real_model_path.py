"""The demo's real-model path (`--encoder virchow2 --weights W --llm_path L`) on locally saved random-init
checkpoints of the full architectures (Virchow-2 ViT-H/14, Qwen2-0.5B): the weights are read from the
files, the real recipes are used, and every output names what ran. A few tiles keep it to minutes on 2 cores."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from demo.cohort import DemoSize
from demo.pipeline import DemoSettings, run
from extract.tile_encoders import build_encoder
from store import EmbeddingStore
from train.llm import load_llm


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    encoder = build_encoder("virchow2-random")
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, folder / "virchow2.safetensors")
    del encoder
    llm = load_llm("qwen2-0.5b-random")
    llm.model.save_pretrained(folder / "qwen2-0.5b")
    llm.tokenizer.save_pretrained(folder / "qwen2-0.5b")
    return folder / "virchow2.safetensors", folder / "qwen2-0.5b"


@pytest.mark.slow
@pytest.mark.readme("python -m demo --encoder virchow2 --llm_path Qwen/Qwen2-0.5B-Instruct")  # tests/readme.py
@pytest.mark.recipe("extract/virchow2.yaml")
def test_demo_runs_the_real_architectures_from_local_weights(saved_models, tmp_path):
    weights, llm_dir = saved_models
    settings = DemoSettings(size=DemoSize(patients=6, two_slides_every=100, min_side=600, max_side=700), folds=2,
                            train_epochs=1, max_tiles=4, encoder="virchow2", weights=str(weights),
                            llm_path=str(llm_dir))
    result = run(tmp_path, settings, log=print)
    assert result["failed"] == [] and result["verify_problems"] == []
    spec = EmbeddingStore.open(result["store"]).spec["encoder"]
    assert spec["name"] == "virchow2" and spec["dim"] == 2560 and spec["weights_id"] == "virchow2.safetensors"
    assert len(spec["weights_sha256"]) == 64
    assert "virchow2.safetensors" in result["encoder"] and "random weights" not in result["encoder"]
    assert str(llm_dir) in result["llm"] and "tiny" not in result["llm"]
    manifest = json.loads((tmp_path / "train" / "run_manifest.json").read_text())
    assert manifest["config"]["model"]["llm_path"] == str(llm_dir) and manifest["config"]["model"]["use_llm_lora"] == 16
    assert manifest["parameters"]["total"] > 400e6  # Qwen2-0.5B, not the 2-layer stand-in
    rows = [json.loads(line) for line in open(result["generated"])]
    assert rows and all(isinstance(r["text"], str) for r in rows)
    # 6 patients in 2 folds may leave a head without an estimate: the run records why and still summarises
    for head in ("survival", "grade"):
        outcome = result["evaluation"][head]
        assert "summary" in outcome or any(w in outcome["error"] for w in ("patients", "grade", "event")), outcome
    assert "Encoder: virchow2 (weights:" in (tmp_path / "summary.html").read_text()

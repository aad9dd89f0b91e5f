"""Training from the cache end to end with tiny-qwen2: the loss falls, generation reproduces training
reports, only the projector, LoRA and the (tied) output layer change, resume continues the same curve, the
saved adapter loads with PEFT, the merged model loads with transformers, and the encoder is never imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import Qwen2ForCausalLM

from tests.conftest import REPO_ROOT
from tests.readme import run_main
from train.config import parse_args
from train.generation import generate_reports
from train.llm import load_llm
from train.merge import merge
from train.run import train

pytestmark = pytest.mark.xdist_group("test_train_run")  # its module fixture is built once, on one worker


def losses(log_history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in log_history if "loss" in h}


@pytest.fixture(scope="module")
def overfit(four_slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit") / "run"
    result = train(*parse_args(four_slides.flags(out, "--num_train_epochs", "120", "--logging_steps", "5")))
    return four_slides, out, result


@pytest.mark.recipe("tiny.yaml")  # its own batch, accumulation and precision (only the epochs are raised)
def test_loss_falls_far_and_generation_reproduces_training_reports(overfit, tmp_path):
    inputs, out, result = overfit
    curve = list(losses(result.summary["log_history"]).values())
    assert curve[-1] < 0.2 * curve[0], curve
    generated = tmp_path / "gen.jsonl"
    generate_reports(str(out), inputs.store, str(inputs.meta), generated, max_new_tokens=24)
    rows = [json.loads(line) for line in generated.read_text().splitlines()]
    assert len(rows) == 4
    exact = [r for r in rows if r["text"] == r["reference"]]
    assert exact, rows  # at least one training report comes back word for word


def test_only_what_tiny_yaml_trains_changes(overfit):
    """tiny.yaml trains the projector, LoRA and, tiny-qwen2 being random, its output layer, which is tied to
    the input embeddings: every other weight of the LLM is where it was drawn."""
    _, _, result = overfit
    fresh = dict(load_llm("tiny-qwen2", seed=0).model.named_parameters())
    trained = result.model.llm.base_model.model  # the Qwen2ForCausalLM under PEFT
    changed, lora = [], 0
    for name, param in trained.named_parameters():
        if "lora_" in name:
            lora += 1
            continue
        original = fresh[name.replace(".base_layer", "")]
        if not torch.equal(param.detach().cpu(), original.detach()):  # trained on CUDA when visible
            changed.append(name)
    assert changed == ["model.embed_tokens.weight"], changed[:5]  # lm_head is the same tensor
    assert lora == 2 * 7 * 2  # A and B for q/k/v/o/gate/up/down in both layers
    assert {n.split(".")[0] for n, p in result.model.named_parameters() if p.requires_grad} == {"llm", "projector"}


def test_outputs_load_with_peft_and_transformers(overfit, tmp_path):
    inputs, out, result = overfit
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["config"]["model"]["use_llm_lora"] == 8 and manifest["code_version"] and manifest["packages"]
    # the tied output layer (151,936 x 64), then LoRA and the projector: tens of thousands
    assert 151_936 * 64 < manifest["parameters"]["trainable"] < 151_936 * 64 + 100_000
    base = load_llm("tiny-qwen2", seed=0)
    peft = PeftModel.from_pretrained(base.model, str(out / "adapter"))
    saved = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    trained = {n: p for n, p in result.model.llm.named_parameters() if "lora_" in n}
    assert saved.keys() == trained.keys() and all(torch.equal(saved[n], trained[n].detach().cpu()) for n in saved)
    merged_dir = merge(out, tmp_path / "merged")
    merged = Qwen2ForCausalLM.from_pretrained(merged_dir / "llm")
    ids = torch.tensor([[151644, 872, 198, 9707, 1879]])
    with torch.no_grad():
        expected = peft.eval()(input_ids=ids).logits
        got = merged.eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    moved = merged_dir.rename(tmp_path / "moved")  # a merged folder names its LLM relative to itself
    from train.checkpoint import load_for_inference

    model, _, _ = load_for_inference(moved, torch.device("cpu"))
    torch.testing.assert_close(model.llm.eval()(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_resume_continues_the_same_curve_and_never_imports_the_encoder(four_slides, tmp_path):
    first = tmp_path / "a"
    flags = four_slides.flags(first, "--num_train_epochs", "6", "--save_steps", "3", "--logging_steps", "1")
    run = subprocess.run([sys.executable, "-m", "train", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable parameters:" in run.stdout and "the encoder was never built" in run.stdout
    summary = json.loads((first / "train_summary.json").read_text())
    assert summary["encoder_modules_loaded"] == []
    resumed = train(*parse_args(four_slides.flags(tmp_path / "b", "--num_train_epochs", "6", "--save_steps", "3",
                                                  "--logging_steps", "1", "--resume_from_checkpoint",
                                                  str(first / "checkpoint-3"))))
    whole, tail = losses(summary["log_history"]), losses(resumed.summary["log_history"])
    assert sorted(tail) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's trainer state
    for step in (4, 5, 6):
        assert tail[step] == pytest.approx(whole[step], rel=1e-5), (step, tail[step], whole[step])


def test_generation_on_held_out_fold_only_and_sampling(overfit, tmp_path):
    from slidecache.cohorts.splits import write_split

    inputs, out, _ = overfit
    split = write_split(tmp_path / "split.csv", {"PT0000": 0, "PT0001": 1, "PT0002": 1, "PT0003": 0})
    generated = tmp_path / "held_out.jsonl"
    run = run_main("train.generate", ["--checkpoint", str(out), "--store", inputs.store, "--meta_path", str(inputs.meta),
                                      "--split", str(split), "--fold", "0", "--do_sample", "--max_new_tokens", "8",
                                      "--batch_size", "2", "--out", str(generated)], REPO_ROOT)
    assert run.code == 0, run.stderr[-2000:]
    assert sorted(json.loads(line)["slide"] for line in generated.read_text().splitlines()) == ["PT0000-S0", "PT0003-S0"]
    manifest = json.loads((tmp_path / "held_out_manifest.json").read_text())
    assert manifest["config"]["do_sample"] is True and manifest["config"]["fold"] == 0 and manifest["packages"]


def test_a_random_stand_in_llm_is_rebuilt_with_the_seed_it_was_trained_with(four_slides, tmp_path):
    from train.checkpoint import load_for_inference

    out = tmp_path / "seed7"
    result = train(*parse_args(four_slides.flags(out, "--seed", "7", "--max_steps", "1", "--save_strategy", "no")))
    model, _, spec = load_for_inference(out, torch.device("cpu"))
    assert spec.llm_seed == 7
    rebuilt = dict(model.llm.named_parameters())
    for name, trained in result.model.llm.named_parameters():
        assert torch.equal(rebuilt[name].detach(), trained.detach().cpu()), name  # base weights and LoRA alike


@pytest.mark.slow
@pytest.mark.recipe("qwen2-0.5b-random.yaml")  # its own settings; one step (a 0.5B model on 2 cores)
def test_the_real_size_stand_in_recipe_trains_its_output_layer(four_slides, tmp_path):
    from train.checkpoint import read_spec
    from train.llm import QWEN2_05B_CONFIG

    out = tmp_path / "qwen05"
    flags = ["--config", "qwen2-0.5b-random.yaml", "--meta_path", str(four_slides.meta), "--store", four_slides.store,
             "--output_dir", str(out), "--max_steps", "1", "--report_to", "none", "--disable_tqdm", "True"]
    result = train(*parse_args(flags))
    spec = read_spec(out)
    assert spec.llm_path == "qwen2-0.5b-random" and spec.lora_rank == 16 and spec.unfreeze_lm_head
    assert spec.standardized_tiles and spec.llm_config == QWEN2_05B_CONFIG
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert result.summary["steps"] == 1

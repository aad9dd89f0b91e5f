"""Training inputs: the offline Qwen2 tokenizer, image tokens in spare rows, InternVL2 checkpoints, flags,
configs, and bad annotations stopped with the file and line named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slidecache.cohorts.splits import write_set_split
from slidecache.configs import shipped
from slidecache.errors import AnnotationError, ConfigError, StoreNotFound
from train.config import parse_args
from train.data import IGNORE_INDEX, ConversationEncoder, SlideConversationDataset, load_samples, select_tiles
from train.llm import TINY_CONFIG, load_llm
from train.run import freeze, setup
from train.tokenizer import offline_qwen2_tokenizer


def test_offline_tokenizer_matches_qwen2_ids():
    tokenizer = offline_qwen2_tokenizer()
    assert len(tokenizer) == 151_646
    assert tokenizer("Hello world").input_ids == [9707, 1879]  # Qwen2's ids
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.decode(tokenizer("Tumour grade: G2. 1234").input_ids) == "Tumour grade: G2. 1234"


def test_image_tokens_take_spare_rows_set_to_the_mean():
    loaded = load_llm("tiny-qwen2")
    assert loaded.image_token_ids == {"<img>": 151646, "</img>": 151647, "<IMG_CONTEXT>": 151648}
    weight = loaded.model.get_input_embeddings().weight
    assert weight.shape[0] == 151_936  # no growth: the padded matrix had spare rows
    mean = weight[:151_646].mean(0)
    for row in loaded.new_token_rows:
        torch.testing.assert_close(weight[row], mean)


def test_internvl2_checkpoint_language_model_is_loaded(tmp_path):
    tiny = load_llm("tiny-qwen2", seed=3)
    config = {"architectures": ["InternVLChatModel"], "llm_config": {"architectures": ["Qwen2ForCausalLM"],
                                                                      "model_type": "qwen2", **TINY_CONFIG}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {f"language_model.{k}": v.contiguous() for k, v in tiny.model.state_dict().items() if k != "lm_head.weight"}
    state["vision_model.embeddings.patch.weight"] = torch.zeros(4, 3)  # InternViT's tensors are ignored
    save_file(state, str(tmp_path / "model.safetensors"))
    tiny.tokenizer.save_pretrained(tmp_path)  # holds the image tokens already, as InternVL2's does
    loaded = load_llm(str(tmp_path))
    assert loaded.new_token_rows == [] and loaded.image_token_ids["<IMG_CONTEXT>"] == 151648
    for name, param in loaded.model.state_dict().items():
        assert torch.equal(param, tiny.model.state_dict()[name]), name


def test_every_training_config_loads(tmp_path):
    """Each config with only the inputs its header asks for; one that validates during training also needs the
    train/val/test split file, and is refused without it."""
    split = write_set_split(tmp_path / "split.csv", [("s1", "p1", "train"), ("s2", "p2", "val"), ("s3", "p3", "test")])
    configs = sorted(shipped("train").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        base = ["--config", str(path), "--meta_path", "m.json", "--store", "s", "--output_dir", str(tmp_path)]
        validates = "eval_strategy: epoch" in path.read_text() or "early_stopping_patience" in path.read_text()
        if validates:
            with pytest.raises(ConfigError, match="needs a validation set"):
                parse_args(base)
            base += ["--split", str(split)]
        model, data, training = parse_args(base)
        assert model.freeze_backbone and data.max_tiles >= 1 and training.learning_rate > 0
        assert (training.eval_strategy != "no") == validates, path.name


def test_internvl_flags_and_batch_environment(monkeypatch, tmp_path):
    base = ["--meta_path", "m.json", "--store", "s", "--output_dir", str(tmp_path)]
    with pytest.raises(ConfigError, match="frozen into the cache"):
        parse_args([*base, "--freeze_backbone", "False"])
    with pytest.raises(ConfigError, match="cannot carry LoRA"):
        parse_args([*base, "--use_backbone_lora", "16"])
    with pytest.raises(ConfigError, match="nothing to train"):
        parse_args([*base, "--freeze_mlp", "True"])
    monkeypatch.setenv("GPUS", "2")
    monkeypatch.setenv("BATCH_SIZE", "16")
    monkeypatch.setenv("PER_DEVICE_BATCH_SIZE", "4")
    _, _, training = parse_args([*base, "--use_llm_lora", "16"])
    assert training.per_device_train_batch_size == 4 and training.gradient_accumulation_steps == 2
    monkeypatch.setenv("BATCH_SIZE", "12")
    with pytest.raises(ConfigError, match="not a multiple"):
        parse_args(base)


def test_unfreeze_lm_head_unfreezes_the_tied_parameter(four_slides, tmp_path, capsys):
    model_args, data_args, training_args = parse_args(four_slides.flags(tmp_path, "--unfreeze_lm_head", "True"))
    ready = setup(model_args, data_args, training_args)
    assert ready.model.llm.get_output_embeddings().weight.requires_grad
    assert ready.model.llm.get_input_embeddings().weight.requires_grad  # tied: the same tensor
    freeze(ready.model, model_args)
    assert "tie_word_embeddings" in capsys.readouterr().out


def test_conversation_labels_cover_assistant_turns_only(four_slides):
    tokenizer = load_llm("tiny-qwen2").tokenizer
    encoder = ConversationEncoder(tokenizer, "system text")
    turns = [{"from": "human", "value": "<image>\nReport?"}, {"from": "gpt", "value": "Tumour grade: G2."}]
    ids, labels = encoder.encode(turns, [5])
    assert ids.count(151648) == 5 and ids.count(151646) == 1 and ids.count(151647) == 1
    supervised = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    assert supervised == "Tumour grade: G2.<|im_end|>"
    prompt, _ = encoder.encode(turns, [5], prompt_only=True)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def _bad(tmp, four_slides, lines: list[str], **overrides):
    annotation = tmp / "bad.jsonl"
    annotation.write_text("\n".join(lines) + "\n")
    meta = tmp / "meta.json"
    meta.write_text(json.dumps({"bad": {"root": "", "annotation": str(annotation)}}))
    flags = four_slides.flags(tmp / "out")
    flags[flags.index("--meta_path") + 1] = str(meta)
    for key, value in overrides.items():
        flags += [f"--{key}", value]
    return setup(*parse_args(flags))


def test_bad_annotations_name_file_and_line(four_slides, tmp_path):
    good = four_slides.annotations.read_text().splitlines()[0]
    row = json.loads(good)
    unknown = json.dumps({**row, "slide": "NO-SUCH-SLIDE"})
    two = json.dumps({**row, "conversations": [{"from": "human", "value": "<image><image> x"}, row["conversations"][1]]})
    none = json.dumps({**row, "conversations": [{"from": "human", "value": "x"}, row["conversations"][1]]})
    image_key = json.dumps({"id": 1, "image": "a.png", "conversations": row["conversations"]})
    cases = [([good, "{not json"], r"bad.jsonl, line 2: not JSON"),
             ([good, good, unknown], r"bad.jsonl, line 3: slide 'NO-SUCH-SLIDE' is not in the store"),
             ([two], r"line 1: 2 <image> placeholders for 1 slides"),
             ([none], r"line 1: 0 <image> placeholders for 1 slides"),
             ([image_key], r"line 1: names an image, but .* holds slides; cache the images with `python -m extract "
                           r"images"),
             ([json.dumps({"id": 1, "conversations": row["conversations"]})], r"line 1: no 'slide' key .* nor 'image'")]
    for i, (lines, message) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        with pytest.raises(AnnotationError, match=message):
            _bad(folder, four_slides, lines)
    (tmp_path / "long").mkdir()
    with pytest.raises(AnnotationError, match=r"bad.jsonl, line 1: \d+ tokens .* exceed --max_seq_length 60"):
        _bad(tmp_path / "long", four_slides, [good], max_seq_length="60")
    (tmp_path / "skip").mkdir()
    with pytest.raises(AnnotationError, match=r"nothing to train: all 2 samples exceed --max_seq_length 60 \(e\.g\. "
                                              r".*bad.jsonl, line 1\)"):
        _bad(tmp_path / "skip", four_slides, [good, good], max_seq_length="60", skip_overlong="True")
    (tmp_path / "skip_one").mkdir()
    long = good.replace("Tumour", "Tumour " * 80)
    ready = _bad(tmp_path / "skip_one", four_slides, [good, long], max_seq_length="250", skip_overlong="True")
    assert ready.counts["skipped_overlong"] == 1 and ready.counts["samples"] == 1
    (tmp_path / "nostore").mkdir()
    with pytest.raises(StoreNotFound):
        _bad(tmp_path / "nostore", four_slides, [good], store=str(tmp_path / "missing-store"))


def test_inference_tiles_are_spatially_spread_and_deterministic():
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(40)), -1).reshape(-1, 2) * 224
    rng = np.random.default_rng(0)
    first = select_tiles(len(grid), 16, grid, training=False, rng=rng)
    assert (first == select_tiles(len(grid), 16, grid, training=False, rng=np.random.default_rng(9))).all()
    chosen = grid[first].astype(float)
    gaps = np.sqrt(((chosen[:, None] - chosen[None]) ** 2).sum(-1))
    assert gaps[~np.eye(16, dtype=bool)].min() >= 5 * 224  # spread over the slide, not a raster run
    drawn = select_tiles(len(grid), 16, None, training=True, rng=np.random.default_rng(1))
    assert len(set(drawn.tolist())) == 16 and (np.diff(drawn) > 0).all()
    assert (select_tiles(10, 16, None, training=True, rng=rng) == np.arange(10)).all()


def test_dataset_tiles_depend_on_seed_epoch_and_sample_only(four_slides):
    tokenizer = load_llm("tiny-qwen2").tokenizer
    samples = load_samples(four_slides.meta)
    make = lambda: SlideConversationDataset(samples, four_slides.store, ConversationEncoder(tokenizer, "s"), 8, 512,  # noqa: E731
                                            training=True, seed=0)
    a, b = make(), make()
    assert all((a[i]["tiles"] == b[i]["tiles"]).all() for i in range(len(a)))
    b.epoch = 1
    assert any(a[i]["tiles"].shape == b[i]["tiles"].shape and not (a[i]["tiles"] == b[i]["tiles"]).all()
               for i in range(len(a)))
    assert Path(four_slides.store).exists()


def test_resampler_maps_a_slide_to_k_tokens(four_slides, tmp_path):
    from train.data import Collator

    ready = setup(*parse_args(four_slides.flags(tmp_path, "--resampler_tokens", "4")))
    item = ready.train_dataset[0]
    assert item["input_ids"].count(ready.loaded.img_context_id) == 4 and len(item["tiles"]) > 4
    batch = Collator(ready.loaded.tokenizer.pad_token_id)([item, ready.train_dataset[1]])
    loss = ready.model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and ready.model.resampler.latents.grad.abs().sum() > 0


def test_split_keeps_held_out_patients_out_of_training(four_slides, tmp_path):
    from slidecache.cohorts.splits import write_split

    split = write_split(tmp_path / "split.csv", {"PT0000": 0, "PT0001": 1, "PT0002": 1, "PT0003": 0})
    ready = setup(*parse_args(four_slides.flags(tmp_path / "o", "--split", str(split), "--fold", "0")))
    assert sorted(s.slides[0] for s in ready.train_dataset.samples) == ["PT0001-S0", "PT0002-S0"]
    assert ready.counts["train_samples"] == 2 and ready.counts["not_in_split"] == 0
    with pytest.raises(ConfigError, match="--split needs --fold"):
        parse_args(four_slides.flags(tmp_path / "o", "--split", str(split)))


def test_projector_lr_gives_the_projector_groups_of_its_own(four_slides, tmp_path):
    """--projector_lr (LLaVA's --mm_projector_lr): the projector's parameters train at their own rate, the rest at
    --learning_rate, weight decay kept per group as Trainer sets it."""
    from train.run import SlideTrainer

    model_args, data_args, training_args = parse_args(four_slides.flags(tmp_path, "--mm_projector_lr", "0.05",
                                                                        "--weight_decay", "0.1"))
    assert model_args.projector_lr == 0.05
    ready = setup(model_args, data_args, training_args)
    trainer = SlideTrainer(model=ready.model, args=training_args, train_dataset=ready.train_dataset)
    trainer.projector_lr = model_args.projector_lr
    optimizer = trainer.create_optimizer()
    projector = {id(p) for p in ready.model.projector.parameters()}
    rates = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert {rates[i][0] for i in projector} == {0.05}
    assert {lr for i, (lr, _) in rates.items() if i not in projector} == {training_args.learning_rate}
    assert {decay for _, decay in rates.values()} == {0.0, 0.1}  # biases and norms undecayed, as Trainer groups them
    assert len(rates) == sum(p.requires_grad for p in ready.model.parameters())  # each trainable tensor once
    with pytest.raises(ConfigError, match="projector_lr must be >= 0"):
        parse_args(four_slides.flags(tmp_path, "--projector_lr", "-1"))

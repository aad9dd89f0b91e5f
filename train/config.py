"""Training flags, InternVL style: three dataclasses parsed by transformers' HfArgumentParser, so every
`TrainingArguments` flag (--output_dir, --num_train_epochs, --learning_rate, --per_device_train_batch_size,
--bf16, --save_steps, --resume_from_checkpoint ...) works as in InternVL's finetune scripts, plus
slidecache's --store and --max_tiles. A YAML in configs/train/ gives defaults; flags override it.
GPUS, BATCH_SIZE and PER_DEVICE_BATCH_SIZE are honoured as in InternVL's shell scripts.

Precision is decided here, before TrainingArguments is built (transformers resolves mixed precision in its
`__post_init__`; setting `bf16` afterwards never reaches the Accelerator): bf16 when neither --bf16 nor
--fp16 is given and the GPU supports it. Without a visible GPU `--use_cpu` defaults to True, which lets
`--bf16 True` run on the CPU and makes CPU processes under torchrun join their gloo group.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments
from transformers.hf_argparser import string_to_bool

from slidecache.cohorts.splits import is_set_split
from slidecache.configs import find_config, shipped
from slidecache.errors import ConfigError

DEFAULT_LLM = "Qwen/Qwen2-0.5B-Instruct"  # InternVL2-1B's language model
SYSTEM_MESSAGE = ("You are a pathology assistant. You read a whole-slide image of a tumour and write a short "
                  "report that states the tumour grade and the prognosis.")


@dataclass
class ModelArguments:
    llm_path: str = field(default=DEFAULT_LLM, metadata={
        "help": "hub id, local Qwen2 directory, InternVL2 checkpoint directory, or tiny-qwen2 (random, for tests)"})
    freeze_llm: bool = field(default=True, metadata={"help": "freeze the LLM's own weights (LoRA still trains)"})
    freeze_mlp: bool = field(default=False, metadata={"help": "freeze the projector (mlp1)"})
    freeze_backbone: bool = field(default=True, metadata={"help": "the encoder is frozen into the cache: must be True"})
    unfreeze_lm_head: bool = field(default=False, metadata={"help": "train the output layer (tied to the input "
                                                                     "embeddings in Qwen2-0.5B)"})
    use_llm_lora: int = field(default=0, metadata={"help": "LoRA rank on the LLM (0: none); alpha = 2 x rank"})
    use_backbone_lora: int = field(default=0, metadata={"help": "not possible: the encoder is not run in training"})
    resampler_tokens: int = field(default=0, metadata={"help": "K > 0: a learned cross-attention resampler maps "
                                                                "the slide's tiles to K visual tokens"})
    projector_lr: float = field(default=0.0, metadata={
        "aliases": ["--mm_projector_lr"],
        "help": "learning rate of the projector (and resampler), LLaVA's mm_projector_lr; 0: --learning_rate"})
    lora_dropout: float = 0.05
    grad_checkpoint: bool = field(default=False, metadata={
        "help": "InternVL's flag: recompute the LLM's decoder layers in backward (= --gradient_checkpointing)"})


@dataclass
class DataArguments:
    meta_path: str = field(default="", metadata={"help": "InternVL meta JSON: {name: {root, annotation, ...}}"})
    store: str = field(default="", metadata={"help": "the embedding store the annotations' slides live in"})
    max_tiles: int = field(default=256, metadata={"help": "visual tokens per slide: random tiles in training, "
                                                           "spatially spread tiles at inference"})
    max_seq_length: int = field(default=4096, metadata={"help": "longest sample in tokens, visual tokens included"})
    skip_overlong: bool = field(default=False, metadata={"help": "drop (and count) samples over max_seq_length "
                                                                 "instead of stopping with an error"})
    standardize_tiles: bool = field(default=True, metadata={
        "help": "z-score each tile dimension with statistics of the training split before the projector (saved with "
                "the checkpoint); False feeds raw cached vectors, which a shared component can make image-blind"})
    statistics_tiles_per_slide: int = field(default=512, metadata={
        "help": "random tiles per training slide (or visual tokens per image) the statistics are streamed from"})
    split: str = field(default="", metadata={"help": "patient split file (python -m evaluate split)"})
    fold: int = field(default=-1, metadata={"help": "with --split: train on the other folds; this one is held out"})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "with a train/val/test --split and an --eval_strategy: stop after this many evaluations without a "
                "better --metric_for_best_model on the val set (0: never stop early)"})
    system_message: str = SYSTEM_MESSAGE
    conv_style: str = field(default="Hermes-2", metadata={"help": "ChatML template (InternVL2-1B's)"})
    # InternVL's image flags. Tiling happened at extraction (`python -m extract images`); given here, they
    # must agree with the images store, so a recipe copied from InternVL cannot silently mean something else.
    max_dynamic_patch: int | None = field(default=None, metadata={"help": "images: must match the store's tiling"})
    min_dynamic_patch: int | None = field(default=None, metadata={"help": "images: must match the store's tiling"})
    use_thumbnail: bool | None = field(default=None, metadata={"help": "images: must match the store's tiling"})
    dynamic_image_size: bool | None = field(default=None, metadata={"help": "images: True (the store is tiled so)"})
    force_image_size: int | None = field(default=None, metadata={"help": "images: the encoder's tile size (224)"})
    down_sample_ratio: float = field(default=0.5, metadata={"help": "pixel shuffle ratio: 0.5 (64 tokens per tile)"})
    ps_version: str = field(default="v2", metadata={"help": "InternVL's pixel shuffle version: v2"})


def _yaml_defaults(path: str | Path) -> dict:
    path = find_config(path, "train")
    if not path.is_file():
        raise ConfigError(f"training config {path} does not exist (those shipped are in {shipped('train')})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a training config is a mapping of flag: value")
    return values


def _apply_batch_env(args: TrainingArguments) -> None:
    """InternVL's scripts: GPUS, BATCH_SIZE (global), PER_DEVICE_BATCH_SIZE → gradient accumulation."""
    env = os.environ
    if "PER_DEVICE_BATCH_SIZE" in env:
        args.per_device_train_batch_size = int(env["PER_DEVICE_BATCH_SIZE"])
    if "BATCH_SIZE" in env:
        gpus = int(env.get("GPUS", env.get("WORLD_SIZE", "1")))
        per_step = gpus * args.per_device_train_batch_size
        total = int(env["BATCH_SIZE"])
        if total % per_step:
            raise ConfigError(f"BATCH_SIZE={total} is not a multiple of GPUS x PER_DEVICE_BATCH_SIZE = {per_step}")
        args.gradient_accumulation_steps = total // per_step


def _given(argv: Sequence[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


PRECISION_FLAGS = ("bf16", "fp16", "use_cpu")


def precision_defaults(argv: Sequence[str], yaml_defaults: dict) -> dict:
    """Defaults decided before TrainingArguments exists: bf16 on GPUs that support it (unless a precision is
    given), use_cpu without a GPU (unless given)."""
    return _precision_defaults({name for name in PRECISION_FLAGS if name in yaml_defaults or _given(argv, name)})


def _precision_defaults(given: set[str]) -> dict:
    defaults = {}
    cuda = torch.cuda.is_available()
    if not cuda and "use_cpu" not in given:
        defaults["use_cpu"] = True
    if cuda and not given & {"bf16", "fp16"} and torch.cuda.is_bf16_supported():
        defaults["bf16"] = True
    return defaults


Arguments = tuple[ModelArguments, DataArguments, TrainingArguments]


def _parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="python -m train",
                              description="Train the reporter (projector + LoRA LLM) on a store's cached tokens: "
                                          "InternVL's and Hugging Face TrainingArguments' flags.")
    parser.add_argument("--config", help="a YAML of defaults (configs/train/*.yaml); flags given override it")
    for action in parser._actions:  # optional booleans (`bool | None`) too: `--flag` alone means True, as for the rest
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    return parser


def _config_defaults(parser: HfArgumentParser, config: str | Path | None) -> dict:
    """The YAML's values, every key a flag of the parser."""
    defaults = _yaml_defaults(config) if config else {}
    if defaults:
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            raise ConfigError(f"{config}: unknown keys {unknown}")
    return defaults


def parse_args(argv: Sequence[str] | None = None) -> Arguments:
    parser = _parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    only_config = argparse.ArgumentParser(add_help=False)  # --config first, so that --help shows its defaults
    only_config.add_argument("--config")
    pre, _ = only_config.parse_known_args(argv)
    defaults = _config_defaults(parser, pre.config)
    parser.set_defaults(**precision_defaults(argv, defaults), **defaults)
    return _parsed(parser, argv)


def build_args(config: str | Path | None = None, flags: Sequence[str] = (), **values: Any) -> Arguments:
    """The objects parse_args gives, from keyword values named as the flags are (`llm_path="tiny-qwen2"`,
    `num_train_epochs=8`, `report_to="tensorboard"`), each read as that flag on the command line would be (None:
    not given), over the defaults of the YAML `config`; `flags` (command-line words) override both. For a program
    that trains (the demo): the same defaults, precision rule, batch variables and checks as `python -m train`."""
    parser = _parser()
    flags = list(flags)
    if _given(flags, "config"):
        raise ConfigError("build_args: give the YAML as config=, not among the flags")
    given = {**_config_defaults(parser, config), **_read_values(parser, values)}
    precision = _precision_defaults({name for name in PRECISION_FLAGS if name in given or _given(flags, name)})
    parser.set_defaults(**{**precision, **given})
    return _parsed(parser, flags)


def _read_values(parser: HfArgumentParser, values: dict[str, Any]) -> dict[str, Any]:
    """Each value as its flag given on the command line is read: converted by the flag's type (8 epochs → 8.0),
    a list flag's value made a list, a choice checked."""
    actions = {option: action for action in parser._actions for option in action.option_strings}
    read = {}
    for name, value in values.items():
        action = actions.get(f"--{name}")
        if action is None or name == "config" or action.nargs == 0:  # nargs 0: --help, --no_<flag>
            raise ConfigError(f"unknown training setting {name!r}")
        if value is None:
            continue
        words = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        try:
            read[action.dest] = parser._get_values(action, words)
        except argparse.ArgumentError as e:
            raise ConfigError(f"training setting {name}={value!r}: {e}") from e
    return read


def _parsed(parser: HfArgumentParser, argv: list[str]) -> Arguments:
    """The three objects, with what parsing alone cannot set (InternVL's batch variables, both names of
    gradient checkpointing), checked."""
    parsed = parser.parse_args_into_dataclasses(argv, look_for_args_file=False)
    model_args, data_args, training_args = parsed[0], parsed[1], parsed[2]  # parsed[3]: the --config namespace
    _apply_batch_env(training_args)
    if model_args.grad_checkpoint:  # set after TrainingArguments resolved its aliases: set both names
        training_args.gradient_checkpointing = True
        if hasattr(training_args, "activation_checkpointing"):
            training_args.activation_checkpointing = True
    validate(model_args, data_args, training_args)
    return model_args, data_args, training_args


def validate(model: ModelArguments, data: DataArguments, training: TrainingArguments) -> None:
    if not model.freeze_backbone:
        raise ConfigError("--freeze_backbone False: the encoder is frozen into the cache and never runs during "
                          "training; to change it, re-extract the store with another encoder")
    if model.use_backbone_lora:
        raise ConfigError("--use_backbone_lora: the encoder is not part of training (its outputs are read from "
                          "the store), so it cannot carry LoRA; use --use_llm_lora for the language model")
    if not data.meta_path:
        raise ConfigError("--meta_path is required: an InternVL meta JSON naming the annotation jsonl files")
    if not data.store:
        raise ConfigError("--store is required: the embedding store holding the annotations' slides")
    if data.split and not Path(data.split).is_file():
        raise ConfigError(f"--split {data.split}: no such file")
    if data.split and data.fold < 0 and not is_set_split(data.split):
        raise ConfigError("--split needs --fold K (the fold held out for validation and report generation), "
                          "unless it is a train/val/test split file")
    evaluating = training.eval_strategy != "no"
    if (evaluating or data.early_stopping_patience) and not (data.split and is_set_split(data.split)):
        raise ConfigError("evaluation during training (--eval_strategy, --early_stopping_patience) needs a validation "
                          "set: a train/val/test split file as --split (python -m train.import_reports writes one)")
    if data.early_stopping_patience and not (evaluating and training.load_best_model_at_end):
        raise ConfigError("--early_stopping_patience needs --eval_strategy steps|epoch and --load_best_model_at_end True")
    if data.conv_style != "Hermes-2":
        raise ConfigError(f"--conv_style {data.conv_style!r}: only Hermes-2 (ChatML, InternVL2-1B's) is supported")
    if model.freeze_llm and not model.use_llm_lora and model.freeze_mlp and not model.unfreeze_lm_head:
        raise ConfigError("nothing to train: the LLM and projector are frozen and no LoRA was asked for")
    if data.max_tiles < 1:
        raise ConfigError("--max_tiles must be >= 1")
    if model.projector_lr < 0:
        raise ConfigError("--projector_lr must be >= 0 (0: the projector trains at --learning_rate)")
    if data.statistics_tiles_per_slide < 1:
        raise ConfigError("--statistics_tiles_per_slide must be >= 1")
    if data.down_sample_ratio != 0.5 or data.ps_version != "v2":
        raise ConfigError(f"--down_sample_ratio {data.down_sample_ratio} --ps_version {data.ps_version}: the cached "
                          "grids are folded by InternVL2's pixel shuffle, ratio 0.5, v2")
    if data.dynamic_image_size is False:
        raise ConfigError("--dynamic_image_size False: images stores are tiled dynamically at extraction; extract "
                          "with --max_dynamic_patch 1 --use_thumbnail False for one tile per image")


def check_image_flags(data: DataArguments, tiling: dict) -> None:
    """InternVL's image flags, when given, against how the images store was tiled."""
    wanted = {"max_dynamic_patch": data.max_dynamic_patch, "min_dynamic_patch": data.min_dynamic_patch,
              "use_thumbnail": data.use_thumbnail, "tile_px": data.force_image_size}
    for key, value in wanted.items():
        if value is not None and value != tiling.get(key):
            flag = "force_image_size" if key == "tile_px" else key
            raise ConfigError(f"--{flag} {value}: the images store was tiled with {key} = {tiling.get(key)} at "
                              f"extraction; drop the flag, or re-extract with `python -m extract images --{flag} {value}`"
                              + (" (Virchow-2 reads 224 px tiles)" if key == "tile_px" else ""))

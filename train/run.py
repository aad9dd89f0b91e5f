"""Stage 2 recipe: projector + LoRA LLM trained on cached slide tokens with Hugging Face Trainer.

setup() loads annotations, the store and the LLM and builds the model with the right parameters frozen;
train() runs Trainer (bf16 on GPUs that have it, gradient accumulation, checkpoints, resume, TensorBoard);
the encoder is never built: tiles come from the store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from slidecache.errors import AnnotationError, ConfigError
from slidecache.provenance import encoder_modules_loaded, provenance
from store.embedding_store import EmbeddingStore
from train.checkpoint import ModelSpec, build_model, load_trainable, restore_standardizer, save_checkpoint
from train.config import DataArguments, ModelArguments, check_image_flags
from train.data import (
    Collator,
    ConversationEncoder,
    SlideConversationDataset,
    load_samples,
    select_by_split,
    visual_dim,
    visual_rows,
)
from train.llm import RANDOM_STAND_INS, STAND_IN_CONFIGS, LoadedLLM, load_llm
from train.model import SlideVLM
from train.standardize import TileStandardizer, TileStatistics, stream_statistics

MANIFEST = "run_manifest.json"


class TileEpochCallback(TrainerCallback):
    """Tells the dataset which epoch it is, so tile draws depend on (seed, epoch, sample) only."""

    def __init__(self, dataset: SlideConversationDataset) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class SlideTrainer(Trainer):
    """Trainer that saves what was trained (projector, LoRA adapter, trainable tensors), not the frozen LLM."""

    spec: ModelSpec
    projector_lr: float = 0.0

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, with the projector (and resampler) in groups of their own at --projector_lr. Split
        before the first step, so no optimizer state exists yet; the scheduler then scales every group alike."""
        optimizer = super().create_optimizer(model)
        if self.projector_lr and not getattr(optimizer, "_projector_groups", False):
            unwrapped = self.accelerator.unwrap_model(self.model)
            modules = [m for m in (unwrapped.projector, unwrapped.resampler) if m is not None]
            visual = {id(p) for m in modules for p in m.parameters()}
            groups = []
            for group in optimizer.param_groups:
                rest = [p for p in group["params"] if id(p) not in visual]
                mine = [p for p in group["params"] if id(p) in visual]
                groups += [g for g in ({**group, "params": rest}, {**group, "params": mine, "lr": self.projector_lr})
                           if g["params"]]
            optimizer.param_groups = groups
            optimizer._projector_groups = True
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        save_checkpoint(self.accelerator.unwrap_model(self.model), self.spec, folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        (folder / "training_args.json").write_text(self.args.to_json_string())  # JSON, not a pickle

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)
        restore_standardizer(model or self.model, resume_from_checkpoint)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss computed as the training loss is (logits only where a label is predicted), never
        the full (B, L, vocabulary) logits: evaluation is the val loss (prediction_loss_only)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.accelerator.unwrap_model(model).supervised_loss(**inputs)
        return loss.detach(), None, None

    def _load_best_model(self) -> None:
        """--load_best_model_at_end: the best checkpoint's trainable tensors (what _save wrote)."""
        load_trainable(self.model, self.state.best_model_checkpoint)


@dataclass
class Setup:
    model: SlideVLM
    loaded: LoadedLLM
    spec: ModelSpec
    train_dataset: SlideConversationDataset
    counts: dict[str, Any]
    eval_dataset: SlideConversationDataset | None = None


def freeze(model: SlideVLM, args: ModelArguments) -> list[str]:
    """requires_grad per InternVL's flags; returns notes to print."""
    notes = []
    for name, p in model.llm.named_parameters():
        p.requires_grad = "lora_" in name if args.use_llm_lora else not args.freeze_llm
    for p in [*model.projector.parameters(), *(model.resampler.parameters() if model.resampler else [])]:
        p.requires_grad = not args.freeze_mlp
    if args.llm_path in RANDOM_STAND_INS and args.use_llm_lora and not args.unfreeze_lm_head:
        notes.append(f"note: {args.llm_path} has random weights: with LoRA alone and its output layer frozen it cannot "
                     "learn the report's words (its configs/train YAML sets --unfreeze_lm_head True)")
    if args.unfreeze_lm_head:
        head = model.llm.get_output_embeddings()
        head.weight.requires_grad = True  # the parameter itself, not a flag on the module
        if head.weight is model.llm.get_input_embeddings().weight:
            notes.append("--unfreeze_lm_head: this LLM ties lm_head to the input embeddings "
                         "(tie_word_embeddings), so the input embedding matrix trains too")
    return notes


def setup(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> Setup:
    if model_args.use_llm_lora and not model_args.freeze_llm:
        raise ConfigError("--use_llm_lora with --freeze_llm False: choose LoRA (the LLM frozen under it) or "
                          "full fine-tuning of the LLM, not both")
    store = EmbeddingStore.open(data_args.store)
    if store.kind == "images":
        check_image_flags(data_args, store.spec.get("tiling", {}))
    samples = load_samples(data_args.meta_path, training_args.seed)
    counts: dict[str, Any] = {"annotations": len(samples)}
    val_samples = []
    if data_args.split:
        everything = samples
        samples, unknown = select_by_split(everything, store, data_args.split, data_args.fold, "train")
        counts.update(split=data_args.split, held_out_fold=data_args.fold, train_samples=len(samples),
                      not_in_split=unknown)
        if training_args.eval_strategy != "no":
            val_samples, _ = select_by_split(everything, store, data_args.split, data_args.fold, "val")
            if not val_samples:
                raise ConfigError(f"{data_args.split}: no validation sample, so --eval_strategy has nothing to evaluate")
            counts["val_samples"] = len(val_samples)
    loaded = load_llm(model_args.llm_path, seed=training_args.seed)
    encoder = ConversationEncoder(loaded.tokenizer, data_args.system_message)
    dataset = SlideConversationDataset(samples, data_args.store, encoder, data_args.max_tiles, data_args.max_seq_length,
                                       training=True, seed=training_args.seed, skip_overlong=data_args.skip_overlong,
                                       resampler_tokens=model_args.resampler_tokens)
    counts.update(samples=len(dataset), skipped_overlong=len(dataset.skipped_overlong),
                  skipped_overlong_examples=dataset.skipped_overlong[:5])
    if not len(dataset):
        skipped = dataset.skipped_overlong
        raise AnnotationError(f"{data_args.meta_path}: nothing to train: all {len(skipped)} samples exceed "
                              f"--max_seq_length {data_args.max_seq_length} (e.g. {skipped[0]}); raise it or lower "
                              "--max_tiles" if skipped else f"{data_args.meta_path}: no training sample")
    # validation: the inference-time tile choice (spatially spread), the loss on the reference answers
    val = (SlideConversationDataset(val_samples, data_args.store, encoder, data_args.max_tiles, data_args.max_seq_length,
                                    training=False, seed=training_args.seed, skip_overlong=data_args.skip_overlong,
                                    resampler_tokens=model_args.resampler_tokens, with_answers=True)
           if val_samples else None)
    standardizer = None
    if not data_args.standardize_tiles:
        print("tiles: raw cached vectors (--standardize_tiles False): a component every tile shares can leave the "
              "model blind to the slide; check it with the grounding check (python -m evaluate report --checkpoint)")
    else:
        stats = training_tile_statistics(dataset, data_args.statistics_tiles_per_slide, training_args.seed)
        standardizer = TileStandardizer.from_statistics(stats)
        counts["tile_statistics"] = stats.summary() | {"from": "training samples only",
                                                       "tiles_per_slide": data_args.statistics_tiles_per_slide}
        print(f"tile statistics from {stats.tiles:,} tiles of {stats.items} training "
              f"{'images' if store.kind == 'images' else 'slides'} ({stats.seconds:.1f} s): "
              f"{stats.constant_dims} of {len(stats.mean)} dimensions constant (to float16 rounding: set to 0), "
              f"mean |mean| {np.abs(stats.mean).mean():.3g}, median std of the rest "
              f"{np.median(stats.std[~stats.constant]) if stats.constant_dims < len(stats.mean) else 0:.3g}")
    spec = ModelSpec(model_args.llm_path, visual_dim(store), data_args.max_tiles, model_args.use_llm_lora,
                     model_args.lora_dropout, model_args.resampler_tokens, model_args.unfreeze_lm_head,
                     data_args.system_message, store.fingerprint, llm_seed=training_args.seed,
                     standardized_tiles=standardizer is not None, llm_config=STAND_IN_CONFIGS.get(model_args.llm_path))
    torch.manual_seed(training_args.seed)  # projector init
    model = build_model(spec, loaded, standardizer)
    for note in freeze(model, model_args):
        print(note)
    return Setup(model, loaded, spec, dataset, counts, val)


def training_tile_statistics(dataset: SlideConversationDataset, tiles_per_slide: int, seed: int) -> TileStatistics:
    """Per-dimension statistics of the training samples' slides (or images) only: held-out and validation
    patients never shape the inputs the model is scored on."""
    kinds = {key: sample.kind for sample in dataset.samples for key in sample.slides}
    return stream_statistics(kinds, lambda key, rng: visual_rows(dataset.store, key, kinds[key], tiles_per_slide, rng),
                             seed=seed)


def parameter_counts(model: SlideVLM) -> dict[str, int]:
    seen: dict[int, torch.nn.Parameter] = {}
    for p in model.parameters():
        seen[id(p)] = p
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def write_manifest(folder: Path, model_args: ModelArguments, data_args: DataArguments,
                   training_args: TrainingArguments, extra: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}
    (folder / MANIFEST).write_text(json.dumps(provenance(config) | extra, indent=2, default=str))


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: SlideVLM


def train(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> TrainResult:
    """Precision was decided when the arguments were parsed (train.config.parse_args): setting bf16 here would
    never reach the Accelerator."""
    training_args.remove_unused_columns = False  # the model takes tiles and tile_mask, which Trainer cannot see
    ready = setup(model_args, data_args, training_args)
    counts = parameter_counts(ready.model)
    print(f"trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
          f"({100 * counts['trainable'] / counts['total']:.2f}%)"
          + (f"; the projector at --projector_lr {model_args.projector_lr:g}, the rest at "
             f"{training_args.learning_rate:g}" if model_args.projector_lr else ""))
    print(f"{ready.counts['samples']} training samples from {data_args.meta_path}"
          + (f"; {ready.counts['skipped_overlong']} over-long samples skipped" if ready.counts["skipped_overlong"] else ""))
    out = Path(training_args.output_dir)
    writes = training_args.should_save  # the main process only, under torchrun or Ray Train
    world = training_args.world_size
    callbacks: list[TrainerCallback] = [TileEpochCallback(ready.train_dataset)]
    if data_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(data_args.early_stopping_patience))
    training_args.prediction_loss_only = True  # evaluation is the val loss: no (B, L, 151936) logits kept
    trainer = SlideTrainer(model=ready.model, args=training_args, train_dataset=ready.train_dataset,
                           eval_dataset=ready.eval_dataset, data_collator=Collator(ready.loaded.tokenizer.pad_token_id),
                           processing_class=ready.loaded.tokenizer, callbacks=callbacks)
    trainer.spec = ready.spec
    trainer.projector_lr = model_args.projector_lr
    precision = {"bf16": training_args.bf16, "fp16": training_args.fp16,
                 "accelerator_mixed_precision": str(trainer.accelerator.mixed_precision),
                 "device": str(training_args.device)}
    print(f"precision: {precision['accelerator_mixed_precision']} mixed precision on {precision['device']}")
    if writes:
        write_manifest(out, model_args, data_args, training_args,
                       {"data_counts": ready.counts, "parameters": counts, "llm_source": ready.loaded.source,
                        "world_size": world, "precision": precision})
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or None)
    trainer.save_model(str(out))
    trainer.save_state()
    encoder_modules = encoder_modules_loaded()
    summary = {"train_loss": result.training_loss, "steps": result.global_step, "world_size": world,
               "log_history": trainer.state.log_history, "encoder_modules_loaded": encoder_modules,
               "best_checkpoint": trainer.state.best_model_checkpoint, "best_metric": trainer.state.best_metric,
               "gradient_checkpointing": ready.model.is_gradient_checkpointing}
    if writes:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"done: {result.global_step} steps, mean loss {result.training_loss:.4f}; saved the projector "
          f"(projector.safetensors){', the LoRA adapter (adapter/)' if ready.spec.lora_rank else ''}"
          f"{', the tile statistics (tile_standardizer.safetensors)' if ready.spec.standardized_tiles else ''} and "
          f"every trained tensor (trainable.safetensors) to {out}; "
          "the encoder was never built (tiles read from the store)")
    return TrainResult(summary, ready.model)

"""What a training run saves and how it is read back: the trainable tensors (safetensors), the projector
alone (safetensors), the tile statistics the projector's inputs are standardised with (safetensors), the
LoRA as a PEFT adapter, and `slidecache_model.json` saying how to rebuild the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slidecache.errors import TrainingError
from train.llm import LEGACY_STAND_IN_CONFIGS, LoadedLLM, load_llm
from train.model import SlideVLM
from train.standardize import STANDARDIZER_FILE, TileStandardizer

MODEL_FILE = "slidecache_model.json"
TRAINABLE_FILE = "trainable.safetensors"
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_DIR = "adapter"
MERGED_LLM_DIR = "llm"  # a merged checkpoint's LLM, named relative to the checkpoint folder
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelSpec:
    """Enough to rebuild the SlideVLM around a checkpoint."""

    llm_path: str
    embedding_dim: int
    max_tiles: int
    lora_rank: int
    lora_dropout: float
    resampler_tokens: int
    unfreeze_lm_head: bool
    system_message: str
    store_fingerprint: str
    llm_seed: int = 0  # the seed a random stand-in LLM (tiny-qwen2, qwen2-0.5b-random) was built with
    standardized_tiles: bool = False  # tiles standardised with the run's STANDARDIZER_FILE (False: runs before it)
    llm_config: dict | None = None  # the architecture a random stand-in LLM was built from (None: real weights)


def apply_lora(llm: torch.nn.Module, rank: int, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(llm, config)


def build_model(spec: ModelSpec, loaded: LoadedLLM, standardizer: TileStandardizer | None = None) -> SlideVLM:
    if spec.standardized_tiles and standardizer is None:
        raise TrainingError("the model spec asks for standardised tiles but no tile statistics were given")
    llm = apply_lora(loaded.model, spec.lora_rank, spec.lora_dropout) if spec.lora_rank else loaded.model
    return SlideVLM(llm, spec.embedding_dim, loaded.hidden_size, loaded.img_context_id, spec.resampler_tokens,
                    standardizer)


def trainable_state(model: SlideVLM) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(model: SlideVLM, spec: ModelSpec, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    save_file(state, str(folder / TRAINABLE_FILE))
    projector = {k: v for k, v in state.items() if k.startswith(("projector.", "resampler."))}
    save_file(projector, str(folder / PROJECTOR_FILE))
    if model.standardizer is not None:
        model.standardizer.save(folder / STANDARDIZER_FILE)
    if spec.lora_rank:  # a trained output layer (and the embeddings tied to it) travels in the adapter too, so
        # PeftModel.from_pretrained on the base LLM gives the trained model
        model.llm.save_pretrained(str(folder / ADAPTER_DIR), save_embedding_layers=spec.unfreeze_lm_head)
    (folder / MODEL_FILE).write_text(json.dumps(asdict(spec), indent=2))


def load_standardizer(spec: ModelSpec, folder: str | Path) -> TileStandardizer | None:
    """The tile statistics a checkpoint was trained with (None for runs that fed raw tiles)."""
    return TileStandardizer.load(Path(folder) / STANDARDIZER_FILE) if spec.standardized_tiles else None


def restore_standardizer(model: SlideVLM, folder: str | Path) -> None:
    """Resume: the statistics the checkpoint was trained with replace those just computed (they agree unless
    the store changed since)."""
    saved = Path(folder) / STANDARDIZER_FILE
    if model.standardizer is not None and saved.is_file():
        loaded = TileStandardizer.load(saved)
        with torch.no_grad():
            model.standardizer.mean.copy_(loaded.mean)
            model.standardizer.scale.copy_(loaded.scale)


def load_trainable(model: SlideVLM, folder: str | Path) -> None:
    """Put a checkpoint's trainable tensors into `model`; every saved tensor must find its parameter."""
    path = Path(folder) / TRAINABLE_FILE
    if not path.is_file():
        raise TrainingError(f"{folder} holds no {TRAINABLE_FILE}: not a slidecache checkpoint")
    state = load_file(str(path))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise TrainingError(f"{path}: tensors {unknown[:3]} have no place in this model (other --use_llm_lora or "
                            "--resampler_tokens than the run that saved it?)")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


def read_spec(folder: str | Path) -> ModelSpec:
    path = Path(folder) / MODEL_FILE
    if not path.is_file():
        raise TrainingError(f"{folder} is not a slidecache training output (no {MODEL_FILE}); give the run's "
                            "--output_dir or one of its checkpoint-N folders")
    return ModelSpec(**json.loads(path.read_text()))


def load_for_inference(folder: str | Path, device: torch.device) -> tuple[SlideVLM, LoadedLLM, ModelSpec]:
    """Rebuild the model: the LLM from its source, the LoRA adapter via PEFT, then the trained tensors."""
    spec = read_spec(folder)
    stand_in = spec.llm_config or LEGACY_STAND_IN_CONFIGS.get(spec.llm_path)  # None for real weights
    beside = Path(folder) / spec.llm_path  # a merged checkpoint names its LLM folder relative to itself
    source = str(beside) if not Path(spec.llm_path).is_absolute() and beside.is_dir() else spec.llm_path
    loaded = load_llm(source, seed=spec.llm_seed, stand_in_config=stand_in)  # rebuilt exactly as trained
    llm = loaded.model
    if spec.lora_rank:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, str(Path(folder) / ADAPTER_DIR))
    model = SlideVLM(llm, spec.embedding_dim, loaded.hidden_size, loaded.img_context_id, spec.resampler_tokens,
                     load_standardizer(spec, folder))
    load_trainable(model, folder)
    return model.to(device).eval(), loaded, spec

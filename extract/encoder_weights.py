"""Where a tile encoder's weights come from and how they are read: a local file or folder, or a gated hub id
(HF_TOKEN from the environment, never read or logged by us); safetensors, or a plain state dict read with
torch.load(weights_only=True), so a checkpoint that would run code on unpickling is refused, never run."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from slidecache.errors import EncoderError

WEIGHTS_FILENAME = "model.safetensors"
STATE_DICT_FILENAME = "pytorch_model.bin"  # a plain state dict: read with torch.load(weights_only=True)
HF_CONFIG = "config.json"
Spec = TypeVar("Spec")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_hub_id(text: str) -> bool:
    """`owner/name`, not a path: what a hub download is tried for when no such local file or folder exists."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


GATED_ADVICE = "The weights are gated: accept the licence on the hub and set HF_TOKEN, or pass a local weights file"


def hub_download(repo: str, filenames: tuple[str, ...], revision: str | None = None,
                 advice: str = GATED_ADVICE) -> Path:
    """The first of `filenames` the hub repository has (HF_TOKEN from the environment; never read by us)."""
    from huggingface_hub import hf_hub_download  # imported late: no network probe at import time
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    last: Exception | None = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError as e:  # the repository exists but ships another file name: try the next
            last = e
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            last = e
            break
    raise EncoderError(f"could not fetch {' or '.join(filenames)} of {repo!r} ({type(last).__name__}). {advice}") \
        from last


def resolve_weights_file(weights: str, names: tuple[str, ...], model: str, needs_config: bool = False) -> Path:
    """A local weights file, a directory holding one of the entry's weights files, or a hub id (HF_TOKEN).
    `names`: the files the model's hub repository ships, in the order tried. A transformers model (Phikon-v2,
    `needs_config`) also needs its config.json beside the file."""
    local = Path(weights).expanduser()
    if local.is_dir():
        found = [local / n for n in names if (local / n).is_file()]
        if not found:
            raise EncoderError(f"{local} holds no {' or '.join(names)}: point --weights at the weights file")
        local = found[0]
    if local.is_file():
        path = local
    elif not is_hub_id(weights):
        raise EncoderError(f"weights {weights!r}: no such file, and not a hub id of the form owner/name")
    else:
        path = hub_download(weights, names)
        if needs_config:
            hub_download(weights, (HF_CONFIG,))  # lands beside the weights in the same snapshot folder
    if needs_config and not (path.parent / HF_CONFIG).is_file():
        raise EncoderError(f"{path}: a {model} checkpoint needs its {HF_CONFIG} in the same folder")
    return path


def read_state_dict(path: Path, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """safetensors, or a plain state dict read with weights_only=True (a pickle that would run code is refused);
    `nested_key`: a checkpoint dict may hold the state dict under that key (Prov-GigaPath's {"model": ...})."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            # mmap for the zip format torch.save writes; a legacy-format file is read whole (still weights_only)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # weights_only's refusal is an UnpicklingError; a torn file another error
            raise EncoderError(f"{path}: not a state dict torch.load(weights_only=True) can read "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); checkpoints that need "
                               "arbitrary unpickling are never loaded") from e
        if nested_key is not None and isinstance(state, dict) and isinstance(state.get(nested_key), dict):
            state = state[nested_key]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EncoderError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
        return state
    raise EncoderError(f"{path}: weights must be .safetensors or a state dict (.bin/.pt/.pth, read with "
                       "weights_only=True)")


def gated_and_random(spec: Callable[..., Spec], name: str, hub_id: str, card: str, **kw: Any) -> dict[str, Spec]:
    """A registry's two entries for a gated hub model: the model, and its random-init twin of the same
    architecture (shapes, speed, pipelines and GPU benchmarks without the weights)."""
    return {
        name: spec(name, weights=hub_id, description=f"{card}; gated weights: hub id {hub_id} with HF_TOKEN, or a "
                   "local file", **kw),
        f"{name}-random": spec(f"{name}-random", description=f"{card}, random weights (seed 0)", **kw),
    }


def load_weights(target: torch.nn.Module, path: Path) -> None:
    """Fill `target` (built on the meta device: no memory, no random init) with the file's tensors."""
    # fp32 as the initialised model was (a bf16 file would otherwise make a bf16 model); .float() of fp32 is free
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}
    try:
        missing, unexpected = target.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of another shape: another size of the family
        shapes = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
        raise EncoderError(f"{path} does not match the architecture: {shapes}") from e
    left_empty = [name for name, t in [*target.named_parameters(), *target.named_buffers()]
                  if t.is_meta and name not in missing]  # e.g. a buffer no state dict holds
    if missing or unexpected or left_empty:
        raise EncoderError(
            f"{path} does not match the architecture: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            + (f", {len(left_empty)} tensors left unfilled (e.g. {left_empty[:3]})" if left_empty else "")
        )

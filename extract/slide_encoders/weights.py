"""A slide encoder's weights into our module, strictly: every tensor the module has must come from the file with
its published name and shape, and every tensor of the file must have a place (or belong to a part of the hub
model we do not build, named by the registry: PRISM's text decoder, TITAN's text encoder). Files are read
by extract.encoder_weights.read_state_dict (safetensors, or torch.load with weights_only=True; a pickle that
would run code is refused, never run).

Published files carry the slide encoder inside a larger model: its keys under a prefix ("image_resampler.",
"vision_encoder.") or the state dict under a key of a checkpoint dict ("model"). A file that holds only the
slide encoder's own keys, without the prefix, is taken as well. Modules shared between layers (PRISM) have one
tensor under several names; a file may hold any one of them (safetensors keeps one), or all, equal."""

from __future__ import annotations

import torch

from slidecache.errors import EncoderError


def _own_keys(state: dict[str, torch.Tensor], prefix: str, ignored: tuple[str, ...],
              source: str) -> dict[str, torch.Tensor]:
    """The slide encoder's part of a file, its prefix removed; anything else must be a part we leave out."""
    if not prefix or not any(k.startswith(prefix) for k in state):
        return dict(state)
    stray = [k for k in state if not k.startswith(prefix) and not k.startswith(ignored)]
    if stray:
        raise EncoderError(f"{source}: {len(stray)} keys belong to no part of the model (e.g. {stray[:3]}); "
                           f"expected keys under {prefix!r}" + (f" or {', '.join(ignored)}" if ignored else ""))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def alias_groups(model: torch.nn.Module) -> list[list[str]]:
    """The model's state-dict names, grouped by tensor: one name each, several for a shared module's."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def load_slide_state(model: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "",
                     ignored: tuple[str, ...] = (), source: str = "weights") -> None:
    """Fill `model` (on the meta device or not) from `state`, strictly up to shared names; assign, so a meta
    model takes the file's tensors without initialising its own. fp32 as the random init would be."""
    own = _own_keys(state, prefix, ignored, source)
    expected = model.state_dict(keep_vars=True)
    full: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for names in alias_groups(model):
        present = [n for n in names if n in own]
        if not present:
            missing.append(names[0])
            continue
        tensor = own[present[0]]
        if any(own[n].shape != tensor.shape or (own[n] is not tensor and own[n].device.type != "meta"
                                                 and not torch.equal(own[n], tensor)) for n in present[1:]):
            raise EncoderError(f"{source}: {present} name one shared tensor but hold different values")
        for n in names:
            full[n] = tensor
    unexpected = sorted(set(own) - set(expected))
    wrong = [f"{n}: file {tuple(t.shape)}, model {tuple(expected[n].shape)}" for n, t in full.items()
             if t.shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise EncoderError(f"{source} does not match the architecture: {len(missing)} missing keys (e.g. "
                           f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of "
                           f"another shape (e.g. {wrong[:3]})")
    model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in full.items()},
                          strict=True, assign=True)

"""Merge a run's LoRA into its LLM and write a stand-alone model folder.

    python -m train.merge --checkpoint RUN_DIR --out MERGED_DIR

MERGED_DIR/llm is a plain Qwen2 directory (safetensors + tokenizer, with the image tokens) that loads
with Qwen2ForCausalLM.from_pretrained; the projector, the tile statistics and slidecache_model.json sit
beside it, naming it relative to MERGED_DIR (which can move), so
`python -m train.generate --checkpoint MERGED_DIR` works without PEFT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Sequence

import torch

from slidecache.cli_args import run_command
from slidecache.provenance import provenance
from train.checkpoint import MERGED_LLM_DIR, MODEL_FILE, PROJECTOR_FILE, TRAINABLE_FILE, load_for_inference
from train.model import SlideVLM
from train.standardize import STANDARDIZER_FILE


def merge(checkpoint: str | Path, out: str | Path) -> Path:
    model, loaded, spec = load_for_inference(checkpoint, torch.device("cpu"))
    llm = model.llm.merge_and_unload() if spec.lora_rank else model.llm
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    llm.save_pretrained(partial / MERGED_LLM_DIR)
    loaded.tokenizer.save_pretrained(partial / MERGED_LLM_DIR)
    merged = SlideVLM(llm, spec.embedding_dim, loaded.hidden_size, loaded.img_context_id, spec.resampler_tokens,
                      model.standardizer)
    merged.load_state_dict(model.state_dict(), strict=False)  # projector / resampler (llm shared)
    from safetensors.torch import save_file

    projector = {k: v.contiguous() for k, v in merged.state_dict().items() if k.startswith(("projector.", "resampler."))}
    save_file(projector, str(partial / PROJECTOR_FILE))
    save_file(projector, str(partial / TRAINABLE_FILE))  # what load_for_inference puts back after the LLM
    if merged.standardizer is not None:  # the same statistics: a merged model reads tiles as the run did
        merged.standardizer.save(partial / STANDARDIZER_FILE)
    # "llm", relative to the merged folder: the folder can be moved or copied whole
    new_spec = replace(spec, llm_path=MERGED_LLM_DIR, lora_rank=0, llm_config=None)
    (partial / MODEL_FILE).write_text(json.dumps(asdict(new_spec), indent=2))
    (partial / "merge_manifest.json").write_text(json.dumps(provenance({"checkpoint": str(checkpoint)}), indent=2,
                                                            default=str))
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.merge", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=_run)
    return run_command(parser, argv)


def _run(args: argparse.Namespace) -> int:
    out = merge(args.checkpoint, args.out)
    print(f"wrote the merged model to {out} (llm/ loads with Qwen2ForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

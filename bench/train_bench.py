"""Training from the cache vs. from tensors in memory vs. with the encoder run live, side by side.

In one run, with the same LLM (default: Qwen2-0.5B's architecture, random weights, LoRA 16) and batch:
  (a) the step time when batches come from the store through the DataLoader vs. the same batches
      already in memory (target: the cache adds <= 10%: store reads are hidden);
  (b) the step time from the cache vs. the same step with the frozen encoder (virchow2-random) run on
      the tiles first, as users of the original InternVL-based repo pay, at 16, 64 and 256 tiles per
      sample. The encoder's CPU time is measured on up to --encoder-tiles tiles and scaled linearly
      (a frozen ViT costs the same per tile); the ratio a GPU would see is predicted from FLOP counts
      (same utilisation assumed for both), with the break-even number of epochs of the one-off extraction.

    python bench/train_bench.py [--llm qwen2-0.5b-random] [--tiles 16 64 256] [--steps 4] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slidecache.provenance import provenance  # noqa: E402
from store import EmbeddingStore  # noqa: E402
from train.checkpoint import ModelSpec, build_model  # noqa: E402
from train.config import SYSTEM_MESSAGE  # noqa: E402
from train.data import Collator, ConversationEncoder, Sample, SlideConversationDataset  # noqa: E402
from train.llm import load_llm  # noqa: E402

VIRCHOW2_PARAMS = 632e6
VIRCHOW2_TOKENS = 261  # 256 patches + class + 4 registers at 224 px
TILES_PER_REAL_SLIDE = 10_000
REPORT = "Tumour grade: G2. Invasive carcinoma, moderately differentiated, no necrosis. Prognosis: high risk."


def write_store(root: Path, slides: int, tiles: int, dim: int) -> str:
    rng = np.random.default_rng(0)
    spec = {"encoder": {"name": "bench-synthetic", "dim": dim, "dtype": "float16"}, "tiling": {"tile_px": 224}}
    url = str(root / "store")
    store = EmbeddingStore.create_or_open(url, kind="slides", spec=spec)
    side = int(np.ceil(np.sqrt(tiles)))
    coords = (np.stack([np.arange(tiles) % side, np.arange(tiles) // side], 1) * 448).astype(np.int64)
    for i in range(slides):
        with store.write_slide(f"S{i:03d}", {"patient_id": f"P{i:03d}"}) as writer:
            writer.append(coords, np.ones(tiles), rng.normal(size=(tiles, dim)).astype(np.float16))
            writer.commit()
    return url


def samples(slides: int) -> list[Sample]:
    turns = [{"from": "human", "value": "<image>\nWrite the pathology report."}, {"from": "gpt", "value": REPORT}]
    return [Sample(f"bench, line {i + 1}", f"S{i:03d}", [f"S{i:03d}"], turns) for i in range(slides)]


def step(model, optimiser, batch: dict, device: torch.device) -> float:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(**batch).loss
    loss.backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
    return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def started(loader: DataLoader):
    """The loader's iterator with its first batch taken outside the clock: what a long run sees is the
    steady state, not the wait for the first batch (which on a GPU is a large share of a few short steps)."""
    iterator = iter(loader)
    next(iterator)
    return iterator


def time_steps(model, optimiser, batches, device: torch.device) -> float:
    """Seconds per step over the iterable (its loading time included)."""
    sync(device)
    started, n = time.perf_counter(), 0
    for batch in batches:
        step(model, optimiser, batch, device)
        n += 1
    sync(device)
    return (time.perf_counter() - started) / n


def live_encoder(device: torch.device, largest: int):
    from extract.config import ExtractConfig
    from extract.inference import BatchEncoder

    batch = largest if device.type == "cuda" else 32
    return BatchEncoder(ExtractConfig(encoder="virchow2-random", batch_size=batch), device)


def encoder_seconds(encoder, device: torch.device, tiles: int, timed_tiles: int) -> float:
    """Seconds to encode `tiles` tiles: timed on all of them on a GPU; on a CPU timed on `timed_tiles` and
    scaled linearly (a frozen ViT costs the same per tile, and 512 tiles would take half an hour here)."""
    n = tiles if device.type == "cuda" else min(tiles, timed_tiles)
    pixels = np.random.default_rng(0).integers(0, 255, size=(n, 224, 224, 3), dtype=np.uint8)
    encoder(pixels[: min(n, 2)] if device.type == "cpu" else pixels)  # warm-up (kernels for this shape on a GPU)
    sync(device)
    started = time.perf_counter()
    encoder(pixels)
    sync(device)
    return (time.perf_counter() - started) * tiles / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="qwen2-0.5b-random")
    parser.add_argument("--tiles", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers reading the store")
    parser.add_argument("--encoder-tiles", type=int, default=16,
                        help="on a CPU, tiles the live encoder is timed on (scaled to the step); a GPU encodes them all")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    loaded = load_llm(args.llm)
    dim = 2560
    spec = ModelSpec(args.llm, dim, max(args.tiles), 16, 0.05, 0, False, SYSTEM_MESSAGE, "bench")
    model = build_model(spec, loaded).to(device)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name or name.startswith("projector.")
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    llm_params = sum(p.numel() for n, p in model.llm.named_parameters() if "lora_" not in n)
    n_samples = args.batch * (args.steps + 1)
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    rows = []
    try:
        url = write_store(work, n_samples, max(args.tiles) * 2, dim)
        encoder = live_encoder(device, max(args.tiles) * args.batch)
        print(f"LLM {args.llm} ({llm_params / 1e6:.0f}M params, LoRA 16), batch {args.batch}, device {device}, "
              f"live encoder virchow2-random in {encoder.precision}", flush=True)
        for tiles in args.tiles:
            encode_s = encoder_seconds(encoder, device, tiles * args.batch, args.encoder_tiles)
            conversation = ConversationEncoder(loaded.tokenizer, SYSTEM_MESSAGE)
            dataset = SlideConversationDataset(samples(n_samples), url, conversation, tiles, 1 << 20, training=True)
            collate = Collator(loaded.tokenizer.pad_token_id)
            loader = DataLoader(dataset, batch_size=args.batch, collate_fn=collate, num_workers=args.workers,
                                pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
            batches = list(loader)  # also starts the workers: their start-up is paid once per run, not per step
            step(model, optimiser, batches[0], device)  # warm-up
            # Alternate the two ways so drift (thermal, page cache) hits both alike.
            from_cache, in_memory = 0.0, 0.0
            for _ in range(2):
                from_cache += time_steps(model, optimiser, started(loader), device) / 2
                in_memory += time_steps(model, optimiser, batches[1:], device) / 2
            live = from_cache + encode_s
            tokens = int(batches[1]["attention_mask"].sum()) / args.batch
            llm_flops = 4 * llm_params * tokens * args.batch  # frozen base: activation grads, no weight grads
            enc_flops = 2 * VIRCHOW2_PARAMS * VIRCHOW2_TOKENS * tiles * args.batch
            gpu_ratio = (llm_flops + enc_flops) / llm_flops
            row = {"tiles_per_sample": tiles, "tokens_per_sample": tokens, "step_from_cache_s": from_cache,
                   "step_in_memory_s": in_memory, "cache_overhead": from_cache / in_memory - 1,
                   "step_live_encoder_s": live, "encoder_tiles_per_s": tiles * args.batch / encode_s, "live_over_cache_cpu": live / from_cache,
                   "live_over_cache_gpu_predicted": gpu_ratio,
                   "break_even_epochs": TILES_PER_REAL_SLIDE / tiles}
            rows.append(row)
            print(f"{tiles:>4} tiles/sample ({tokens:.0f} tokens): cache {from_cache:.3f} s/step vs in-memory "
                  f"{in_memory:.3f} s ({100 * row['cache_overhead']:+.1f}%, target <= +10%); live encoder "
                  f"{live:.1f} s/step = {row['live_over_cache_cpu']:.1f}x the cached step here, "
                  f"{gpu_ratio:.0f}x predicted on a GPU (FLOPs)", flush=True)
            print(f"      over {args.epochs} epochs the live encoder costs {args.epochs * tiles} tile encodings per "
                  f"sample; the cache costs one pass over the slide ({TILES_PER_REAL_SLIDE} tiles): it pays for "
                  f"itself after {row['break_even_epochs']:.0f} epochs summed over every training run, sweep and "
                  "head fit that reads it", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                      f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'no GPU'}",
           "llm": args.llm, "llm_params": llm_params, "batch": args.batch, "workers": args.workers,
           "encoder_precision": encoder.precision, "rows": rows, "versions": provenance()["packages"]}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Encoder throughput of virchow2-random on one CUDA GPU: tiles/s and MFU per batch size.

Needs only torch, timm, safetensors and huggingface_hub (any recent versions), no network, run from the
source tree: `bash bench/gpu_extract.sh`. What is timed is what extraction does per batch: normalised
uint8 tiles already on the GPU → bf16 forward → class ‖ mean-patch pooling → fp16 embeddings copied to
the host. FLOPs per tile are counted by torch's FlopCounterMode on the real model (attention included),
and MFU is reported against both the datasheet bf16 dense peak and a bf16 matmul measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract.tile_encoders import build_encoder  # noqa: E402

DATASHEET_BF16_DENSE_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_DENSE_TFLOPS.items():
        if key in name:
            return tflops
    return None


def flops_per_tile(model: torch.nn.Module, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, 224, 224, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        model(x)
    return float(fc.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measured_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def time_batch(encoder, batch: int, device: torch.device, weights_bf16: bool, iters: int) -> dict:
    mean = torch.tensor(encoder.data_config["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.data_config["std"], device=device).view(1, 3, 1, 1)
    # A few distinct random batches, rotated, so no run sees the same input twice in a row.
    tiles = [torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device) for _ in range(3)]
    out_host = torch.empty(batch, encoder.embedding_dim, dtype=torch.float16)
    if device.type == "cuda":
        out_host = out_host.pin_memory()

    def step(i: int) -> None:
        x = (tiles[i % 3].float().div_(255) - mean) / std
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=not weights_bf16):
            emb = encoder.embed(x.to(torch.bfloat16) if weights_bf16 else x)
        out_host.copy_(emb.to(torch.float16), non_blocking=True)

    for i in range(3):
        step(i)
    synchronize(device)
    times = []
    for i in range(iters):
        t0 = time.perf_counter()
        step(i)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"batch": batch, "median_s": med, "spread_s": max(times) - min(times), "tiles_per_s": batch / med}


def time_batch_encoder(args: argparse.Namespace, device: torch.device, flops: float, peak_meas: float,
                       peak_sheet: float | None) -> list[dict]:
    """The extractor's BatchEncoder end to end: numpy uint8 (B, 224, 224, 3) on the host → fp16 numpy."""
    from extract.config import ExtractConfig
    from extract.inference import BatchEncoder

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        encoder = BatchEncoder(ExtractConfig(encoder=args.encoder, precision="bf16", batch_size=batch), device)
        tiles = [np.random.default_rng(i).integers(0, 256, (batch, 224, 224, 3), dtype=np.uint8) for i in range(3)]
        for i in range(3):
            encoder(tiles[i])
        times = []
        for i in range(args.iters):
            t0 = time.perf_counter()
            encoder(tiles[i % 3])  # returns host numpy: synchronised
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        achieved = batch / med * flops / 1e12
        rows.append({"mode": "BatchEncoder host->host", "batch": batch, "median_s": med, "tiles_per_s": batch / med,
                     "tflops": achieved, "mfu_vs_matmul": achieved / peak_meas,
                     "mfu_vs_datasheet": achieved / peak_sheet if peak_sheet else None,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0})
        del encoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,128,256,512")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--encoder", default="virchow2-random", help="registry name (virchow2-tiny to dry-run)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of this script")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the bf16 matmul ceiling")
    parser.add_argument("--compile", action="store_true", help="also time bf16 weights under torch.compile")
    parser.add_argument("--batch-encoder", action="store_true",
                        help="also time extract.inference.BatchEncoder, the extractor's own path: host uint8 tiles in, "
                             "fp16 embeddings out (needs PyYAML)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    import timm

    print(f"device: {name}; torch {torch.__version__}; timm {timm.__version__}; CUDA {torch.version.cuda}")
    t0 = time.perf_counter()
    encoder = build_encoder(args.encoder, device=device)
    print(f"built {args.encoder} in {time.perf_counter() - t0:.1f} s")
    flops = flops_per_tile(encoder.model, device)
    peak_sheet = datasheet_peak(name)
    peak_meas = measured_matmul_tflops(device, args.matmul_n)
    print(f"FLOPs per tile (FlopCounterMode): {flops / 1e9:.1f} G; bf16 {args.matmul_n}^3 matmul here: {peak_meas:.0f} TFLOP/s;"
          f" datasheet bf16 dense: {peak_sheet or 'unknown'} TFLOP/s")

    rows = []
    modes = [("autocast(fp32 weights)", False), ("bf16 weights", True)]
    if args.compile:
        modes.append(("bf16 + torch.compile", True))
    for mode, weights_bf16 in modes:
        if weights_bf16:
            encoder.model.to(torch.bfloat16)
        if mode.endswith("compile"):
            t0 = time.perf_counter()
            encoder.model = torch.compile(encoder.model)
            print(f"torch.compile wrapped the model ({time.perf_counter() - t0:.1f} s; compiles on first batch)")
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                r = time_batch(encoder, batch, device, weights_bf16, args.iters)
            except torch.cuda.OutOfMemoryError:
                print(f"{mode} batch {batch}: out of memory")
                torch.cuda.empty_cache()
                continue
            achieved = r["tiles_per_s"] * flops / 1e12
            r.update(mode=mode, tflops=achieved, mfu_vs_matmul=achieved / peak_meas,
                     mfu_vs_datasheet=achieved / peak_sheet if peak_sheet else None,
                     peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0)
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()

    if args.batch_encoder:
        rows += time_batch_encoder(args, device, flops, peak_meas, peak_sheet)

    print(f"\n{'mode':<24}{'batch':>6}{'tiles/s':>10}{'TFLOP/s':>9}{'MFU(sheet)':>12}{'MFU(matmul)':>13}{'peak GiB':>10}")
    for r in rows:
        sheet = f"{r['mfu_vs_datasheet']:.1%}" if r["mfu_vs_datasheet"] is not None else "n/a"
        print(f"{r['mode']:<24}{r['batch']:>6}{r['tiles_per_s']:>10.0f}{r['tflops']:>9.0f}{sheet:>12}"
              f"{r['mfu_vs_matmul']:>13.1%}{r['peak_mem_gib']:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "encoder": args.encoder, "torch": torch.__version__, "timm": timm.__version__,
                                         "gflops_per_tile": flops / 1e9, "matmul_tflops": peak_meas,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

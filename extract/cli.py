"""`python -m extract --cohort NAME_OR_TABLE --store URL ...`: thin CLI over extract.job; `images` and
`slide-embeddings` subcommands over extract.images and extract.slide_embeddings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from extract.cohorts import resolve_cohort
from extract.config import DEFAULT_CONFIG, DEVICE_DEFAULTS, EXECUTORS, ExtractConfig
from extract.stages import Stages
from slidecache.cli_args import ArgumentParser, guarded, storage_options
from slidecache.configs import SHIPPED
from slidecache.errors import ConfigError
from slidecache.slide_embeddings import SLIDE_ENCODERS
from slidecache.tile_embeddings import EMBEDDING_WIDTHS
from store.backends import display_url

CONFIG_HELP = (f"extraction YAML (default: configs/extract/ENCODER.yaml when --encoder names one that exists, else "
               f"{DEFAULT_CONFIG.relative_to(SHIPPED.parent)}; settings it leaves out follow the device: batch / "
               f"read chunk {DEVICE_DEFAULTS['cuda']['batch_size']} / {DEVICE_DEFAULTS['cuda']['read_chunk']} with GPUs, "
               f"{DEVICE_DEFAULTS['cpu']['batch_size']} / {DEVICE_DEFAULTS['cpu']['read_chunk']} on CPU)")
_FAMILIES = [n for n in EMBEDDING_WIDTHS if not n.startswith("virchow2-")]  # torch-free: --help stays fast
ENCODER_HELP = (f"registry name (extract/tile_encoders.py: {', '.join(_FAMILIES)}, each with a NAME-random twin; "
                "virchow2-small, virchow2-tiny)")
ENCODERS_HELP = (ENCODER_HELP + "; several, comma-separated (virchow2,uni2-h), fill one store each from one read of "
                 "every slide: --store then holds {encoder} or lists one store per encoder")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m extract",
                                description="Encode whole-slide images once into a slidecache store (a Ray job, or one "
                                            "machine without Ray). Subcommands: `python -m extract images ...` "
                                            "(InternVL image datasets), `python -m extract slide-embeddings ...` "
                                            "(slide encoders over a store's tile features).")
    p.add_argument("--cohort", required=True,
                   help="named cohort (configs/cohorts/NAME.yaml), a slide folder, a CSV or a GDC manifest; relative "
                        "paths inside a table are relative to the table's folder, not to the working directory")
    p.add_argument("--store", required=True, nargs="+",
                   help="store path or URL (file://, s3://); with several encoders, one holding {encoder} "
                        "(tcga-{encoder}.zarr) or one per encoder, in their order")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--encoder", help=ENCODERS_HELP)
    p.add_argument("--weights", help="hub id or local .safetensors for the encoder (several encoders: comma-separated, "
                                     "in their order)")
    p.add_argument("--mpp-override", type=float, help="µm/px for every slide, overriding metadata")
    p.add_argument("--tokens", help="also store pooled patch-token grids, e.g. 4x4")
    p.add_argument("--batch-size", type=int, help="tiles per encoder batch (default: the config's, else by device)")
    p.add_argument("--encoder-threads", type=int,
                   help="torch threads of a CPU encoder (default: every core of its node; readers share them)")
    p.add_bool("--retry-failed", default=None, help="retry slides recorded as failed")
    p.add_bool("--compile", default=None,
               help="torch.compile the encoder for its batch shape (compiles once at start; on a GPU ~15%% more "
                    "tiles/s, bench/RESULTS.md); recorded in the store's fingerprint")
    p.add_argument("--limit", type=int, help="extract at most N slides this run")
    p.add_argument("--num-encoders", type=int, help="encoder actors (default: one per GPU, else one per node)")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="ray: Ray tasks and actors (a local Ray, or the cluster of `ray job submit`); local: one "
                        "machine without Ray (readers in a process pool, encoders on threads: no Ray start-up, but "
                        "an encoder crash ends the run); auto (default): Ray under `ray job submit` (RAY_ADDRESS) or "
                        "with several GPUs, else local")
    p.add_argument("--qc-dir", help="where QC pictures go (default: STORE.qc beside a local store, e.g. "
                                    "tcga.zarr.qc; ./NAME.qc in the working directory for a remote one)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for the store (s3 credentials: prefer AWS_* variables)")
    p.add_bool("--no-qc", help="skip the QC pictures")
    return p


def build_images_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m extract images",
                                description="Encode the images of InternVL-format datasets (meta JSON + conversation "
                                            "jsonl) once into an images store of per-tile patch-token grids.")
    p.add_argument("--meta_path", required=True, help="InternVL meta JSON: {name: {root, annotation, ...}}")
    p.add_argument("--store", required=True, help="store path or URL")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--encoder", help=ENCODER_HELP)
    p.add_argument("--weights", help="hub id or local .safetensors for the encoder")
    p.add_argument("--tokens", help="pool each tile's patch grid to e.g. 8x8 (default: the full grid, 16x16)")
    p.add_argument("--max_dynamic_patch", type=int, default=6)
    p.add_argument("--min_dynamic_patch", type=int, default=1)
    p.add_bool("--use_thumbnail", default=True, help="add a thumbnail tile when an image has more than one tile")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-encoders", type=int, help="encoder actors (default: one per GPU, or one on CPU)")
    return p


def images_main(argv: Sequence[str]) -> int:
    args = build_images_parser().parse_args(argv)
    return guarded(lambda: _extract_images(args))


def _extract_images(args: argparse.Namespace) -> int:
    from extract.executors import executor_session
    from extract.image_worker import DynamicTiling, ImageEncoderWorker
    from extract.images import ImageExtraction, collect_images, image_encoder_config

    overrides = {"encoder": args.encoder, "weights": args.weights, "tokens": args.tokens,
                 "batch_size": args.batch_size, "num_encoders": args.num_encoders}
    cfg = image_encoder_config(ExtractConfig.for_command(args.config, overrides))
    tiling = DynamicTiling(args.min_dynamic_patch, args.max_dynamic_patch, args.use_thumbnail)
    entries = collect_images(args.meta_path)
    print(f"[images] {args.meta_path}: {len(entries)} distinct images; store {display_url(args.store)}; tiles of "
          f"{tiling.tile_px} px, {tiling.min_dynamic_patch}-{tiling.max_dynamic_patch} per image"
          f"{' + thumbnail' if tiling.use_thumbnail else ''}; token grids {cfg.tokens}", flush=True)
    with executor_session(cfg, Stages(worker=ImageEncoderWorker)) as executor:
        summary = ImageExtraction(entries, args.store, cfg, executor, tiling, log=lambda m: print(m, flush=True)).run()
    print(summary.table(), flush=True)
    return 1 if summary.failed else 0


SLIDE_EMBEDDINGS_HELP = (
    "Compute every slide's slide embedding (PRISM, TITAN, Prov-GigaPath's slide encoder) from the tile features a "
    "store already holds, never opening a slide file, and write them into that store as a named set with its own "
    "fingerprint; a rerun embeds only what is missing or whose tiles changed. A subcommand of its own, not an "
    "option of `python -m extract --cohort ...`: it reads a store, not slides, so it needs no cohort, reader or tile "
    "encoder.")


def build_slide_embeddings_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m extract slide-embeddings", description=SLIDE_EMBEDDINGS_HELP)
    p.add_argument("--store", required=True, help="the tile store (path or URL) whose features are read and into "
                                                  "which the slide embeddings are written")
    p.add_argument("--slide-encoder", required=True,
                   help=f"registry name (extract/slide_encoders/: {', '.join(SLIDE_ENCODERS)}, each with a "
                        "NAME-random twin); each reads one tile encoder's features, at its card's tile size")
    p.add_argument("--weights", help="hub id, local file or folder of the slide encoder's published weights "
                                     "(default: the registry's hub id, with HF_TOKEN)")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when visible, else the CPU), cpu, cuda, cuda:1")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto (default): fp16 autocast on CUDA, as TRIDENT runs these models, fp32 on the CPU; "
                        "recorded in the set's fingerprint")
    p.add_argument("--set", dest="set_name", metavar="NAME",
                   help="the set's name in the store (default: the slide encoder's name)")
    p.add_argument("--limit", type=int, help="embed at most N slides this run")
    p.add_bool("--retry-failed", help="retry slides that failed on the same tile rows before")
    p.add_bool("--any-tiling", help="embed tiles of another size or magnification than the slide encoder's card "
                                    "(refused otherwise)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options for the store (s3 credentials: prefer "
                                                             "AWS_* variables)")
    return p


def slide_embeddings_main(argv: Sequence[str]) -> int:
    args = build_slide_embeddings_parser().parse_args(argv)
    return guarded(lambda: _slide_embeddings(args))


def _slide_embeddings(args: argparse.Namespace) -> int:
    from extract.slide_embeddings import SlideEmbeddingJob

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    job = SlideEmbeddingJob(args.store, args.slide_encoder, args.weights, args.device, args.precision, args.set_name,
                            args.limit, args.retry_failed, args.any_tiling, storage_options(args.storage_options),
                            log=lambda m: print(m, flush=True))
    summary = job.run()
    print(summary.table(), flush=True)
    return 1 if summary.failed else 0


def encoder_stores(encoders: str | None, stores: list[str], weights: str | None) -> list[tuple[str, str | None, str | None]]:
    """(store, encoder, weights) per encoder of `--encoder a,b,c` (None: the config's encoder), from
    `--store` holding {encoder} or listing one store per encoder."""
    names: list[str | None] = [n.strip() for n in encoders.split(",")] if encoders else [None]
    if encoders and any(not n for n in names):
        raise ConfigError(f"--encoder {encoders!r}: an empty name; give registry names separated by commas")
    per_weights: list[str | None] = [w.strip() for w in weights.split(",")] if weights else [None] * len(names)
    if len(per_weights) != len(names):
        raise ConfigError(f"--weights gives {len(per_weights)} value(s) for {len(names)} encoders; give one per encoder, "
                          "comma-separated, in the order of --encoder")
    if len(stores) == 1 and len(names) > 1:
        if "{encoder}" not in stores[0]:
            raise ConfigError(f"--store {stores[0]}: {len(names)} encoders need one store each; put {{encoder}} in the "
                              "store's name (tcga-{encoder}.zarr) or list one store per encoder")
        stores = [stores[0].replace("{encoder}", str(name)) for name in names]
    elif len(stores) != len(names):
        raise ConfigError(f"--store lists {len(stores)} stores for {len(names)} encoder(s); give one per encoder, "
                          "or one holding {encoder}")
    return list(zip(stores, names, per_weights))


def main(argv: Sequence[str] | None = None, stages: Stages = Stages()) -> int:
    """`python -m extract ARGS`; `stages` are the executor's stand-ins (tests give crashing ones)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["images"]:
        return images_main(argv[1:])
    if argv[:1] == ["slide-embeddings"]:
        return slide_embeddings_main(argv[1:])
    args = build_parser().parse_args(argv)
    return guarded(lambda: _extract(args, stages))


def _extract(args: argparse.Namespace, stages: Stages) -> int:
    from extract.executors import executor_session
    from extract.job import Extraction
    from extract.qc import default_qc_dir, write_qc

    overrides = {"mpp_override": args.mpp_override,
                 "tokens": args.tokens, "batch_size": args.batch_size, "retry_failed": args.retry_failed,
                 "encoder_threads": args.encoder_threads,
                 "limit": args.limit, "num_encoders": args.num_encoders, "qc_dir": args.qc_dir,
                 "executor": args.executor, "compile": args.compile}
    stores = [(store, ExtractConfig.for_command(args.config, {**overrides, "encoder": name, "weights": weights}))
              for store, name, weights in encoder_stores(args.encoder, args.store, args.weights)]
    cfg = stores[0][1]
    options = storage_options(args.storage_options)
    entries = resolve_cohort(args.cohort)
    shown = ", ".join(display_url(url) for url, _ in stores)
    print(f"[extract] cohort {args.cohort}: {len(entries)} slides; store{'s' * (len(stores) > 1)} {shown}", flush=True)
    with executor_session(cfg, stages) as executor:
        extraction = Extraction(entries, stores, options, log=lambda m: print(m, flush=True), executor=executor)
        summary = extraction.run()
    print(summary.table(), flush=True)
    if not args.no_qc:
        for target in extraction.targets:
            qc_dir = default_qc_dir(target.url) if not cfg.qc_dir else (
                str(Path(cfg.qc_dir) / target.label) if target.label else cfg.qc_dir)
            report = write_qc(target.url, qc_dir, summary.for_store(target.label), storage_options=options)
            print(f"[extract] QC pictures and cohort summary{f' ({target.label})' * bool(target.label)}: {report}",
                  flush=True)
    return 1 if summary.failed else 0

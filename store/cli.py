"""`python -m store info|verify|failures|export-h5|import-h5|export-slide-h5|import-slide-h5|rm|
rm-slide-embeddings|merge`: thin commands over the library."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from slidecache.cli_args import ArgumentParser, run_command, storage_options
from store.backends import display_url
from store.embedding_store import EmbeddingStore
from store.h5io import export_h5, import_h5_files
from store.merge_stores import merge_stores
from store.slide_h5io import export_slide_h5, import_slide_h5
from store.verify import SET_PROBLEM, verify_store


def _storage_options(args: argparse.Namespace) -> dict[str, Any]:
    return storage_options(args.storage_options)


def _open(args: argparse.Namespace, url: str, mode: str = "r") -> EmbeddingStore:
    return EmbeddingStore.open(url, mode=mode, storage_options=_storage_options(args))


def cmd_info(args: argparse.Namespace) -> int:
    store = _open(args, args.store)
    if args.slide:
        slide = store.slide(args.slide)
        print(json.dumps({"slide_id": slide.slide_id, "arrays": slide.array_names(), **slide.attrs}, indent=2, default=str))
        return 0
    states = store.slide_states()
    complete = sorted(s for s, ok in states.items() if ok)
    tiles = sum(store.slide(s).n_tiles for s in complete)
    spec = store.spec
    print(f"store        {display_url(store.url)}")
    print(f"kind         {store.kind}{'  (imported)' if store.imported else ''}")
    print(f"fingerprint  {store.fingerprint}")
    print(f"encoder      {json.dumps(spec.get('encoder', {}), default=str)}")
    print(f"tiling       {json.dumps(spec.get('tiling', {}), default=str)}")
    print(f"created      {store.provenance.get('created_at')} by {store.provenance.get('code_version')}")
    print(f"slides       {len(complete)} complete, {len(states) - len(complete)} incomplete, "
          f"{len(store.failures())} failed; {tiles} tiles")
    for name, emb_set in store.slide_embedding_sets().items():
        entries, stale = emb_set.entries(), emb_set.stale()
        encoder = emb_set.slide_encoder
        print(f"slide embeddings {name}: {encoder.get('name')} ({encoder.get('weights_id')}), {emb_set.dim}-d, "
              f"{len(entries) - len(stale)} slides, {len(stale)} stale, {len(emb_set.failures())} failed"
              f"{'  (imported)' if emb_set.imported else ''}; fingerprint {emb_set.fingerprint}")
    if args.list:
        for slide_id in complete:
            s = store.slide(slide_id)
            print(f"  {slide_id}\t{s.patient_id}\t{s.n_tiles} tiles" + (f"\t({s.attrs['empty_reason']})" if not s.n_tiles else ""))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open(args, args.store)
    problems = verify_store(store)
    for problem in problems:
        print(problem)
    errors = [p for p in problems if p.severity == "error"]
    in_sets = [p for p in problems if p.message.startswith(SET_PROBLEM)]
    set_errors = sum(p.severity == "error" for p in in_sets)
    print(f"verified {len(store.slide_ids())} slides: {len(errors) - set_errors} errors, "
          f"{len(problems) - len(errors) - (len(in_sets) - set_errors)} warnings")
    sets = store.slide_embedding_sets()
    if sets:
        counted = ", ".join(f"{name} ({len(s.entries())} embeddings)" for name, s in sets.items())
        print(f"verified slide-embedding sets {counted}: {set_errors} errors, {len(in_sets) - set_errors} warnings")
    return 1 if errors else 0


def cmd_failures(args: argparse.Namespace) -> int:
    failures = _open(args, args.store).failures()
    if args.json:
        print(json.dumps(failures, indent=2))
        return 0
    for slide_id, record in sorted(failures.items()):
        print(f"{slide_id}\t{record.get('error_class')}\tattempts={record.get('attempts')}\t{record.get('message')}")
    print(f"{len(failures)} failed slides")
    return 0


def cmd_export_h5(args: argparse.Namespace) -> int:
    store = _open(args, args.store)
    written = export_h5(store, args.out_dir, args.slide or None)
    print(f"wrote {len(written)} .h5 files to {args.out_dir}")
    return 0


def cmd_import_h5(args: argparse.Namespace) -> int:
    """Good files are imported, bad ones listed at the end; exit 1 when any was refused, as extraction does."""
    report = import_h5_files(args.in_dir, args.store, args.encoder, storage_options=_storage_options(args))
    if report.store is not None:
        print(f"imported {len(report.imported)} slides into {display_url(report.store.url)} "
              "(fields the .h5 cannot supply are marked unknown)")
    else:
        print(f"imported 0 slides: nothing written to {display_url(args.store)}")
    for _, message in report.refused:
        print(f"refused: {message}", file=sys.stderr)
    if report.refused:
        print(f"{len(report.refused)} of {len(report.refused) + len(report.imported)} .h5 files refused (listed "
              "above); nothing of them was written: fix them and rerun", file=sys.stderr)
    return 1 if report.refused else 0


def cmd_export_slide_h5(args: argparse.Namespace) -> int:
    folder, written = export_slide_h5(_open(args, args.store), args.out_dir, args.set_name)
    print(f"wrote {len(written)} slide-embedding .h5 files to {folder}")
    return 0


def cmd_import_slide_h5(args: argparse.Namespace) -> int:
    """Good files are imported, bad ones listed at the end; exit 1 when any was refused, as import-h5 does."""
    report = import_slide_h5(args.in_dir, args.store, args.slide_encoder, args.set_name,
                             storage_options=_storage_options(args))
    where = f"set {report.set.name} of {display_url(args.store)}" if report.set else display_url(args.store)
    print(f"imported {len(report.imported)} slide embeddings from {report.folder} into {where}"
          f"{'' if report.set else ': nothing written'}; {len(report.skipped)} files without one")
    for _, message in report.refused:
        print(f"refused: {message}", file=sys.stderr)
    if report.refused:
        print(f"{len(report.refused)} .h5 files refused (listed above); nothing of them was written: fix them and "
              "rerun", file=sys.stderr)
    return 1 if report.refused else 0


def cmd_rm_slide_embeddings(args: argparse.Namespace) -> int:
    store = _open(args, args.store, mode="a")
    if not store.delete_slide_embedding_set(args.name):
        print(f"no slide-embedding set {args.name!r} in {display_url(store.url)} (sets: "
              f"{', '.join(store.slide_embedding_sets()) or 'none'})", file=sys.stderr)
        return 1
    print(f"removed slide-embedding set {args.name}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _open(args, args.store, mode="a")
    missing = [s for s in args.slide_ids if not store.delete_slide(s, force=args.force)]
    for slide_id in missing:
        print(f"not in store: {slide_id}", file=sys.stderr)
    print(f"removed {len(args.slide_ids) - len(missing)} slides")
    return 1 if missing else 0


def cmd_merge(args: argparse.Namespace) -> int:
    sources = [_open(args, url) for url in args.sources]
    report = merge_stores(sources, args.dest, storage_options=_storage_options(args))
    print(f"copied {len(report.copied)} slides into {display_url(args.dest)}; "
          f"{len(report.already_present)} already there; {len(report.duplicates)} duplicates kept from the first source")
    for slide_id in report.duplicates:
        print(f"  duplicate: {slide_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-options", metavar="JSON",
                        help="fsspec storage options as JSON (s3 credentials are better taken from AWS_* variables)")
    parser = ArgumentParser(prog="python -m store", description="Inspect and maintain a slidecache embedding store.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("info", cmd_info, "Summarise a store, or one slide with --slide.")
    p.add_argument("store", help="path or URL (file://, s3://, memory://)")
    p.add_argument("--slide", help="show this slide's attributes")
    p.add_bool("--list", help="list every complete slide")
    p = add("verify", cmd_verify, "Check shapes, dtypes, NaN/Inf, commit markers and fingerprints; exit 1 on errors.")
    p.add_argument("store")
    p = add("failures", cmd_failures, "List slides whose extraction failed, with the error and attempt count.")
    p.add_argument("store")
    p.add_bool("--json", help="print the full records as JSON")
    p = add("export-h5", cmd_export_h5, "Write TRIDENT/CLAM-style per-slide .h5 files (features, coords).")
    p.add_argument("store")
    p.add_argument("out_dir")
    p.add_argument("--slide", action="append", help="only this slide (repeatable)")
    p = add("import-h5", cmd_import_h5, "Import a folder of TRIDENT/CLAM .h5 files into a store.")
    p.add_argument("in_dir")
    p.add_argument("store")
    p.add_argument("--encoder", required=True,
                   help="name of the encoder that made the features (recorded; a registered encoder's width is checked)")
    p = add("export-slide-h5", cmd_export_slide_h5,
            "Write a slide-embedding set as TRIDENT does: DIR/slide_features_<encoder>/<slide_id>.h5.")
    p.add_argument("store")
    p.add_argument("out_dir")
    p.add_argument("--set", dest="set_name", metavar="NAME", help="the set (default: the store's only set)")
    p = add("import-slide-h5", cmd_import_slide_h5,
            "Import TRIDENT slide embeddings (DIR/slide_features_<encoder>/ or that folder) into a set of the store "
            "holding their tile features.")
    p.add_argument("in_dir")
    p.add_argument("store")
    p.add_argument("--slide-encoder", required=True,
                   help="the slide encoder that made them (a registered one's width and tile encoder are checked)")
    p.add_argument("--set", dest="set_name", metavar="NAME", help="the set's name (default: the slide encoder's)")
    p = add("rm-slide-embeddings", cmd_rm_slide_embeddings, "Remove a slide-embedding set from a store.")
    p.add_argument("store")
    p.add_argument("name", metavar="NAME")
    p = add("rm", cmd_rm, "Remove slides (complete or interrupted) and their failure records.")
    p.add_argument("store")
    p.add_argument("slide_ids", nargs="+", metavar="ID")
    p.add_bool("--force", help="also remove slides a live writer is writing (it stops at its next append)")
    p = add("merge", cmd_merge, "Copy the complete slides of stores with one fingerprint into DEST.")
    p.add_argument("sources", nargs="+", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)

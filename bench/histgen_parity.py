"""Our HistGen protocol beside HistGen's own tokenizer and metric code, on the same predictions.

HistGen (dddavid4real/HistGen) is used unmodified from a source folder outside the repository, as the TRIDENT
bench does (its source is public; `fetch` it, or clone it, and pass the folder). Its code runs in a process
of its own: `modules/tokenizers.py` (the `wsi_report` cleaning and vocabulary), the tester's reference
decoding (ids cut at max_seq_length, the start token dropped, decoded up to the first 0) applied to
references and predictions alike, and `modules/metrics.compute_scores` with their vendored pycocoevalcap.
Two things let that code run without editing it: its tokenizer module annotates with `List`, `Optional`
and `torch` it never imports (they are put in builtins first); and where their checkout lacks METEOR's
jar or paraphrase table (large files some snapshots omit), the same files of the pip pycocoevalcap
(METEOR 1.5 both) are placed beside their copy in a scratch folder; their source folder is not touched.

    python bench/histgen_parity.py --histgen-src DIR --annotation ann.json --predictions gen.jsonl [--json out]

Prints both sets of scores and the largest difference; exits 1 when it exceeds 1e-6.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

THEIRS = r"""
import builtins, json, sys, typing
from types import SimpleNamespace
import torch
builtins.List, builtins.Optional, builtins.torch = typing.List, typing.Optional, torch
src, annotation, predictions, threshold, max_len = sys.argv[1:6]
sys.path.insert(0, src)
from modules.tokenizers import Tokenizer
from modules.metrics import compute_scores
tokenizer = Tokenizer(SimpleNamespace(ann_path=annotation, threshold=int(threshold), dataset_name="wsi_report"))
def as_tested(text):
    return tokenizer.decode(tokenizer(text)[: int(max_len)][1:])
refs = {e["id"]: e["report"] for e in json.load(open(annotation))["test"]}
preds = [json.loads(line) for line in open(predictions) if line.strip()]
gts = {i: [as_tested(refs[p["id"]])] for i, p in enumerate(preds)}
res = {i: [as_tested(p["text"])] for i, p in enumerate(preds)}
print(json.dumps({"scores": compute_scores(gts, res), "scored": [res[i][0] for i in range(len(preds))],
                  "references": [gts[i][0] for i in range(len(preds))]}))
"""
NAMES = {"BLEU_1": "BLEU-1", "BLEU_2": "BLEU-2", "BLEU_3": "BLEU-3", "BLEU_4": "BLEU-4", "METEOR": "METEOR",
         "ROUGE_L": "ROUGE-L"}


METEOR_FILES = ("meteor/meteor-1.5.jar", "meteor/data/paraphrase-en.gz")


def runnable_copy(histgen_src: Path, scratch: Path) -> Path:
    """Their modules/ and pycocoevalcap/ copied to `scratch`, METEOR's data files filled in where absent."""
    for folder in ("modules", "pycocoevalcap"):
        if not (histgen_src / folder).is_dir():
            raise SystemExit(f"{histgen_src} has no {folder}/: give a checkout of dddavid4real/HistGen")
        shutil.copytree(histgen_src / folder, scratch / folder, ignore=shutil.ignore_patterns("__pycache__"))
    import pycocoevalcap

    pip_copy = Path(list(pycocoevalcap.__path__)[0])  # a namespace package: no __file__
    for name in METEOR_FILES:
        target = scratch / "pycocoevalcap" / name
        if not target.is_file() or target.stat().st_size < 1024:  # absent, or a Git LFS pointer
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(pip_copy / name, target)
    return scratch


def theirs(histgen_src: Path, annotation: Path, predictions: Path, threshold: int, max_len: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="histgen-") as scratch:
        run = subprocess.run([sys.executable, "-c", THEIRS, str(runnable_copy(histgen_src, Path(scratch))),
                              str(annotation), str(predictions), str(threshold), str(max_len)],
                             capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise SystemExit(f"HistGen's code failed:\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout.strip().splitlines()[-1])
    return out | {"scores": {NAMES[k]: float(v) for k, v in out["scores"].items()}}


def ours(annotation: Path, predictions: Path, threshold: int, max_len: int) -> dict:
    from evaluate.histgen_protocol import Vocabulary, histgen_scores
    from evaluate.report_inputs import read_reference_sets
    from slidecache.errors import EvaluationError
    from slidecache.jsonl import read_jsonl

    refs = read_reference_sets(annotation)
    vocabulary = Vocabulary.from_training([r.text for r in refs.values() if r.split == "train"], threshold, max_len)
    rows = [row for _, row in read_jsonl(predictions, EvaluationError)]
    scored = [vocabulary.as_scored(r["text"]) for r in rows]
    # keyed by line, as theirs: a file may predict one slide twice
    scores = histgen_scores({str(i): r["text"] for i, r in enumerate(rows)},
                            {str(i): refs[r["id"]].text for i, r in enumerate(rows)}, vocabulary)
    return {"scores": scores, "scored": scored, "references": [vocabulary.as_scored(refs[r["id"]].text) for r in rows]}


def compare(histgen_src: Path, annotation: Path, predictions: Path, threshold: int = 10, max_len: int = 100) -> dict:
    a, b = ours(annotation, predictions, threshold, max_len), theirs(histgen_src, annotation, predictions, threshold, max_len)
    differing = [i for i, (x, y) in enumerate(zip(a["scored"] + a["references"], b["scored"] + b["references"])) if x != y]
    return {"ours": a["scores"], "histgen": b["scores"], "strings_differing": len(differing),
            "first_difference": None if not differing else {"ours": (a["scored"] + a["references"])[differing[0]],
                                                            "histgen": (b["scored"] + b["references"])[differing[0]]},
            "max_abs_difference": max(abs(a["scores"][k] - b["scores"][k]) for k in b["scores"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--histgen-src", type=Path, required=True, help="HistGen's source folder (holds modules/)")
    p.add_argument("--annotation", type=Path, required=True, help="HistGen annotation JSON (train reports, test refs)")
    p.add_argument("--predictions", type=Path, required=True, help="jsonl of {id, text} for test slides")
    p.add_argument("--threshold", type=int, default=10)
    p.add_argument("--max-seq-length", type=int, default=100)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not (args.histgen_src / "modules" / "tokenizers.py").is_file():
        raise SystemExit(f"{args.histgen_src} is not HistGen's source (no modules/tokenizers.py)")
    result = compare(args.histgen_src, args.annotation, args.predictions, args.threshold, args.max_seq_length)
    for name in result["histgen"]:
        print(f"  {name:<8} ours {result['ours'][name]:.8f}  HistGen {result['histgen'][name]:.8f}")
    print(f"largest difference {result['max_abs_difference']:.2e}; {result['strings_differing']} scored strings differ"
          + (f", first: {result['first_difference']}" if result["first_difference"] else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["max_abs_difference"] <= 1e-6 and not result["strings_differing"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does the reporter read the slide? Held-out stated grade, stated risk and the grounding check, over seeds
and cohort sizes, before and after issue 26, side by side in one run.

    python bench/reporter_bench.py [--patients 80 160] [--seeds 0 1 2] [--variants before after]
        [--llm tiny-qwen2|qwen2-0.5b-random] [--max-steps N] [--work bench_reporter] [--json OUT] [--prepare-only]

Each cohort is the demo's (demo/cohort.py: a latent risk sets each patient's nuclear density, grade and
hazard), written and extracted once with virchow2-tiny into WORK/cohort-N (reused when present: carry that
folder to a GPU machine, which lacks Ray and the slide readers), split into 5 patient folds; fold 0 is held
out, as in the demo. Variants, each trained from the same store:
- after: the shipped recipe of the LLM (configs/train/tiny.yaml or qwen2-0.5b-random.yaml) at its own
  settings: tiles standardised with the training folds' statistics, output layer and embeddings trained,
  three prognosis groups;
- before: what 6d1c6ce ran in the demo: raw tiles, LoRA alone on a frozen output layer, 8 epochs at a
  constant rate, two prognosis groups, tiny-qwen2 drawn with Qwen2's init std 0.02.
Per run: the share of held-out reports stating a grade, stated-grade accuracy and QWK, the stated-risk
Harrell's C, and the grounding check (each report regenerated with another held-out patient's slide of
another grade, and with blank tiles): the share stating the donor's grade, and the verdict. Then the mean
and range over seeds per cohort and variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train.llm as llm_module  # noqa: E402
from evaluate.grounding import grounding_check  # noqa: E402
from evaluate.report_metrics import clinical_correctness, stated_risk_concordance  # noqa: E402
from slidecache.cohorts.clinical import load_clinical  # noqa: E402
from slidecache.provenance import provenance  # noqa: E402
from store import EmbeddingStore  # noqa: E402
from train.annotations import training_patients, write_annotations, write_meta  # noqa: E402
from train.config import parse_args  # noqa: E402
from train.generation import generate_reports  # noqa: E402
from train.run import train  # noqa: E402

HELD_OUT = 0
RECIPES = {"tiny-qwen2": "tiny.yaml", "qwen2-0.5b-random": "qwen2-0.5b-random.yaml"}
BEFORE_FLAGS = ["--standardize_tiles", "False", "--unfreeze_lm_head", "False", "--num_train_epochs", "8",
                "--lr_scheduler_type", "constant"]
METRICS = ("grade_stated", "grade_accuracy", "grade_qwk", "stated_risk_c", "donor_grade", "own_grade_swapped")


def prepare(work: Path, patients: int) -> Path:
    """The demo's cohort of `patients`, extracted and split (demo.pipeline, training off), its slides, QC pictures
    and .h5 exports then removed; reused when present."""
    out = work / f"cohort-{patients}"
    if (out / "store.zarr").is_dir() and (out / "splits.csv").is_file():
        return out
    from demo.cohort import DemoSize
    from demo.pipeline import DemoSettings, run

    run(out, DemoSettings(size=DemoSize(patients=patients), train=False), log=lambda m: None)
    for folder in ("slides", "qc", "h5"):  # only what training reads stays: ~35 MB to carry to a GPU, not ~120
        shutil.rmtree(out / folder, ignore_errors=True)
    return out


def one_run(cohort: Path, llm: str, variant: str, seed: int, max_steps: int | None) -> dict[str, Any]:
    levels = 3 if variant == "after" else 2
    store, clinical = str(cohort / "store.zarr"), load_clinical(cohort / "clinical.csv")
    annotations = cohort / f"annotations_{levels}groups.jsonl"
    write_annotations(EmbeddingStore.open(store), clinical, annotations, "OS", cohort / "report_texts.jsonl",
                      training_patients(cohort / "splits.csv", HELD_OUT), levels)
    meta = write_meta(cohort / f"meta_{levels}groups.json", annotations)
    run_dir = cohort / "runs" / f"{llm}-{variant}-seed{seed}"
    flags = ["--config", RECIPES[llm], "--meta_path", str(meta), "--store", store, "--output_dir", str(run_dir),
             "--split", str(cohort / "splits.csv"), "--fold", str(HELD_OUT), "--seed", str(seed), "--report_to", "none",
             "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "50"]
    flags += BEFORE_FLAGS if variant == "before" else []
    flags += ["--max_steps", str(max_steps)] if max_steps else []
    started = time.perf_counter()
    summary = train(*parse_args(flags)).summary
    train_seconds = time.perf_counter() - started
    generated = run_dir / "reports_heldout.jsonl"
    generate_reports(str(run_dir), store, str(meta), generated, str(cohort / "splits.csv"), HELD_OUT, max_new_tokens=48)
    rows = [json.loads(line) for line in generated.read_text().splitlines()]
    predictions = {r["id"]: r["text"] for r in rows}
    correctness = clinical_correctness(predictions, {r["id"]: [r["reference"]] for r in rows})
    risk = stated_risk_concordance(predictions, clinical, "OS", {r["id"]: r["patient_id"] for r in rows})
    grounding = grounding_check(str(run_dir), store, generated, annotations, seed=0, max_new_tokens=48)
    return {"llm": llm, "variant": variant, "seed": seed, "patients": int(cohort.name.split("-")[1]),
            "held_out_reports": len(rows), "steps": summary["steps"], "train_seconds": round(train_seconds, 1),
            "grade_stated": correctness.get("grade_stated_rate"), "grade_accuracy": correctness.get("grade_accuracy"),
            "grade_qwk": correctness.get("grade_qwk"), "stated_risk_c": risk.get("stated_risk_harrell_c"),
            "donor_grade": grounding.scores["swapped"]["agrees_with_donor_grade"],
            "own_grade_swapped": grounding.scores["swapped"]["agrees_with_own_grade"],
            "text_changed_swapped": grounding.scores["swapped"]["text_changed"], "verdict": grounding.verdict,
            "distinct_reports": grounding.scores["original"]["distinct_texts"], "examples": rows[:3]}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["patients"], r["llm"], r["variant"]), []).append(r)
    out = []
    for (patients, llm, variant), runs in sorted(groups.items()):
        row: dict[str, Any] = {"patients": patients, "llm": llm, "variant": variant, "seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            values = [r[metric] for r in runs if r[metric] is not None]
            row[metric] = ({"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values)),
                            "defined_in": len(values)} if values else None)
        row["verdicts"] = [r["verdict"] for r in runs]
        out.append(row)
    return out


def _fmt(cell: dict | None) -> str:
    return "n/a" if cell is None else f"{cell['mean']:.2f} [{cell['min']:.2f}, {cell['max']:.2f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, nargs="+", default=[80, 160])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["before", "after"], choices=["before", "after"])
    parser.add_argument("--llm", default="tiny-qwen2", choices=sorted(RECIPES))
    parser.add_argument("--max-steps", type=int, help="stop each training after this many steps (the recipe's epochs "
                                                       "otherwise)")
    parser.add_argument("--work", type=Path, default=Path("bench_reporter"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--prepare-only", action="store_true", help="write and extract the cohorts, then stop")
    args = parser.parse_args()
    cohorts = [prepare(args.work, n) for n in args.patients]
    if args.prepare_only:
        print("prepared: " + ", ".join(str(c) for c in cohorts))
        return 0
    results = []
    for cohort in cohorts:
        for variant in args.variants:
            for seed in args.seeds:
                # "before" rebuilds tiny-qwen2 as 6d1c6ce drew it (init std 0.02); the run records what it used
                llm_module.STAND_IN_CONFIGS.update(llm_module.LEGACY_STAND_IN_CONFIGS if variant == "before" else
                                                   {llm_module.TINY_QWEN2: llm_module.TINY_CONFIG})
                result = one_run(cohort, args.llm, variant, seed, args.max_steps)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
    summary = summarise(results)
    print(f"\n{'patients':>8} {'variant':<7} {'states grade':<19} {'grade acc':<19} {'grade QWK':<19} "
          f"{'stated-risk C':<19} {'donor grade (swap)':<19} verdicts")
    for row in summary:
        print(f"{row['patients']:>8} {row['variant']:<7} " + " ".join(f"{_fmt(row[m]):<19}" for m in METRICS[:5])
              + " " + ", ".join(row["verdicts"]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"bench": "reporter", "machine": platform.platform(), "device": device,
              "summary": summary, "runs": results, "provenance": provenance(vars(args))}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

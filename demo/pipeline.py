"""The main job end to end on embedded defaults: slides → store → trained reporter → reports → metrics.

1. a synthetic cohort with a planted signal (demo/cohort.py: nuclear density sets grade and hazard);
2. extraction with `virchow2-tiny` on a local Ray into a local Zarr store (a rerun skips complete slides);
   verify, TRIDENT .h5 export, QC pictures;
3. a patient-level split; report annotations from the clinical table and report texts;
4. training the projector + LoRA on `tiny-qwen2` (random weights, the real Qwen2 tokenizer; its output
   layer and embeddings train too, as a random LLM must learn the report's words) on the training folds,
   from the cache, on tiles standardised with the training folds' statistics; report generation for the
   held-out fold;
5. cross-validated survival (Coxnet) and grade (logistic regression) heads from the cache, the generated
   reports scored on held-out patients only, and the grounding check: the held-out reports regenerated
   with another patient's slide and with blank tiles, to show the stated grade follows the slide;
6. an HTML summary. Both default models are random-weight stand-ins, and every output says so.

With `--encoder virchow2 --weights W --llm_path L` the same pipeline runs the real models: extraction then
takes configs/extract/virchow2.yaml and training configs/train/internvl2-1b-lora.yaml (InternVL2-1B's
LoRA recipe), with the demo's epochs and tile budget.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from demo.cohort import SEED, DemoSize, plan_patients, write_clinical, write_report_texts, write_slides
from demo.summary import write_summary
from extract.config import ExtractConfig
from extract.job import Extraction
from extract.qc import write_qc
from extract.ray_executor import lazy_ray_session
from extract.summary import SlideStatus
from slidecache import json_out
from slidecache.cohorts.slides import load_cohort
from slidecache.configs import shipped
from slidecache.errors import PipelineError
from slidecache.provenance import provenance
from store import EmbeddingStore
from store.h5io import export_h5
from store.verify import verify_store

TINY_ENCODER, TINY_LLM, QWEN2_05B_RANDOM = "virchow2-tiny", "tiny-qwen2", "qwen2-0.5b-random"
TINY_ENCODER_LABEL = "virchow2-tiny (random weights: a stand-in for Virchow-2; its embeddings carry no pathology)"
TINY_LLM_LABEL = ("tiny-qwen2 (random weights, 2 layers, the real Qwen2 tokenizer: a stand-in for Qwen2-0.5B-Instruct; "
                  "its output layer and embeddings train with the projector and LoRA, as a random LLM knows no words)")
HELD_OUT_FOLD = 0
GENERATED_TOKENS = 48  # the demo's reports are ~30 tokens
EVALUATION_VERSION = 2  # what the evaluation computes (2: + the grounding check); part of its reuse digest


@dataclass(frozen=True)
class DemoSettings:
    size: DemoSize = DemoSize()
    folds: int = 5
    train_epochs: int | None = None  # None: the stand-in recipe's own (tiny.yaml: 24), 8 with real weights
    max_tiles: int = 32
    encoder: str = "virchow2-tiny"
    weights: str | None = None  # the encoder's hub id or local .safetensors (None: the registry's default)
    llm_path: str = "tiny-qwen2"
    train: bool = True
    extra_train_flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def real_encoder(self) -> bool:
        return self.encoder != TINY_ENCODER

    @property
    def real_llm(self) -> bool:
        return self.llm_path != TINY_LLM

    def encoder_label(self) -> str:
        if not self.real_encoder:
            return TINY_ENCODER_LABEL
        return f"{self.encoder} (weights: {self.weights or 'the registry default'})"

    def llm_label(self) -> str:
        if not self.real_llm:
            return TINY_LLM_LABEL
        if self.llm_path == QWEN2_05B_RANDOM:
            return f"{QWEN2_05B_RANDOM} (Qwen2-0.5B's architecture, random weights) + LoRA, output layer trained"
        return f"{self.llm_path} + LoRA (InternVL2-1B recipe)"

    def extract_config(self) -> ExtractConfig:
        if not self.real_encoder:
            return ExtractConfig.from_yaml(shipped("extract", "virchow2-tiny.yaml"))
        return ExtractConfig.from_yaml(shipped("extract", "virchow2.yaml"),
                                       {"encoder": self.encoder, "weights": self.weights})

    def epochs(self) -> int | None:
        """Epochs to ask for over the recipe's: InternVL2-1B's LoRA recipe runs 1 epoch of a large dataset, too few
        for the demo's 80 reports; a stand-in's recipe was measured on this very cohort (bench/reporter_bench.py)."""
        if self.train_epochs is not None:
            return self.train_epochs
        return None if self.llm_path in (TINY_LLM, QWEN2_05B_RANDOM) else 8

    def train_config(self) -> str:
        """A random stand-in trains with its own recipe (its output layer too: it knows no words); real
        weights with InternVL2-1B's LoRA recipe."""
        return {TINY_LLM: "tiny.yaml", QWEN2_05B_RANDOM: "qwen2-0.5b-random.yaml"}.get(self.llm_path,
                                                                                      "internvl2-1b-lora.yaml")


def extract(out: Path, cohort: Path, settings: DemoSettings, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = settings.extract_config()
    store_url = str(out / "store.zarr")
    entries = load_cohort(cohort)
    with lazy_ray_session(cfg) as executor:  # a rerun with every slide in the store starts no Ray
        summary = Extraction(entries, [(store_url, cfg)], log=log, executor=executor).run()
    log(summary.table())
    store = EmbeddingStore.open(store_url)
    if not {e.slide_id for e in entries} & set(store.slide_ids()):
        first = "; ".join(f"{o.slide_id}: {o.error}" for o in summary.failed[:3])
        raise PipelineError(f"all {len(entries)} slides of {cohort} failed to extract, so nothing can be trained or "
                            f"evaluated; first errors: {first} (every failure: python -m store failures {store_url})")
    skipped = summary.count(SlideStatus.SKIPPED)
    if skipped and not summary.count(SlideStatus.DONE):
        log(f"[demo] extraction: all {skipped} slides already in the store: nothing encoded (the cache is reused)")
    return {"store": store_url, "extract_config": cfg.to_dict(), "slides_in_store": len(store.slide_ids()),
            "extracted_now": summary.count(SlideStatus.DONE) + summary.count(SlideStatus.EMPTY),
            "skipped_complete": skipped,
            "failed": [o.slide_id for o in summary.failed],
            "tiles_in_store": sum(store.slide(s).n_tiles for s in store.slide_ids()),
            "verify_problems": [str(p) for p in verify_store(store)], "h5_files": len(export_h5(store, out / "h5")),
            "qc_summary": str(write_qc(store_url, out / "qc", summary))}


def make_split(out: Path, store_url: str, clinical: Path, folds: int) -> tuple[Path, Any]:
    from evaluate.cohort import CohortSettings, open_patients
    from slidecache.cohorts.splits import write_split

    cohort = CohortSettings((str(clinical),), folds=folds, seed=SEED)
    _, data = open_patients(store_url, cohort)
    return write_split(out / "splits.csv", cohort.folds_of(data, "OS")), data


def train_and_generate(out: Path, store_url: str, clinical: Path, texts: Path, split: Path, settings: DemoSettings,
                       log: Callable[[str], None]) -> dict[str, Any]:
    from slidecache.cohorts.clinical import load_clinical
    from train.annotations import training_patients, write_annotations, write_meta
    from train.config import build_args
    from train.generation import generate_reports
    from train.run import train

    annotations = out / "annotations.jsonl"
    counts = write_annotations(EmbeddingStore.open(store_url), load_clinical(clinical), annotations, "OS", texts,
                               training_patients(split, HELD_OUT_FOLD))
    meta = write_meta(out / "meta.json", annotations)
    run_dir = out / "train"
    generated = out / "reports_heldout.jsonl"
    parsed = build_args(settings.train_config(), settings.extra_train_flags, llm_path=settings.llm_path,
                        meta_path=str(meta), store=store_url, output_dir=str(run_dir), split=str(split),
                        fold=HELD_OUT_FOLD, num_train_epochs=settings.epochs(), max_tiles=settings.max_tiles,
                        report_to="tensorboard", save_strategy="no", logging_steps=10)
    reused = _finished_run_of(run_dir, *parsed)
    if reused:
        log(f"[demo] training: {run_dir} already holds a finished run: reused")
        summary = json.loads((run_dir / "train_summary.json").read_text())
    else:
        log(f"[demo] training {settings.llm_label()} + projector + LoRA on the training folds, from the cache")
        summary = train(*parsed).summary
    if reused and generated.is_file() and generated.stat().st_mtime >= (run_dir / "trainable.safetensors").stat().st_mtime:
        log(f"[demo] reports: {generated} was generated by this run's model: reused")
    else:
        log(f"[demo] generating reports for the held-out fold {HELD_OUT_FOLD}")
        generate_reports(str(run_dir), store_url, str(meta), generated, str(split), HELD_OUT_FOLD, batch_size=8,
                         max_new_tokens=GENERATED_TOKENS)
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    return {"annotations": str(annotations), "annotation_counts": counts, "train_dir": str(run_dir),
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "generated": str(generated)}


TRAINING_KEYS = ("seed", "num_train_epochs", "max_steps", "learning_rate", "lr_scheduler_type", "weight_decay",
                 "warmup_steps", "per_device_train_batch_size", "gradient_accumulation_steps")


def _finished_run_of(run_dir: Path, model_args: Any, data_args: Any, training_args: Any) -> bool:
    """Whether `run_dir` holds a finished run of exactly these settings (the model and data arguments, the training
    schedule), so a rerun reuses it; a run of other settings (another recipe, an older version's) is trained again."""
    try:
        recorded = json.loads((run_dir / "run_manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        return False
    if not ((run_dir / "train_summary.json").is_file() and (run_dir / "trainable.safetensors").is_file()):
        return False
    same = lambda value: json.loads(json.dumps(value, default=str))  # noqa: E731  (as the manifest wrote them)
    training = training_args.to_dict()
    return (recorded.get("model") == same(asdict(model_args)) and recorded.get("data") == same(asdict(data_args))
            and all(recorded.get("training", {}).get(k) == same(training.get(k)) for k in TRAINING_KEYS))


def evaluate_all(out: Path, data: Any, split: Path, clinical: Path, annotations: str, generated: str,
                 log: Callable[[str], None] = print, train_dir: str | None = None) -> dict[str, Any]:
    """Survival and grade heads, report metrics and the reporter's grounding check (with `train_dir`); a head
    that cannot be estimated on this cohort (too few patients or events, e.g. `--patients 10`) is recorded with
    the reason instead of stopping the run. An earlier run's metrics of exactly the same inputs are reused (a
    rerun changes nothing)."""
    from evaluate.report_eval import ReportSettings, evaluate_reports
    from slidecache.cohorts.splits import read_split

    folder = out / "evaluation"
    inputs = _evaluation_inputs(out, split, clinical, annotations, generated)
    previous = _reusable_evaluation(folder, inputs)
    if previous is not None:
        log(f"[demo] evaluation: {folder} holds the metrics of these very inputs: reused")
        return previous
    folds = read_split(split)
    folder.mkdir(parents=True, exist_ok=True)
    store_url = str(out / "store.zarr")
    result = _heads(EmbeddingStore.open(store_url), data, folds, folder, log)
    reports = ReportSettings(generated, annotations, (str(clinical),), "OS", store=store_url, checkpoint=train_dir,
                             max_new_tokens=GENERATED_TOKENS, seed=SEED)
    scored = evaluate_reports(replace(reports, checkpoint=None), log=lambda line: None)  # the summary shows them
    result["reports"] = scored.scores_record() | {"fold": HELD_OUT_FOLD}
    if train_dir is not None:
        result["grounding"] = _grounding(reports, log)
    (folder / "metrics.json").write_text(json_out.dumps({**result, "inputs_sha256": inputs}))
    return result


def _heads(store: EmbeddingStore, data: Any, folds: dict[str, int], folder: Path,
           log: Callable[[str], None]) -> dict[str, Any]:
    """Coxnet survival and logistic-regression grade heads, each with its picture in `folder`; a head that cannot
    be estimated is recorded with the reason."""
    from evaluate.grade_eval import GradeSettings, evaluate_grade
    from evaluate.records import not_estimated
    from evaluate.survival_eval import SurvivalSettings, evaluate_survival
    from slidecache.errors import EvaluationError

    result: dict[str, Any] = {}
    heads = (("survival", SurvivalSettings(seed=SEED, clinical_baseline=False), evaluate_survival),
             ("grade", GradeSettings(seed=SEED), evaluate_grade))
    for name, settings, evaluate in heads:
        try:
            evaluation = evaluate(store, data, folds, settings, folder, log=log)
        except EvaluationError as e:
            result[name] = not_estimated(settings.head, e)
            continue
        evaluation.plot(folder)
        result[name] = evaluation.brief()
    return result


def _grounding(settings: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The reporter's grounding check (its lines logged), or why it could not run."""
    from evaluate.grounding import grounding_lines
    from evaluate.report_eval import check_grounding, grounding_record
    from slidecache.errors import EvaluationError

    try:
        grounding = check_grounding(settings)
    except EvaluationError as e:  # e.g. a held-out fold whose references state one grade only
        return {"error": str(e)}
    for line in grounding_lines(grounding):
        log(f"[demo] {line}")
    return grounding_record(grounding)


def _evaluation_inputs(out: Path, *files: Path | str) -> str:
    """One digest of everything the evaluation reads: the store's slides (each one's commit), the split,
    the clinical table, the annotations and the generated reports, and the seed."""
    store = EmbeddingStore.open(str(out / "store.zarr"))
    digest = hashlib.sha256(f"seed={SEED};evaluation={EVALUATION_VERSION};{store.fingerprint}".encode())
    for slide_id in store.slide_ids():
        digest.update(f"{slide_id}@{store.slide(slide_id).commit_id};".encode())
    for path in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def _reusable_evaluation(folder: Path, inputs: str) -> dict[str, Any] | None:
    """The metrics of an earlier run on exactly these inputs (and its pictures), else None."""
    try:
        previous = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    pictures = [folder / name for name, part in (("km.png", "survival"), ("confusion.png", "grade"))
                if "error" not in previous.get(part, {})]
    if previous.pop("inputs_sha256", None) != inputs or not all(p.is_file() for p in pictures):
        return None
    return previous


class _Stages:
    """Seconds per stage, logged as each ends: where a demo run spends its time."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.seconds = log, {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.log(f"[demo] {name}: {self.seconds[name]:.1f} s")


def run(out: Path, settings: DemoSettings = DemoSettings(), log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    stage = _Stages(log)
    out.mkdir(parents=True, exist_ok=True)
    patients = plan_patients(settings.size)
    with stage("slides"):
        cohort = write_slides(out, settings.size, patients, log)
        clinical, texts = write_clinical(out, patients), write_report_texts(out, patients)
    with stage("extraction"):
        result: dict[str, Any] = {"encoder": settings.encoder_label(), **extract(out, cohort, settings, log)}
    split, data = make_split(out, result["store"], clinical, settings.folds)
    result["split"] = str(split)
    if settings.train:
        with stage("training and generation"):
            result |= {"llm": settings.llm_label(),
                       **train_and_generate(out, result["store"], clinical, texts, split, settings, log)}
        with stage("evaluation"):
            result["evaluation"] = evaluate_all(out, data, split, clinical, result["annotations"], result["generated"],
                                                log, result["train_dir"])
    result["stage_seconds"] = stage.seconds
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["summary_html"] = str(write_summary(out, result))
    manifest = {"summary": result, "provenance": provenance({"demo": "pipeline", "seed": SEED,
                                                             "settings": asdict(settings)})}
    (out / "run_manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return result

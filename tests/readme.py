"""Every command README.md and the pages of docs/ show, and how the suite runs it.

`shown_commands()` reads them from README.md and every docs/*.md, each with the file and line it is printed
at: each command of a ```bash block (a line starting with white space, or following a trailing backslash,
continues the one before; `# ...` comments dropped, whole comment lines too), the inline `python -m ...`,
`make ...`, `bash ...` spans of the prose, and each ```python block as one snippet (`readme_commands()`:
the same, as the distinct texts). Each must be run by a test that carries `@pytest.mark.readme(COMMAND)`
(COMMAND exactly as printed; the marker covers that text in whichever file prints it) or be listed in EXEMPT
with the reason: tests/test_readme_commands.py fails otherwise, naming the file and line, so a command added
to the README or a docs page without a test fails the suite.

A test runs a command through `to_argv`: the optional `[...]` parts left out, the first of `a|b`, `X...`
read as one X, a bare `...` read as the words of the command printed before it, and the upper-case
placeholders (STORE, TABLE, DIR, ...) filled with files in the test's own fresh working directory. Where
this machine cannot run a command as printed, exactly the substitutions below are made, and no others:

| printed                                     | run here                                   | why                                    |
|---------------------------------------------|--------------------------------------------|----------------------------------------|
| `GPUS=8`                                    | `GPUS=2`: torchrun, 2 CPU processes, gloo  | no GPU here                            |
| `--ray_workers 16` (`BATCH_SIZE=128`)       | `--ray_workers 2` gloo workers; the four samples of tests/train/test_accumulation.py, `BATCH_SIZE=4`: one optimiser step | no cluster |
| a hub id (`Qwen/Qwen2-0.5B-Instruct`, in a recipe or `--llm_path`) | `--llm_path DIR`: a random-init tiny Qwen2 saved with save_pretrained, read through the same local-directory path | no network, no weights |
| the gated Virchow-2 weights (the default extraction config) | `--encoder virchow2-tiny`: random weights of the same family (the full architecture from a local file runs in tests/demo/test_real_model_path.py) | gated weights |
| `python -m demo --encoder virchow2 --llm_path Qwen/...` | `--weights` a saved random-init ViT-H/14, `--llm_path` a saved random-init Qwen2-0.5B, 10 patients of small slides | weights; the full ViT-H encodes 0.28 tiles/s on 2 cores |
| `s3://bucket/...`                           | the same URL on the moto S3 server the suite starts (`AWS_ENDPOINT_URL`) | no S3 |
| a Ray cluster (`ray job submit`)            | a head the test starts; `RAY_ADDRESS` its dashboard, `TCGA_SLIDES` the test's slides | no cluster |
| `make demo`                                 | `python -m demo`, the recipe `make demo` runs after the install the suite already has (the test checks the recipe) | the install takes minutes |
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TESTS = Path(__file__).resolve().parent

EXEMPT = {
    "make test": "it is the suite itself: CI runs it (.ci/run)",
    "make bench": "benchmarks, minutes long; they print ratios and are run by hand (bench/RESULTS.md)",
    "bash bench/gpu_extract.sh": "needs a CUDA GPU: run on the device machine, results in bench/RESULTS.md",
    "bash bench/gpu_pipeline.sh": "needs a CUDA GPU and minutes; its --device cpu dry run is run by "
                                  "tests/extract/test_gpu_pipeline_dry_run.py",
    "bash bench/gpu_train_eval.sh OUT": "needs a CUDA GPU: run on the device machine, results in bench/RESULTS.md; its "
                                       "--device cpu dry run is run by tests/test_benches.py",
    "bash bench/gpu_reporter.sh": "needs a CUDA GPU and a prepared cohort: run on the device machine; its CPU dry run "
                                  "(--max-steps 2) is in bench/RESULTS.md",
    "ray job submit": "a mention in the prose; the whole command is in the extraction block and is run",
    "python -m store failures": "a mention in the prose; `python -m store failures STORE [--json]` is run",
}

# The guides docs/tcga.md and docs/reports.md print the commands of a real run: real paths, the real data and
# weights. Their general forms (placeholders and options, in the README and the stage pages) are run above.
_TCGA = ("the real run of docs/tcga.md: needs its store of the TCGA slides (encoded with the gated Virchow-2 weights "
         "on GPUs)")
_HISTGEN = ("the real run of docs/reports.md: needs HistGen's TCGA slides or their store (encoded with the gated "
            "Virchow-2 weights) and a GPU")
_S3 = ", a Ray cluster and S3"
_ENV = "sets environment variables for the commands after it: nothing runs"
_GDC = "downloads TCGA slides from the GDC (network, terabytes); the suite makes its own slides"


def _general(test: str) -> str:
    return f"; its general form is run by {test}"


EXEMPT |= {
    # docs/reports.md
    "gdc-client download -m histgen_manifest.txt -d /data/tcga/slides": _GDC,
    "export TCGA_MANIFEST=/data/tcga/histgen_manifest.txt TCGA_SLIDE_ROOT=/data/tcga/slides": _ENV,
    "export HF_TOKEN=...": _ENV,
    "python -m extract --cohort TCGA --store /data/stores/histgen-virchow2.zarr --compile":
        _HISTGEN + _general("tests/extract/test_readme_extract.py"),
    "python -m store verify /data/stores/histgen-virchow2.zarr":
        _HISTGEN + _general("tests/store/test_readme_store.py"),
    "python -m train.import_reports --store /data/stores/histgen-virchow2.zarr --histgen annotation712_update.json "
    "--out runs/histgen/reports": _HISTGEN + _general("tests/train/test_import_reports.py"),
    "python -m train --config configs/train/histgen-internvl2-1b-lora.yaml --meta_path runs/histgen/reports/meta.json "
    "--store /data/stores/histgen-virchow2.zarr --split runs/histgen/reports/split.csv --output_dir runs/histgen/lora":
        _HISTGEN + _general("tests/train/test_import_reports.py"),
    "python -m train.generate --checkpoint runs/histgen/lora --store /data/stores/histgen-virchow2.zarr --meta_path "
    "runs/histgen/reports/meta.json --split runs/histgen/reports/split.csv --batch_size 32 --max_new_tokens 512 "
    "--out runs/histgen/gen/test.jsonl": _HISTGEN + _general("tests/train/test_import_reports.py"),
    "python -m evaluate report --protocol histgen --predictions runs/histgen/gen/test.jsonl --references "
    "runs/histgen/reports/annotations.jsonl --store /data/stores/histgen-virchow2.zarr --clinical TCGA-CDR.csv "
    "--out runs/histgen/scores": _HISTGEN + _general("tests/train/test_import_reports.py"),
    "python -m evaluate report --predictions runs/histgen/gen/test.jsonl --references "
    "runs/histgen/reports/annotations.jsonl --checkpoint runs/histgen/lora --store /data/stores/histgen-virchow2.zarr "
    "--out runs/histgen/grounding": _HISTGEN + _general("tests/train/test_readme_train.py"),
    "git clone https://github.com/dddavid4real/HistGen /opt/histgen":
        "fetches HistGen's source from GitHub (network); tests/evaluate/test_histgen_parity.py runs the parity check "
        "when SLIDECACHE_HISTGEN_SRC names such a checkout",
    "python bench/histgen_parity.py --histgen-src /opt/histgen --annotation annotation712_update.json --predictions "
    "runs/histgen/gen/test.jsonl": _HISTGEN + _general("tests/evaluate/test_histgen_parity.py"),
    "python -m evaluate survival --store /data/stores/histgen-virchow2.zarr --clinical TCGA-CDR.csv --head abmil-cox "
    "--save-head runs/histgen/heads/os --out runs/histgen/os": _HISTGEN + _general("tests/train/test_slide_report.py"),
    "python -m evaluate grade --store /data/stores/histgen-virchow2.zarr --clinical TCGA-CDR.csv --head logreg "
    "--save-head runs/histgen/heads/grade --out runs/histgen/grade":
        _HISTGEN + _general("tests/train/test_slide_report.py"),
    "python -m train.generate --checkpoint runs/histgen/lora --store /data/stores/histgen-virchow2.zarr --slide "
    "new-case.svs --survival_head runs/histgen/heads/os --grade_head runs/histgen/heads/grade --max_new_tokens 512 "
    "--page_dir pages/new-case": _HISTGEN + _general("tests/train/test_slide_report.py"),
    # docs/tcga.md
    "gdc-client download -m gdc_manifest.txt -d /data/tcga/slides": _GDC,
    "export TCGA_MANIFEST=/data/tcga/gdc_manifest.txt TCGA_SLIDE_ROOT=/data/tcga/slides": _ENV,
    "export AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": _ENV,
    "ray start --head --port 6379 --num-gpus 0 --dashboard-host 0.0.0.0": "starts the head node of a Ray cluster; the `ray job submit` tests "
                                                 "start their own head (tests/ray_head.py)",
    "ray start --address HEAD:6379": "joins a GPU node to a cluster; tests/extract/test_nodes.py runs a second node "
                                     "(ray.cluster_utils) and checks each slide is read where it is encoded",
    "ray job submit --address http://HEAD:8265 --working-dir . --runtime-env-json '{\"env_vars\": {\"TCGA_MANIFEST\": "
    "\"/data/tcga/gdc_manifest.txt\", \"TCGA_SLIDE_ROOT\": \"/data/tcga/slides\"}}' -- python -m extract --cohort TCGA "
    "--store s3://bucket/tcga-virchow2.zarr --qc-dir /shared/qc/tcga-virchow2":
        _TCGA + _S3 + _general("tests/extract/test_readme_extract.py (on a Ray head and a moto S3 server)"),
    "python -m store verify s3://bucket/tcga-virchow2.zarr":
        _TCGA + _S3 + _general("tests/store/test_readme_store.py"),
    "python -m store failures s3://bucket/tcga-virchow2.zarr":
        _TCGA + _S3 + _general("tests/store/test_readme_store.py"),
    "python -m evaluate split --store s3://bucket/tcga-virchow2.zarr --clinical TCGA-CDR.csv --cancer-type KIRC "
    "--site-preserving --folds 5 --out runs/kirc/splits.csv":
        _TCGA + _S3 + _general("tests/evaluate/test_readme_evaluate.py"),
    "python -m train.annotations --store s3://bucket/tcga-virchow2.zarr --clinical TCGA-CDR.csv --reports "
    "pathology_report_texts.jsonl --split runs/kirc/splits.csv --fold 0 --out runs/kirc/annotations.jsonl --meta "
    "runs/kirc/meta.json": _TCGA + _S3 + _general("tests/train/test_readme_train.py"),
    "GPUS=8 PER_DEVICE_BATCH_SIZE=4 BATCH_SIZE=128 python -m train --config configs/train/internvl2-1b-lora.yaml "
    "--meta_path runs/kirc/meta.json --store s3://bucket/tcga-virchow2.zarr --split runs/kirc/splits.csv --fold 0 "
    "--output_dir runs/kirc/fold0": _TCGA + _S3 + _general("tests/train/test_readme_train.py (GPUS=2 gloo processes)"),
    "ray job submit --working-dir . --runtime-env-json '{\"env_vars\": {\"PER_DEVICE_BATCH_SIZE\": \"4\", "
    "\"BATCH_SIZE\": \"128\"}}' -- python -m train --ray_workers 16 --config configs/train/internvl2-1b-lora.yaml "
    "--meta_path runs/kirc/meta.json --store s3://bucket/tcga-virchow2.zarr --split runs/kirc/splits.csv --fold 0 "
    "--output_dir /shared/runs/kirc/fold0": _TCGA + _S3 + " and a shared file system"
        + _general("tests/train/test_accumulation.py (--ray_workers 2 gloo workers)"),
    "python -m train.generate --checkpoint runs/kirc/fold0 --store s3://bucket/tcga-virchow2.zarr --meta_path "
    "runs/kirc/meta.json --split runs/kirc/splits.csv --fold 0 --out runs/kirc/fold0/reports.jsonl":
        _TCGA + _S3 + _general("tests/train/test_readme_train.py"),
    "python -m evaluate report --predictions runs/kirc/fold0/reports.jsonl --references runs/kirc/annotations.jsonl "
    "--clinical TCGA-CDR.csv --out runs/kirc/fold0/report_metrics":
        _TCGA + _general("tests/train/test_readme_train.py"),
    "python -m evaluate sweep --store s3://bucket/tcga-virchow2.zarr --clinical TCGA-CDR.csv --cancer-type KIRC "
    "--tasks OS DSS PFI grade --split runs/kirc/splits.csv --out runs/kirc/sweep":
        _TCGA + _S3 + _general("tests/evaluate/test_readme_evaluate.py"),
    "python -m evaluate survival --store s3://bucket/tcga-virchow2.zarr --clinical TCGA-CDR.csv --cancer-type KIRC "
    "--head abmil-cox --split runs/kirc/splits.csv --heatmaps auto --out runs/kirc/abmil":
        _TCGA + _S3 + _general("tests/evaluate/test_readme_evaluate.py"),
}
PLACEHOLDERS = {"STORE", "STORE_A", "STORE_B", "TABLE", "DIR", "ID", "SRC", "DST", "NAME", "SLIDES_OR_TABLE", "OUT", "HUB_ID_OR_FILE",
                "SLIDE_ID", "SLIDE", "X", "N"}  # README's and docs' placeholders; other upper-case words (OS, TCGA) are literal
INLINE = re.compile(r"^(python -m |make |bash |ray job submit)")
REWRITES = (("GPUS=8", "GPUS=2"), ("--ray_workers 16", "--ray_workers 2"))  # the table's plain rewrites


def _bash_commands(body: str) -> list[tuple[int, str]]:
    """(line offset within the block, command) for each command of a shell block."""
    commands: list[tuple[int, str]] = []
    joining = False
    for offset, raw in enumerate(body.splitlines()):
        line = re.sub(r"(^|\s+)#.*$", "", raw).rstrip()
        if not line.strip():
            joining = False
            continue
        continues = joining or raw[:1].isspace()
        text = line.rstrip("\\").strip()
        if continues and commands:
            commands[-1] = (commands[-1][0], f"{commands[-1][1]} {text}")
        else:
            commands.append((offset, text))
        joining = line.endswith("\\")
    return commands


def documents() -> list[Path]:
    """The files whose commands the suite runs: README.md, then every docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


@dataclass(frozen=True)
class Shown:
    """A command as one file prints it."""
    command: str  # one line of single-spaced words
    file: str  # relative to the repository root, e.g. "docs/store.md"
    line: int  # the line it starts on

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.command}"


def _files(files: Path | Sequence[Path] | None) -> list[Path]:
    if files is None:
        return documents()
    return [files] if isinstance(files, Path) else list(files)


def _name(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def shown_commands(files: Path | Sequence[Path] | None = None) -> list[Shown]:
    """Every command README.md and docs/*.md show (or `files`), with where, once per file and text."""
    shown: dict[tuple[str, str], Shown] = {}
    for path in _files(files):
        text, name = path.read_text(encoding="utf-8"), _name(path)
        found: list[tuple[int, str]] = []
        for block in re.finditer(r"```(\w*)\n(.*?)```", text, re.S):
            lang, body = block.group(1), block.group(2)
            first = text.count("\n", 0, block.start(2)) + 1
            if lang in ("bash", "sh", "shell"):
                found += [(first + offset, command) for offset, command in _bash_commands(body)]
            elif lang == "python":
                found.append((first, "python: " + body.strip().splitlines()[0]))
        prose = re.sub(r"```.*?```", lambda block: "\n" * block.group(0).count("\n"), text, flags=re.S)
        found += [(prose.count("\n", 0, span.start()) + 1, span.group(1))
                  for span in re.finditer(r"`([^`\n]+)`", prose) if INLINE.match(span.group(1))]
        for line, command in sorted(found):
            command = " ".join(command.split())
            shown.setdefault((name, command), Shown(command, name, line))
    return list(shown.values())


def readme_commands(files: Path | Sequence[Path] | None = None) -> list[str]:
    """Every command README.md and docs/*.md show (or `files`), each text once, as one line of single-spaced
    words."""
    return list(dict.fromkeys(shown.command for shown in shown_commands(files)))


def python_snippet(first_line: str, files: Path | Sequence[Path] | None = None) -> str:
    """The ```python block of README.md or a docs page whose first line is `first_line`."""
    for path in _files(files):
        for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            if lang == "python" and body.strip().splitlines()[0] == first_line.removeprefix("python: "):
                return body
    raise KeyError(first_line)


@dataclass
class Run:
    env: dict[str, str]
    argv: list[str]  # e.g. ["python", "-m", "store", "info", "/tmp/x/store.zarr"]
    substituted: list[str] = field(default_factory=list)  # which rows of the table were applied

    @property
    def module(self) -> str:
        assert self.argv[:2] == ["python", "-m"], self.argv
        return self.argv[2]

    @property
    def args(self) -> list[str]:
        return self.argv[3:]


def to_argv(command: str, values: Mapping[str, str] | None = None, *, dots: Sequence[str] = (),
            llm_dir: str | None = None, tiny_encoder: bool = False) -> Run:
    """The words a test runs for a command of the README or a docs page: see the module docstring for every rule."""
    values = dict(values or {})
    substituted = []
    for printed, here in REWRITES:
        if printed in command:
            command = command.replace(printed, here)
            substituted.append(printed)
    command = re.sub(r"\s*\[[^\[\]]*\]", "", command)  # optional parts
    words = shlex.split(command)
    env: dict[str, str] = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    argv: list[str] = []
    for word in words:
        if word == "...":
            argv += list(dots)
            continue
        word = word.removesuffix("...")
        if "|" in word and " " not in word:
            word = word.split("|")[0]
        if word in PLACEHOLDERS:
            if word not in values:
                raise KeyError(f"{command}: give a value for {word}")
            word = values[word]
        argv.append(word)
    if llm_dir:
        argv += ["--llm_path", llm_dir]
        substituted.append("hub id")
    if tiny_encoder:
        argv += ["--encoder", "virchow2-tiny"]
        substituted.append("gated Virchow-2 weights")
    return Run(env, argv, substituted)


def readme_markers(marker: str = "readme", tests: Path = TESTS) -> dict[str, list[str]]:
    """{argument: [test file::function, ...]} from every `@pytest.mark.<marker>(ARG)` in the suite (ARG a string
    or a module-level string constant)."""
    found: dict[str, list[str]] = {}
    for path in sorted(tests.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        constants = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                     for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
                        and decorator.func.attr == marker and decorator.args):
                    continue
                arg = decorator.args[0]
                text = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", ""), "")
                command = " ".join(str(text).split())
                found.setdefault(command, []).append(f"{path.relative_to(tests.parent)}::{node.name}")
    return found


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def log(self) -> str:
        return self.stdout + self.stderr


MAINS = {"extract": "extract.cli", "store": "store.cli", "evaluate": "evaluate.cli", "train": "train.cli",
         "train.annotations": "train.annotations",
         "train.generate": "train.generate", "train.merge": "train.merge", "train.import_reports": "train.import_reports"}


def run_main(module: str, args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> Result:
    """`python -m MODULE ARGS` as its `main(ARGS)` in this process, in `cwd`, with `env` added to the
    environment: the same code path without paying a new interpreter's imports (5-12 s on 2 cores) for every
    command. An argparse refusal (SystemExit) gives its exit code, as the command would."""
    main = importlib.import_module(MAINS[module]).main
    previous_cwd, previous_env = os.getcwd(), dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        os.chdir(previous_cwd)
        os.environ.clear()
        os.environ.update(previous_env)
    return Result(int(code or 0), out.getvalue(), err.getvalue())


def run_in_process(run: Run, cwd: Path) -> Result:
    """A README or docs command (see to_argv) run by run_main."""
    return run_main(run.module, run.args, cwd, run.env)


def run_subprocess(run: Run, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 900) -> Result:
    """The command in a new process, `python` being this interpreter."""
    argv = [sys.executable if run.argv[0] == "python" else run.argv[0], *run.argv[1:]]
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {}), **run.env}, capture_output=True, text=True,
                          timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)

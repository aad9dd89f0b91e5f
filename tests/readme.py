"""Every command README.md shows, and how the suite runs it.

`readme_commands()` reads them: each command of a ```bash block (a line starting with white space, or
following a trailing backslash, continues the one before; `# ...` comments dropped), the inline
`python -m ...`, `make ...`, `bash ...` spans of the prose, and each ```python block as one snippet.
Each must be run by a test that carries `@pytest.mark.readme(COMMAND)` (COMMAND exactly as printed) or be
listed in EXEMPT with the reason: tests/test_readme_commands.py fails otherwise, so a command added to the
README without a test fails the suite.

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

README = Path(__file__).resolve().parents[1] / "README.md"
TESTS = Path(__file__).resolve().parent

EXEMPT = {
    "make test": "it is the suite itself: CI runs it (.ci/run)",
    "make bench": "benchmarks, minutes long; they print ratios and are run by hand (bench/RESULTS.md)",
    "bash bench/gpu_extract.sh": "needs a CUDA GPU: run on the device machine, results in bench/RESULTS.md",
    "bash bench/gpu_pipeline.sh": "needs a CUDA GPU and minutes; its --device cpu dry run is run by "
                                  "tests/extract/test_gpu_pipeline_dry_run.py",
    "bash bench/gpu_train_eval.sh OUT": "needs a CUDA GPU: run on the device machine, results in bench/RESULTS.md",
    "bash bench/gpu_reporter.sh": "needs a CUDA GPU and a prepared cohort: run on the device machine; its CPU dry run "
                                  "(--max-steps 2) is in bench/RESULTS.md",
    "ray job submit": "a mention in the prose; the whole command is in the extraction block and is run",
    "python -m store failures": "a mention in the prose; `python -m store failures STORE [--json]` is run",
}
PLACEHOLDERS = {"STORE", "STORE_A", "STORE_B", "TABLE", "DIR", "ID", "SRC", "DST", "NAME", "SLIDES_OR_TABLE", "OUT", "HUB_ID_OR_FILE",
                "SLIDE_ID", "SLIDE", "X", "N"}  # the README's placeholders; other upper-case words (OS, TCGA) are literal
INLINE = re.compile(r"^(python -m |make |bash |ray job submit)")
REWRITES = (("GPUS=8", "GPUS=2"), ("--ray_workers 16", "--ray_workers 2"))  # the table's plain rewrites


def _bash_commands(body: str) -> list[str]:
    commands: list[str] = []
    joining = False
    for raw in body.splitlines():
        line = re.sub(r"\s+#.*$", "", raw).rstrip()
        if not line.strip():
            joining = False
            continue
        continues = joining or raw[:1].isspace()
        text = line.rstrip("\\").strip()
        if continues and commands:
            commands[-1] = f"{commands[-1]} {text}"
        else:
            commands.append(text)
        joining = line.endswith("\\")
    return commands


def readme_commands(readme: Path = README) -> list[str]:
    """Every command README.md shows, each as one line of single-spaced words."""
    text = readme.read_text()
    commands: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("bash", "sh", "shell"):
            commands += _bash_commands(body)
        elif lang == "python":
            commands.append("python: " + body.strip().splitlines()[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [span for span in re.findall(r"`([^`\n]+)`", prose) if INLINE.match(span)]
    return list(dict.fromkeys(" ".join(c.split()) for c in commands))


def python_snippet(first_line: str, readme: Path = README) -> str:
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", readme.read_text(), re.S):
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
    """The words a test runs for a README command: see the module docstring for every rule."""
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
    """A README command (see to_argv) run by run_main."""
    return run_main(run.module, run.args, cwd, run.env)


def run_subprocess(run: Run, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 900) -> Result:
    """The command in a new process, `python` being this interpreter."""
    argv = [sys.executable if run.argv[0] == "python" else run.argv[0], *run.argv[1:]]
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {}), **run.env}, capture_output=True, text=True,
                          timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)

"""`pip install .` (a wheel, not editable) into a fresh virtual environment, beside the project's pinned
packages: the README's extraction and evaluation commands, run from a folder outside the checkout, find the
shipped configs (package data) and the `slidecache` console script. The fresh environment borrows this one's
dependencies through a .pth line (no download), never its editable slidecache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.readme import to_argv

pytestmark = pytest.mark.timeout(1500)  # may wait on the shared README demo run (its lock)

EXTRACT = "python -m extract --cohort SLIDES_OR_TABLE --store STORE"
GRADE = "python -m evaluate grade --store STORE --clinical TABLE --out DIR"
SOURCES = ("pyproject.toml", "README.md", "extract", "store", "train", "evaluate", "demo", "configs", "slidecache")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO_ROOT / name).is_dir() else shutil.copy
        copy(REPO_ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                 if (REPO_ROOT / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((root / "dist").glob("slidecache-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def in_venv(venv: Path, argv: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_configs_and_the_console_script(wheel_venv, tmp_path):
    code = ("import extract, configs; from slidecache.configs import SHIPPED; "
            "print(extract.__file__); print(SHIPPED); "
            "print(sorted(p.name for p in (SHIPPED / 'train').glob('*.yaml')))")
    done = in_venv(wheel_venv, ["python", "-c", code], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    module, shipped, train = done.stdout.splitlines()
    assert str(wheel_venv) in module and str(REPO_ROOT) not in module  # the wheel's code, not the checkout's
    assert str(wheel_venv) in shipped and "tiny.yaml" in train
    assert (wheel_venv / "bin" / "slidecache").is_file()
    helped = in_venv(wheel_venv, ["slidecache", "--help"], tmp_path)
    assert helped.returncode == 0 and "train.generate" in helped.stdout
    version = in_venv(wheel_venv, ["python", "-c", "from slidecache.provenance import code_version; print(code_version())"],
                      tmp_path)
    assert version.stdout.strip() == "slidecache==0.1.0", version.stdout + version.stderr


def test_readme_extraction_from_outside_the_checkout(wheel_venv, tmp_path):
    from demo.slides import synthetic_he, write_pyramid

    for i in range(2):
        write_pyramid(tmp_path / "slides" / f"s{i}.tiff", synthetic_he(1200, 1400, seed=i), mpp=0.25)
    run = to_argv(EXTRACT, {"SLIDES_OR_TABLE": "slides", "STORE": "store.zarr"}, tiny_encoder=True)
    done = in_venv(wheel_venv, run.argv, tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (done.stdout + done.stderr)[-3000:]
    assert "2 done" in done.stdout
    again = in_venv(wheel_venv, ["slidecache", "store", "info", "store.zarr"], tmp_path, timeout=300)
    assert again.returncode == 0 and "2 complete" in again.stdout, (again.stdout + again.stderr)[-2000:]
    manifest = json.loads((tmp_path / "store.zarr" / "zarr.json").read_text())["attributes"]["provenance"]
    assert manifest["code_version"] == "slidecache==0.1.0"


def test_readme_evaluation_with_the_console_script_from_outside_the_checkout(wheel_venv, readme_demo, tmp_path):
    run = to_argv(GRADE, {"STORE": readme_demo.store, "TABLE": str(readme_demo.out / "clinical.csv"), "DIR": "out"})
    done = in_venv(wheel_venv, ["slidecache", *run.argv[2:]], tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (tmp_path / "out" / "confusion.png").is_file()
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())


def test_a_hugging_face_evaluate_beside_slidecache_is_named_not_run(wheel_venv, tmp_path):
    """Both install a top-level `evaluate`: the one installed last wins. The console script refuses to run in
    such an environment and says what to do (documented in the README)."""
    fake = tmp_path / "site"
    (fake / "evaluate-0.4.6.dist-info").mkdir(parents=True)
    metadata = "Metadata-Version: 2.1\nName: evaluate\nVersion: 0.4.6\n"
    (fake / "evaluate-0.4.6.dist-info" / "METADATA").write_text(metadata)
    env_python = ["python", "-c", f"import sys; sys.path.insert(0, {str(fake)!r}); "
                                  "from slidecache.__main__ import main; sys.exit(main(['evaluate', '--help']))"]
    done = in_venv(wheel_venv, env_python, tmp_path)
    assert done.returncode == 2 and "Hugging Face's `evaluate` 0.4.6" in done.stderr, done.stdout + done.stderr

"""The extraction CLI's refusals before any Ray work, and every shipped extraction config loads.
(`ray job submit` of the README's command runs in tests/extract/test_readme_extract.py.)"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO_ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extract", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def test_cli_refusals_are_clear(tmp_path):
    (tmp_path / "empty").mkdir()
    empty = run_cli("--cohort", str(tmp_path / "empty"), "--store", str(tmp_path / "s"))
    assert empty.returncode == 2 and "no slides found" in empty.stderr
    unknown = run_cli("--cohort", "NOPE", "--store", str(tmp_path / "s"))
    assert unknown.returncode == 2 and "neither a path nor a named cohort (TCGA" in unknown.stderr
    tcga = run_cli("--cohort", "TCGA", "--store", str(tmp_path / "s"))
    assert tcga.returncode == 2 and "set the variables it names" in tcga.stderr
    bad_cfg = run_cli("--cohort", str(tmp_path / "empty"), "--store", str(tmp_path / "s"), "--tokens", "3x4")
    assert bad_cfg.returncode == 2 and "tokens must look like 4x4" in bad_cfg.stderr
    assert "Traceback" not in empty.stderr + unknown.stderr + tcga.stderr + bad_cfg.stderr


def test_every_extract_config_loads():
    from extract.config import ExtractConfig
    from slidecache.configs import shipped

    configs = sorted(shipped("extract").glob("*.yaml"))
    assert configs
    for path in configs:
        ExtractConfig.from_yaml(path)


def test_the_config_follows_the_encoder_and_the_device():
    """`--encoder NAME` takes configs/extract/NAME.yaml when there is one, else the default config with that
    encoder; what a config leaves out (batch, read chunk) follows the device; `--config` and flags win."""
    from extract.config import DEVICE_DEFAULTS, ExtractConfig
    from slidecache.configs import shipped

    tiny = ExtractConfig.for_command(None, {"encoder": "virchow2-tiny"})
    assert (tiny.encoder, tiny.batch_size, tiny.read_chunk, tiny.precision) == ("virchow2-tiny", 64, 128, "fp32")
    small = ExtractConfig.for_command(None, {"encoder": "virchow2-small"})
    assert small.encoder == "virchow2-small" and small.batch_size is None and small.precision == "auto"
    for device in ("cpu", "cuda"):
        resolved = small.for_device(device)
        assert (resolved.batch_size, resolved.read_chunk) == tuple(DEVICE_DEFAULTS[device].values())
    assert tiny.for_device("cuda").batch_size == 64  # what the config says is kept
    given = ExtractConfig.for_command(shipped("extract", "virchow2.yaml"), {"encoder": "virchow2-tiny",
                                                                                 "batch_size": 8})
    assert (given.encoder, given.batch_size, given.precision) == ("virchow2-tiny", 8, "auto")
    assert ExtractConfig.for_command(None, {}).encoder == "virchow2"

"""Every command README.md shows is run by a test (a `@pytest.mark.readme(COMMAND)` with the command as
printed) or exempt with a reason; every shipped config takes a step at its own settings in some test
(`@pytest.mark.recipe(NAME)`). A command added to the README, or a config added to configs/, without a
test fails here. The rules and substitutions are in tests/readme.py."""

from __future__ import annotations

from slidecache.configs import shipped
from tests.readme import EXEMPT, readme_commands, readme_markers, to_argv


def test_every_readme_command_is_run_by_a_test_or_exempt_with_a_reason():
    commands = readme_commands()
    assert len(commands) > 30  # the parser still finds the README's blocks
    run = readme_markers("readme")
    missing = [c for c in commands if c not in run and c not in EXEMPT]
    assert not missing, f"README commands no test runs (mark one @pytest.mark.readme, or exempt it): {missing}"
    stale = sorted(set(run) - set(commands)) + sorted(set(EXEMPT) - set(commands))
    assert not stale, f"markers or exemptions for commands the README no longer shows: {stale}"
    assert all(reason.strip() for reason in EXEMPT.values())


def test_every_shipped_config_runs_at_its_own_settings():
    configs = {p.name for p in shipped("train").glob("*.yaml")} | {
        f"extract/{p.name}" for p in shipped("extract").glob("*.yaml")}
    covered = set(readme_markers("recipe"))
    assert configs <= covered, f"configs no test runs at their own settings: {sorted(configs - covered)}"
    assert covered <= configs, f"recipe markers for configs that do not exist: {sorted(covered - configs)}"


def test_the_command_rules():
    run = to_argv("GPUS=8 PER_DEVICE_BATCH_SIZE=4 python -m train --config c.yaml [--fold 0] --store STORE",
                  {"STORE": "s.zarr"})
    assert run.env == {"GPUS": "2", "PER_DEVICE_BATCH_SIZE": "4"} and run.substituted == ["GPUS=8"]
    assert run.argv == ["python", "-m", "train", "--config", "c.yaml", "--store", "s.zarr"]
    assert to_argv("python -m store rm STORE ID...", {"STORE": "s", "ID": "a"}).args == ["rm", "s", "a"]
    assert to_argv("python -m train ...", dots=["--x", "1"]).args == ["--x", "1"]
    assert to_argv('python -m g --prompt "Describe this image." --tasks OS DSS').args == [
        "--prompt", "Describe this image.", "--tasks", "OS", "DSS"]
    assert to_argv("python -m evaluate survival --head coxnet|coxph").args[-1] == "coxnet"

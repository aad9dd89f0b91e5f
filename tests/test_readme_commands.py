"""Every command README.md and the pages of docs/ show is run by a test (a `@pytest.mark.readme(COMMAND)` with
the command as printed) or exempt with a reason; every shipped config takes a step at its own settings in some
test (`@pytest.mark.recipe(NAME)`). A command added to the README or a docs page, or a config added to configs/,
without a test fails here, naming the file and line. The rules and substitutions are in tests/readme.py."""

from __future__ import annotations

import re

from slidecache.configs import shipped
from tests.readme import DOCS, EXEMPT, README, ROOT, documents, readme_markers, shown_commands, to_argv


def test_every_readme_command_is_run_by_a_test_or_exempt_with_a_reason():
    shown = shown_commands()
    files = {s.file for s in shown}
    assert len(shown_commands(README)) >= 10 and len({s.command for s in shown}) > 30  # the parser finds the blocks
    assert {"README.md", "docs/extract.md", "docs/store.md", "docs/train.md", "docs/evaluate.md"} <= files
    run = readme_markers("readme")
    missing = [str(s) for s in shown if s.command not in run and s.command not in EXEMPT]
    assert not missing, ("commands of README.md or docs/*.md no test runs (mark one @pytest.mark.readme, or exempt "
                         "it in tests/readme.py):\n" + "\n".join(missing))
    commands = {s.command for s in shown}
    stale = sorted(set(run) - commands) + sorted(set(EXEMPT) - commands)
    assert not stale, f"markers or exemptions for commands neither the README nor docs/*.md shows any more: {stale}"
    assert all(reason.strip() for reason in EXEMPT.values())


def test_the_readme_is_short_and_links_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "the README is the front page: its reference belongs in docs/"
    for page in [*sorted(DOCS.glob("*.md")), ROOT / "bench" / "RESULTS.md"]:
        assert f"]({page.relative_to(ROOT)})" in text, f"the README does not link {page.relative_to(ROOT)}"


def _anchors(path):
    """The `#fragment`s of a page's headings, as GitHub makes them."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_between_the_pages_resolve():
    broken = []
    for path in [*documents(), ROOT / "bench" / "RESULTS.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if "://" in target:
                continue
            if not linked.exists() or (anchor and anchor not in _anchors(linked)):
                broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


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


def test_commands_are_read_with_their_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A page\n\nRun `python -m demo` first.\n\n```bash\n# a comment line\n"
                    "python -m store info STORE \\\n    --list   # trailing comment\nmake test\n```\n")
    shown = [(s.line, s.command) for s in shown_commands(page)]
    assert shown == [(3, "python -m demo"), (7, "python -m store info STORE --list"), (9, "make test")]
    assert str(shown_commands(page)[0]).endswith("page.md:3: python -m demo")

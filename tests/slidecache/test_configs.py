"""A config named as the README names it is found from any working directory; a renamed shipped config still
works under its old name, with a note saying the new one."""

from __future__ import annotations

from slidecache.configs import RENAMED, SHIPPED, find_config


def test_a_readme_config_path_is_found_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("configs/train/tiny.yaml", "train") == SHIPPED / "train" / "tiny.yaml"
    assert find_config("tiny.yaml", "train") == SHIPPED / "train" / "tiny.yaml"


def test_an_old_config_name_finds_the_renamed_file_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for old, new in RENAMED.items():
        assert find_config(f"configs/train/{old}", "train") == SHIPPED / "train" / new
        assert f"{old} is now called {new}" in capsys.readouterr().err
    assert all((SHIPPED / "train" / new).is_file() for new in RENAMED.values())

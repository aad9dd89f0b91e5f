"""Boolean flags behave alike in every CLI, and as InternVL's: `--flag`, `--flag True`, `--flag False`."""

from __future__ import annotations

import argparse

import pytest

from slidecache.cli_args import normalise_bools, parse_bool


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from demo.__main__ import build_parser as demo
    from evaluate.cli import build_parser as evaluate
    from extract.cli import build_images_parser
    from extract.cli import build_parser as extract
    from store.cli import build_parser as store
    from train.generate import build_parser as generate

    return {"demo": demo(), "evaluate": evaluate(), "extract": extract(), "extract images": build_images_parser(),
            "store": store(), "train.generate": generate()}


def _walk(name: str, parser: argparse.ArgumentParser):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _walk(f"{name} {sub}", child)


def _required(parser: argparse.ArgumentParser) -> list[str]:
    """Values for the required options and positionals, so a parse can succeed."""
    words: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings and action.required:
            words += [action.option_strings[0], "x"]
        elif not action.option_strings and action.nargs not in ("?", "*"):
            words += ["x"] * (action.nargs if isinstance(action.nargs, int) else 1)
    return words


def test_no_cli_has_a_store_true_flag():
    for name, parser in (pair for top, p in _parsers().items() for pair in _walk(top, p)):
        flags = [a.option_strings for a in parser._actions
                 if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction))]
        assert not flags, f"{name}: {flags} take no True/False (use ArgumentParser.add_bool)"


def test_every_boolean_flag_takes_the_three_forms():
    checked = 0
    for name, parser in (pair for top, p in _parsers().items() for pair in _walk(top, p)):
        for action in parser._actions:
            if action.type is not parse_bool:
                continue
            flag, base = action.option_strings[0], _required(parser)
            for words, expected in (([flag], True), ([flag, "True"], True), ([flag, "False"], False),
                                    ([f"{flag}=false"], False)):
                # the flag first, so a positional after it must not be swallowed as its value
                parsed = parser.parse_args(words + base)
                assert getattr(parsed, action.dest) is expected, (name, words)
            checked += 1
    assert checked >= 8  # store --list/--json/--force, extract --retry-failed/--no-qc, --use_thumbnail, ...


def test_a_flag_before_a_positional_does_not_swallow_it():
    from store.cli import build_parser

    args = build_parser().parse_args(["rm", "--force", "store.zarr", "s1", "s2"])
    assert args.force is True and args.store == "store.zarr" and args.slide_ids == ["s1", "s2"]
    assert normalise_bools(["--x", "--", "--x", "False"], {"--x"}) == ["--x=True", "--", "--x", "False"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["rm", "store.zarr", "s1", "--force=maybe"])


def test_train_takes_the_same_three_forms():
    from train.config import parse_args

    base = ["--meta_path", "m.json", "--store", "s.zarr", "--output_dir", "o", "--report_to", "none"]
    for words, expected in ((["--use_thumbnail"], True), (["--use_thumbnail", "True"], True),
                            (["--use_thumbnail", "False"], False), (["--freeze_llm", "False", "--use_llm_lora", "0"], None)):
        _, data, _ = parse_args(base + words)
        if expected is not None:
            assert data.use_thumbnail is expected, words

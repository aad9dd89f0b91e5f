"""Training settings built from keyword values (train.config.build_args), as the demo builds them (issue 28): the same
three objects `python -m train` parses from the same flags, each value read as its flag would be."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from slidecache.errors import ConfigError
from train.config import build_args, parse_args


def _as_json(arguments) -> str:
    model, data, training = arguments
    return json.dumps([asdict(model), asdict(data), training.to_dict()], default=str, sort_keys=True)


@pytest.mark.parametrize("config, epochs", [("tiny.yaml", None), ("internvl2-1b-lora.yaml", 8)])
def test_keyword_values_build_what_the_same_flags_parse(tmp_path, config, epochs):
    split = tmp_path / "split.csv"
    split.write_text("patient_id,fold\nA,0\nB,1\n")
    common = {"llm_path": "tiny-qwen2", "meta_path": "meta.json", "store": "s.zarr", "output_dir": str(tmp_path / "o"),
              "split": str(split), "fold": 0, "max_tiles": 32, "report_to": "tensorboard", "save_strategy": "no",
              "logging_steps": 10}
    flags = [word for key, value in common.items() for word in (f"--{key}", str(value))]
    parsed = parse_args(["--config", config, *flags, *(["--num_train_epochs", str(epochs)] if epochs else [])])
    built = build_args(config, num_train_epochs=epochs, **common)  # None: not given, the recipe's epochs
    assert _as_json(built) == _as_json(parsed)
    assert built[2].num_train_epochs == (float(epochs) if epochs else 24) and built[2].report_to == ["tensorboard"]


def test_flags_override_keyword_values_and_bad_values_are_refused_by_name(tmp_path):
    base = {"meta_path": "m.json", "store": "s.zarr", "output_dir": str(tmp_path / "o"), "report_to": ["none"]}
    model, data, _ = build_args("tiny.yaml", ["--max_tiles", "8"], max_tiles=32, freeze_mlp=False, **base)
    assert data.max_tiles == 8 and model.freeze_mlp is False
    with pytest.raises(ConfigError, match="unknown training setting 'nope'"):
        build_args("tiny.yaml", nope=1, **base)
    with pytest.raises(ConfigError, match="max_tiles='many'"):
        build_args("tiny.yaml", max_tiles="many", **base)
    with pytest.raises(ConfigError, match="config="):
        build_args(None, ["--config", "tiny.yaml"], **base)

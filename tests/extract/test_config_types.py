"""A wrongly typed value in an extraction YAML is a refusal (exit 2, one line naming the setting and the
file), never a TypeError traceback: every field, every kind of wrong value, through `python -m extract`."""

from __future__ import annotations

import dataclasses

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extract.config import ExtractConfig
from tests.readme import run_main

NUMBERS = {"target_mpp", "tile_px", "stride_px", "min_tissue", "batch_size", "read_chunk", "encoder_threads",
           "mpp_override", "thumbnail_max_side", "limit", "num_encoders", "reader_cpus", "object_store_memory"}
WRONG_FOR_NUMBERS = st.one_of(st.text(min_size=1, max_size=8), st.lists(st.integers(1, 500), min_size=1, max_size=3),
                              st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
                              st.booleans())


def test_the_issue_examples_exit_2_naming_the_key(tmp_path, synthetic_slides):
    for key, value in (("target_mpp", "half"), ("tile_px", [224]), ("target_mpp", float("nan")),
                       ("target_mpp", float("inf")), ("stride_px", 0)):
        config = tmp_path / f"{key}-{value}.yaml"
        config.write_text(yaml.safe_dump({"encoder": "virchow2-tiny", key: value}))
        result = run_main("extract", ["--cohort", str(synthetic_slides), "--store", str(tmp_path / "s.zarr"),
                                      "--config", str(config)], tmp_path)
        assert result.code == 2, result.log[-2000:]
        assert "Traceback" not in result.log and key in result.stderr and config.name in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "s.zarr").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(NUMBERS)), value=WRONG_FOR_NUMBERS)
def test_any_wrongly_typed_number_is_a_config_error_naming_it(key, value):
    from slidecache.errors import ConfigError

    try:
        ExtractConfig.from_dict({key: value}, "bad.yaml")
    except ConfigError as e:
        assert key in str(e) and "bad.yaml" in str(e)
    else:
        raise AssertionError(f"{key}={value!r} was accepted")


def test_every_field_of_the_shipped_configs_is_typed_and_round_trips():
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    assert NUMBERS <= fields
    for name in ("virchow2", "virchow2-tiny"):
        cfg = ExtractConfig.from_yaml(f"configs/extract/{name}.yaml")
        assert ExtractConfig.from_dict(cfg.to_dict()) == cfg


def test_a_store_records_the_settings_in_their_usual_order():
    """The flat file is split into a spec and run options on loading; the config a store records keeps the one
    order of settings it always had."""
    assert list(ExtractConfig().to_dict()) == [
        "encoder", "weights", "target_mpp", "tile_px", "stride_px", "min_tissue", "tokens", "batch_size",
        "read_chunk", "encoder_threads", "readers", "precision", "compile", "mpp_override", "thumbnail_max_side",
        "retry_failed", "limit", "num_encoders", "reader_cpus", "executor", "object_store_memory", "qc_dir", "extra"]

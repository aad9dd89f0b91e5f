"""The one place that joins or starts Ray (slidecache.ray_connect), as extraction and Ray Train call it: which Ray
each joins or starts, and that only a Ray this process initialised is shut down. A stand-in `ray` module records
the calls, so nothing starts."""

from __future__ import annotations

import sys
import types

import pytest

from slidecache.errors import ConfigError
from slidecache.ray_connect import connect_ray, ray_connection


@pytest.fixture
def fake_ray(monkeypatch):
    calls: list[tuple[str, dict]] = []
    ray = types.ModuleType("ray")
    ray.initialized = False
    ray.is_initialized = lambda: ray.initialized

    def init(**kwargs):
        calls.append(("init", kwargs))
        ray.initialized = True

    def shutdown():
        calls.append(("shutdown", {}))
        ray.initialized = False

    ray.init, ray.shutdown = init, shutdown
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray, calls


def test_extraction_starts_a_capped_ray_of_its_own_else_joins_ray_address(fake_ray, monkeypatch):
    ray, calls = fake_ray
    assert connect_ray(object_store_memory=123) is True
    assert calls == [("init", {"address": "local", "object_store_memory": 123, "include_dashboard": False,
                               "log_to_driver": True})]
    assert connect_ray(object_store_memory=123) is False and len(calls) == 1  # already initialised: left alone
    ray.initialized = False
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what `ray job submit` sets for its driver
    connect_ray(object_store_memory=123)
    assert calls[-1] == ("init", {"address": None, "include_dashboard": False, "log_to_driver": True})


def test_ray_train_joins_its_address_or_a_running_ray(fake_ray):
    ray, calls = fake_ray
    connect_ray("10.0.0.1:6379", join_running=True)
    assert calls == [("init", {"address": "10.0.0.1:6379", "include_dashboard": False, "log_to_driver": True})]
    ray.initialized = False
    connect_ray(None, join_running=True)  # ray.init's own choice: a `ray start` here, else a new Ray
    assert calls[-1] == ("init", {"address": None, "include_dashboard": False, "log_to_driver": True})


def test_a_session_shuts_down_only_the_ray_it_started(fake_ray):
    ray, calls = fake_ray
    with ray_connection(object_store_memory=1):
        assert ray.initialized
    assert [name for name, _ in calls] == ["init", "shutdown"]
    calls.clear()
    ray.initialized = True  # the caller's Ray
    with ray_connection(object_store_memory=1):
        pass
    assert calls == [] and ray.initialized


def test_a_dashboard_address_is_refused_saying_how_to_submit_or_join(fake_ray, monkeypatch):
    """docs/tcga.md submits with `ray job submit --address http://HEAD:8265`; the same URL in RAY_ADDRESS for a
    plain run is a clear refusal, not Ray's traceback, and nothing is started."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match="dashboard's address.*ray job submit --address http://127.0.0.1:8265"):
        connect_ray()
    assert fake_ray[1] == []  # no init

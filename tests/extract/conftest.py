"""Fixtures for the extraction tests: synthetic pyramids written here, and a local Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.slides import synthetic_he, write_pyramid


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> Path:
    """Three small JPEG pyramids at 0.25 µm/px (about 10-20 tiles of 224 px at 0.5 µm each)."""
    root = tmp_path_factory.mktemp("synthetic_slides")
    for i, (h, w) in enumerate([(1400, 1800), (1700, 1800), (2000, 1800)]):
        write_pyramid(root / f"syn{i}.tiff", synthetic_he(h, w, seed=i, nuclear_density=0.002 * (i + 1)), mpp=0.25)
    return root


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False,
             log_to_driver=False)  # our own Ray, never one another test started
    yield ray
    ray.shutdown()

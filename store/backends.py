"""Where a store lives: a local path, file://, memory://, s3:// (or any fsspec URL) → a zarr Store."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))  # C:\ paths


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def zarr_store(url: str, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A zarr Store for a URL. Local paths use LocalStore (atomic writes by rename); the rest fsspec.

    s3:// credentials and endpoint come from `storage_options` or botocore's usual environment
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); they are never written to the store.
    """
    if is_local(url):
        path = local_path(url)
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    # An async filesystem is built from the URL; a ready sync S3FileSystem object would break reads.
    return FsspecStore.from_url(url, storage_options=dict(storage_options or {}), read_only=read_only)


def display_url(url: str) -> str:
    """The URL without any user:password part, for messages and logs."""
    parsed = urlparse(url)
    if parsed.password or parsed.username:
        return parsed._replace(netloc=parsed.hostname or "").geturl()
    return url

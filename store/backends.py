"""Where a store lives: a local path, file://, memory://, s3:// (or any fsspec URL) → a zarr Store.

Opening a store is the one place a remote location's problems show (an unknown scheme, a protocol whose
package is missing, no credentials, access denied, an unreachable endpoint): `opening` turns each into one
of our errors naming the URL (credentials redacted), the cause and the fix, so every command says so in
one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import unquote, urlparse

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from slidecache.errors import ConfigError, SlidecacheError, StoreAccessError
from slidecache.provenance import URL_USERINFO, is_secret_setting

# Exception class names (anywhere in the cause chain) of the fsspec backends' credential and network failures;
# matched by name so that botocore, aiohttp or google-auth need not be installed to classify them.
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectTimeout", "ConnectionClosedError",
                "ClientConnectorError", "ClientConnectionError", "ServerTimeoutError", "ReadTimeoutError",
                "gaierror"}
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or give key and secret in the "
                   "storage options (--storage-options '{\"key\": ..., \"secret\": ...}'; '{\"anon\": true}' for a "
                   "public bucket)")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and url[1:3] in (":\\", ":/"))  # C:\ paths


def local_path(url: str) -> Path:
    return Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()


def zarr_store(url: str, read_only: bool, storage_options: dict[str, Any] | None = None) -> Store:
    """A zarr Store for a URL. Local paths use LocalStore (atomic writes by rename); the rest fsspec.

    s3:// credentials and endpoint come from `storage_options`, from the URL (`s3://KEY:SECRET@bucket/x`) or
    botocore's usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL); they are never
    written to the store. A remote store is reached once here, so a location that cannot be used fails now,
    with a StoreAccessError or ConfigError saying why, not as a traceback from inside zarr.
    """
    with opening(url, storage_options):
        if is_local(url):
            path = local_path(url)
            if not read_only:
                path.mkdir(parents=True, exist_ok=True)
            return LocalStore(path, read_only=read_only)
        url, options = _credentials_from_url(url, dict(storage_options or {}))
        # An async filesystem is built from the URL; a ready sync S3FileSystem object would break reads.
        store = FsspecStore.from_url(url, storage_options=options, read_only=read_only)
        _reach(store)
        return store


# scheme://KEY:SECRET@rest — the secret may hold "/" or "+" (AWS secrets do) but no "@"; the key neither "/" nor ":"
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*://)(?P<user>[^@/:\s]*)(?::(?P<password>[^@\s]*))?@(?P<rest>.*)$")


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(user, password, url without them) when `url` carries credentials, else None. urlparse alone cuts the
    netloc at the first "/", so a secret holding "/" would be read as part of the host and shown."""
    match = _USERINFO.match(url)
    if match is None or not (match["user"] or match["password"]):
        return None
    return match["user"], match["password"] or "", match["scheme"] + match["rest"]


def _credentials_from_url(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`s3://KEY:SECRET@bucket/x` → `s3://bucket/x` with key and secret as storage options (s3fs reads no
    credentials from a URL: it took `KEY:SECRET@bucket` for the bucket name). Options given win."""
    found = _userinfo(url)
    if urlparse(url).scheme not in ("s3", "s3a") or found is None:
        return url, options
    user, password, bare = found
    given = {"key": unquote(user), "secret": unquote(password)}
    return bare, {**{k: v for k, v in given.items() if v}, **options}


def _reach(store: FsspecStore) -> None:
    """One read of the root's metadata key (absent is fine). zarr's own open reads several keys at once, and
    when they fail it leaves the other reads pending, which print tracebacks at exit; this one read fails
    alone, before them."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    sync(store.get("zarr.json", prototype=default_buffer_prototype()))


@contextlib.contextmanager
def opening(url: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Turn what goes wrong while opening the store at `url` into one of our errors, credentials redacted.
    Our own errors and a missing store (FileNotFoundError: the caller's to judge) pass through."""
    try:
        yield
    except (SlidecacheError, FileNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - classified below; anything unknown is re-raised as it was
        error = _translate(e, url, storage_options or {})
        if error is None:
            raise
        raise error from None  # the chain would repeat the secret-bearing messages in a traceback


def _translate(e: Exception, url: str, options: Mapping[str, Any]) -> SlidecacheError | None:
    shown = display_url(url)
    scheme = urlparse(url).scheme
    chain = _chain(e)
    names = {type(c).__name__ for c in chain}
    cause = redact(_one_line(e), url, options)
    if isinstance(e, ValueError) and str(e).startswith("Protocol not known"):
        return ConfigError(f"cannot open {shown}: unknown URL scheme '{scheme}://'; use a local path, file://, "
                           "memory://, s3:// or another fsspec protocol whose package is installed")
    if isinstance(e, ImportError):
        return ConfigError(f"cannot open {shown}: {scheme}:// needs a package that is not installed ({cause}); "
                           "install it into this environment, or use a local path or s3://")
    if names & _NO_CREDENTIALS:
        return StoreAccessError(f"cannot open {shown}: no credentials for {scheme}:// ({cause}); {CREDENTIALS_FIX}")
    if names & _UNREACHABLE or any(isinstance(c, (ConnectionError, TimeoutError)) for c in chain):
        endpoint = _endpoint(options)
        return StoreAccessError(
            f"cannot reach {shown}{f' at {endpoint}' if endpoint else ''}: {cause}; check the endpoint "
            "(AWS_ENDPOINT_URL, or client_kwargs.endpoint_url in the storage options) and that this machine can "
            "reach it")
    if isinstance(e, PermissionError):
        return StoreAccessError(f"cannot open {shown}: access denied ({cause}); check that the credentials "
                                "(or the local file permissions) allow reading and writing it")
    if isinstance(e, OSError) or type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs"):
        return StoreAccessError(f"cannot open {shown}: {type(e).__name__}: {cause}; check the URL and the storage "
                                "options")
    return None


def _chain(e: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = e
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _endpoint(options: Mapping[str, Any]) -> str:
    client = options.get("client_kwargs") or {}
    return str(options.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
               or os.environ.get("AWS_ENDPOINT_URL") or "")


def _secrets(value: Any, key: str = "") -> Iterator[str]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _secrets(v, str(k))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _secrets(v, key)
    elif isinstance(value, str) and value and is_secret_setting(key):
        yield value


def redact(text: str, url: str = "", storage_options: Mapping[str, Any] | None = None) -> str:
    """`text` without the credentials of `url`, of the storage options, of AWS_* variables, or in any URL."""
    secrets = [*_secrets(dict(storage_options or {})), *(os.environ.get(k, "") for k in _SECRET_ENV)]
    found = _userinfo(url)
    if found is not None:
        secrets += [s for raw in found[:2] if raw for s in (raw, unquote(raw))]
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return URL_USERINFO.sub(r"\1", text)  # user@ or user:password@ of any other URL in the text


def display_url(url: str) -> str:
    """The URL without any user:password part, for messages and logs."""
    found = _userinfo(url)
    return found[2] if found is not None else url

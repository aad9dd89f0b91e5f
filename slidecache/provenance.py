"""What produced an output: fingerprints (hashed, what changes the numbers) and provenance (recorded).

A fingerprint hashes only what changes the embeddings (encoder weights, pooling, preprocessing, tiling),
so upgrading a library does not lock a store; library and code versions and the full config are
provenance: recorded beside the fingerprint, never hashed. Every output folder of slidecache (store,
training run, evaluation) records `provenance(config)`.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

UNKNOWN = "unknown"  # a fingerprint field an import could not supply

# Packages whose versions we record. Read from metadata, never imported (store stays torch-free).
TRACKED_PACKAGES = (
    "slidecache", "numpy", "zarr", "numcodecs", "fsspec", "s3fs", "h5py", "torch", "timm", "transformers",
    "peft", "accelerate", "ray", "openslide-python", "openslide-bin", "cucim-cu13", "tiffslide", "tifffile",
    "scikit-survival", "scikit-learn", "pandas", "pycocoevalcap",
)
_SECRET_PARTS = ("token", "secret", "password", "passwd", "credential", "api_key", "apikey", "access_key")
_SECRET_NAMES = ("key",)  # s3fs storage_options spell the access key id plain "key"
_TOKEN_SETTINGS = ("tokens", "max_new_tokens", "resampler_tokens", "new_tokens", "tokens_per_second")
_REPO_ROOT = Path(__file__).resolve().parents[1]


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def fingerprint(spec: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a fingerprint spec ({'encoder': {...}, 'tiling': {...}})."""
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def spec_differences(expected: Mapping[str, Any], found: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths where two specs differ, with both values: for a refusal message a user can act on."""
    out: list[str] = []
    for key in sorted(set(expected) | set(found)):
        path = f"{prefix}{key}"
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += spec_differences(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: store has {b!r}, this run has {a!r}")
    return out


def code_version() -> str:
    """git commit (+dirty) of the source tree when it is a checkout, else the installed version."""
    try:
        top = subprocess.run(["git", "-C", str(_REPO_ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        if Path(top).resolve() != _REPO_ROOT:  # a wheel installed into a venv inside some other repository
            raise subprocess.SubprocessError(f"{_REPO_ROOT} is not a slidecache checkout")
        head = subprocess.run(["git", "-C", str(_REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return f"git:{head}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"slidecache=={metadata.version('slidecache')}"
    except metadata.PackageNotFoundError:
        return UNKNOWN


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# user@ or user:password@ (a password may hold "/", as AWS secrets do; none holds "@")
URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^/@:\s]*:[^@\s]*|[^/@\s]+)@")


def redact_url_credentials(text: str) -> str:
    """'s3://KEY:SECRET@bucket/x' → 's3://<redacted>@bucket/x', anywhere in a string (argv, logs, URLs)."""
    return URL_USERINFO.sub(r"\1<redacted>@", text)


def scrub_secrets(obj: Any) -> Any:
    """Copy of a config with the values of secret-looking keys replaced, and credentials inside URLs
    (user:password@) removed from every string, so they never reach disk."""
    if isinstance(obj, Mapping):
        return {
            k: "<redacted>" if is_secret_setting(str(k)) and not isinstance(v, Mapping) else scrub_secrets(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v) for v in obj]
    if isinstance(obj, str):
        return redact_url_credentials(obj)
    if isinstance(obj, Path):
        return redact_url_credentials(str(obj))
    return obj


def is_secret_setting(name: str) -> bool:
    name = name.lower()
    if name in _TOKEN_SETTINGS:  # counts and grids of tokens, not credentials
        return False
    return name in _SECRET_NAMES or any(part in name for part in _SECRET_PARTS)


def provenance(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record every output folder carries: resolved config, code and package versions, when, where."""
    return {
        "created_at": utc_now(),
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "config": scrub_secrets(dict(config or {})),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def encoder_modules_loaded() -> list[str]:
    """Modules whose presence would mean the encoder was (or could have been) run in this process."""
    return sorted(m for m in sys.modules if m.split(".")[0] in ("extract", "timm"))

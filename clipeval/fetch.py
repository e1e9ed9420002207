"""Downloads of public prompt files: pinned by sha256, cached, never used when the hash is wrong.

The cache lives in ``$CLIPEVAL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/clipeval`` or
``~/.cache/clipeval``), never in site-packages or /tmp. ``CLIPEVAL_LIBRARY_MIRROR`` replaces the
public URL by ``<mirror>/<file name>`` for air-gapped machines; the mirror may be an http(s) or
file URL, or a plain folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from clipeval.errors import ClipevalError

TIMEOUT_S = 60


def cache_dir() -> Path:
    explicit = os.environ.get("CLIPEVAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipeval"


def source_url(name: str, url: str) -> str:
    mirror = os.environ.get("CLIPEVAL_LIBRARY_MIRROR", "").strip()
    if not mirror:
        return url
    if "://" not in mirror:
        return Path(mirror).expanduser().resolve().joinpath(name).as_uri()
    return mirror.rstrip("/") + "/" + urllib.parse.quote(name)


def fetch(name: str, url: str, sha256: str) -> Path:
    """Return a verified local copy of ``name``, downloading it on first use."""
    target = cache_dir() / "libraries" / sha256 / name
    if target.is_file() and _sha256(target) == sha256:
        return target
    src = source_url(name, url)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClipevalError(f"cannot create the cache folder {target.parent}: {err.strerror}") from err
    try:
        with urllib.request.urlopen(src, timeout=TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        mirror = os.environ.get("CLIPEVAL_LIBRARY_MIRROR", "").strip()
        if mirror:  # the mirror is set: say what it lacks, not to set it
            raise ClipevalError(
                f"could not get {name} from CLIPEVAL_LIBRARY_MIRROR={mirror} ({src}: {reason}); put the file "
                f"there (its source: {url}), or pass its path as the prompt library"
            ) from err
        raise ClipevalError(
            f"could not download {name} from {src} ({reason}); offline? set CLIPEVAL_LIBRARY_MIRROR "
            f"to a folder or URL holding {name}, or pass the file's path as the prompt library"
        ) from err
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ClipevalError(f"{name} from {src} has sha256 {got}, expected {sha256}; refusing to use it")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

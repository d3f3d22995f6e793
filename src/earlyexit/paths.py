"""Where earlyexit keeps its cache (models, readouts) and where it reads evaluation data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from platformdirs import user_cache_dir

from earlyexit.errors import EarlyExitError


def home() -> Path:
    """The cache root: $EARLYEXIT_HOME, else the user's cache dir."""
    env = os.environ.get("EARLYEXIT_HOME")
    root = Path(env).expanduser() if env else Path(user_cache_dir("earlyexit"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def data_root() -> Path:
    """Evaluation data: $EARLYEXIT_DATA, else ../shared/data next to the checkout (or cwd)."""
    env = os.environ.get("EARLYEXIT_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise EarlyExitError(f"EARLYEXIT_DATA={env} is not a directory; point it at the data")
        return path
    here = Path(__file__).resolve()
    candidates = [Path.cwd() / ".." / "shared" / "data", Path.cwd() / "shared" / "data"]
    candidates += [parent / ".." / "shared" / "data" for parent in here.parents]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    raise EarlyExitError(
        "evaluation data not found: set EARLYEXIT_DATA to the folder holding e.g. wikitext-2/"
    )


def data_file(*parts: str) -> Path:
    path = data_root().joinpath(*parts)
    if not path.exists():
        raise EarlyExitError(f"data file {path} is missing; check EARLYEXIT_DATA")
    return path


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place only when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Write to a temporary file next to `target`, then rename over it (no half-written files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()

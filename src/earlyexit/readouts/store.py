"""Save and load trained readouts: safetensors weights + JSON metadata, written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_dir, home
from earlyexit.readouts.readout import ExitReadout, LayerAdapter

FORMAT_VERSION = 1
WEIGHTS = "adapters.safetensors"
META = "readout.json"


def readout_dir(engine: LayerEngine, name: str = "default") -> Path:
    return home() / "readouts" / engine.loaded.name / name


def save_readout(readout: ExitReadout, path: Path, metadata: dict[str, Any]) -> Path:
    engine = readout.engine
    tensors = {
        f"{layer}.{key}": value.detach().contiguous().float()
        for layer, adapter in readout.adapters.items()
        for key, value in adapter.state_dict().items()
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "model": engine.loaded.name,
        "fingerprint": engine.fingerprint,
        "num_layers": engine.num_layers,
        "hidden_size": engine.hidden_size,
        "layers": readout.trained_layers,
        "rank": next((a.rank for a in readout.adapters.values()), None),
        **metadata,
    }
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2))
    return path


def read_metadata(path: Path) -> dict[str, Any]:
    meta_path = path / META
    if not meta_path.exists():
        raise EarlyExitError(f"no trained readout at {path}; run `earlyexit heads train` first")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EarlyExitError(f"{meta_path} is corrupt ({err}); train the readout again") from None


def load_readout(engine: LayerEngine, path: Path) -> ExitReadout:
    meta = read_metadata(path)
    if meta.get("fingerprint") != engine.fingerprint:
        raise EarlyExitError(
            f"readout at {path} was trained for model '{meta.get('model')}', not "
            f"'{engine.loaded.name}'; train one for this model with `earlyexit heads train`"
        )
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as err:  # safetensors raises several error types for bad files
        raise EarlyExitError(f"{path / WEIGHTS} is unreadable ({err}); train again") from None
    adapters = {}
    for layer in meta["layers"]:
        adapter = LayerAdapter(engine.hidden_size, meta.get("rank"))
        state = {
            k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(layer)
        }
        adapter.load_state_dict(state)
        adapters[int(layer)] = adapter.requires_grad_(False)
    readout = ExitReadout(engine, adapters)
    if meta.get("vocabulary"):
        readout.vocabulary = torch.tensor(meta["vocabulary"], dtype=torch.long)
    return readout


def default_readout(engine: LayerEngine, name: str = "default") -> ExitReadout:
    """The trained readout for this model if one was saved, else the plain logit lens."""
    path = readout_dir(engine, name)
    if (path / META).exists():
        return load_readout(engine, path)
    return ExitReadout(engine)

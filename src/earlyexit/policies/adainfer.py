"""AdaInfer (Fan et al., 2024): stop when a classic classifier on readout statistics says so.

A linear SVM (scikit-learn) is trained on a calibration split: for every example and layer,
the features of that layer's readout, labelled "stop" when that layer's prediction equals
the final layer's and stays equal at every deeper layer. At inference the first layer the
SVM calls "stop" is the exit. The trained stopper is a handful of numbers, saved as JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_file
from earlyexit.policies.base import FEATURES, ExitPolicy, readout_features


@dataclass
class AdaInferPolicy(ExitPolicy):
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    margin: float = 0.0  # stop when the SVM's decision value exceeds this
    min_layer: int = 1
    meta: dict = field(default_factory=dict)
    name = "adainfer"

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set(range(max(1, self.min_layer), num_layers))

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - torch.tensor(self.mean)) / torch.tensor(self.scale)
        return x @ torch.tensor(self.weights) + self.bias

    def should_exit(self, layer: int, logits: torch.Tensor, num_layers: int) -> torch.Tensor:
        return self.decision(readout_features(logits, layer, num_layers)) > self.margin

    def describe(self) -> dict:
        return {"name": self.name, "margin": self.margin, **self.meta}

    def save(self, path: Path) -> None:
        payload = {"format_version": 1, "features": list(FEATURES), **asdict(self)}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))

    @classmethod
    def load(cls, path: Path) -> AdaInferPolicy:
        try:
            payload = json.loads(Path(path).read_text())
            payload.pop("format_version")
            if payload.pop("features") != list(FEATURES):
                raise EarlyExitError(f"{path} was trained on other features; train it again")
            return cls(**payload)
        except FileNotFoundError:
            raise EarlyExitError(f"no AdaInfer stopper at {path}; train one first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise EarlyExitError(f"{path} is not an AdaInfer stopper ({err})") from None


def stop_labels(traces: torch.Tensor) -> torch.Tensor:
    """[N, L] bool: layer l's prediction equals the final one and stays so to the end."""
    preds = traces.argmax(-1)  # [N, L]
    agrees = preds == preds[:, -1:]
    # reverse cumulative AND: agree here and at every deeper layer
    return agrees.flip(1).int().cumprod(1).flip(1).bool()


def simulate_exits(policy: ExitPolicy, traces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit layer (1..L) and prediction per example, replaying a policy on recorded traces."""
    num, num_layers, _ = traces.shape
    exits = torch.full((num,), num_layers, dtype=torch.long)
    done = torch.zeros(num, dtype=torch.bool)
    check = policy.readout_layers(num_layers)
    for layer in range(1, num_layers):
        if check is not None and layer not in check:
            continue
        stop = policy.should_exit(layer, traces[:, layer - 1], num_layers) & ~done
        exits[stop] = layer
        done |= stop
    preds = traces[torch.arange(num), exits - 1].argmax(-1)
    return exits, preds


def calibrate_margin(
    policy: AdaInferPolicy, traces: torch.Tensor, tolerance: float, grid: int = 41
) -> float:
    """Smallest SVM margin whose exits agree with the final layer on >= 1 - tolerance of the
    calibration examples (CALM-style calibration: the paper's "stop" labels are noisy where
    early readouts predict one class for every input)."""
    final = traces[:, -1].argmax(-1)
    feats = torch.cat(
        [readout_features(traces[:, i], i + 1, traces.shape[1]) for i in range(traces.shape[1])]
    )
    values = policy.decision(feats)
    for margin in torch.quantile(values, torch.linspace(0.0, 1.0, grid)).tolist():
        policy.margin = margin
        _, preds = simulate_exits(policy, traces)
        if (preds == final).float().mean() >= 1 - tolerance:
            return margin
    return float(values.max())


def fit_adainfer(
    traces: torch.Tensor, c: float = 1.0, tolerance: float | None = 0.01
) -> AdaInferPolicy:
    """Train the stopper from calibration traces [N, L, C] (candidate logits per layer).

    With `tolerance`, the decision margin is then set on the same traces so that at most
    that fraction of exits disagree with the final layer; None keeps the SVM's own margin 0.
    """
    from sklearn.svm import LinearSVC

    num, num_layers, _ = traces.shape
    feats = torch.stack(
        [readout_features(traces[:, i], i + 1, num_layers) for i in range(num_layers - 1)], dim=1
    ).reshape(-1, len(FEATURES))
    labels = stop_labels(traces)[:, :-1].reshape(-1)
    if labels.all() or not labels.any():
        raise EarlyExitError("calibration traces have only one stop label; use more examples")
    x = feats.numpy().astype(np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-8
    svm = LinearSVC(C=c, class_weight="balanced", max_iter=20000)
    svm.fit((x - mean) / scale, labels.numpy())
    policy = AdaInferPolicy(
        mean=mean.tolist(),
        scale=scale.tolist(),
        weights=svm.coef_[0].tolist(),
        bias=float(svm.intercept_[0]),
        meta={"calibration_examples": num, "stop_rate": float(labels.float().mean())},
    )
    if tolerance is not None:
        policy.margin = calibrate_margin(policy, traces, tolerance)
        policy.meta["tolerance"] = tolerance
    return policy

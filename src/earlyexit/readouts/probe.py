"""Task probes: a per-layer linear classifier over a task's classes, distilled from the model.

The general readouts (adapter -> norm -> LM head) are trained on running text; on a prompted
classification task smollm2-135m's layers below ~22 still answer one class for every input
through them, although the class is linearly decodable from the residual stream much
earlier. A probe per layer, fitted by logistic regression (scikit-learn) on the last
position's RMS-normalised state of *unlabelled* training prompts to predict the final
layer's answer, reads it out there. It is the task-aware exit readout: a [C x H] matmul per
layer, cheaper than even a candidate-restricted LM-head readout.

Out-of-fold traces: calibration data for stoppers and RAEE must not be scored by a probe
that was fitted on the same prompts (it would look surer than it is on new inputs), so
`fit_task_probe` also returns every training prompt's logits from a probe that did not see
it (k-fold cross-fitting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_dir
from earlyexit.readouts.readout import ExitReadout, unit_rms

FORMAT_VERSION = 1


def _rms_normalise(hidden: torch.Tensor) -> torch.Tensor:
    return unit_rms(hidden.float())


class TaskProbe:
    """Exit readout for one task: a linear probe per layer 1..L-1 over the C classes; layer
    L (and any layer without a probe) is read by `base`, the general readout."""

    def __init__(
        self,
        base: ExitReadout,
        candidates: torch.Tensor,
        weight: torch.Tensor,  # [L-1, C, H]
        bias: torch.Tensor,  # [L-1, C]
        meta: dict | None = None,
    ) -> None:
        self.base, self.engine = base, base.engine
        self.candidates = candidates
        self.weight, self.bias = weight.float(), bias.float()
        self.meta = meta or {}

    @property
    def trained_layers(self) -> list[int]:
        return list(range(1, self.weight.shape[0] + 1))

    def logits(
        self, hidden: torch.Tensor, layer: int, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[rows, C] class logits from the output of `layer` (`token_ids` must be the
        candidates the probe was fitted for: a probe has no other vocabulary)."""
        if token_ids is not None and not torch.equal(token_ids, self.candidates):
            raise ValueError("a task probe reads only the candidates it was fitted for")
        if layer > self.weight.shape[0]:
            return self.base.logits(hidden, layer, self.candidates)
        x = _rms_normalise(hidden)
        return (x @ self.weight[layer - 1].T + self.bias[layer - 1]).to(hidden.dtype)

    def save(self, path: Path) -> Path:
        engine = self.engine
        meta = {
            "format_version": FORMAT_VERSION,
            "model": engine.loaded.name,
            "fingerprint": engine.fingerprint,
            "candidates": self.candidates.tolist(),
            **self.meta,
        }
        with atomic_dir(path) as tmp:
            save_file({"weight": self.weight, "bias": self.bias}, str(tmp / "probe.safetensors"))
            (tmp / "probe.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, base: ExitReadout, path: Path) -> TaskProbe:
        try:
            meta = json.loads((path / "probe.json").read_text())
            tensors = load_file(str(path / "probe.safetensors"))
        except FileNotFoundError:
            raise EarlyExitError(f"no task probe at {path}; fit one first") from None
        except Exception as err:  # json and safetensors raise several error types
            raise EarlyExitError(f"{path} holds no readable task probe ({err})") from None
        if meta.get("fingerprint") != base.engine.fingerprint:
            raise EarlyExitError(
                f"task probe at {path} was fitted for model '{meta.get('model')}', not "
                f"'{base.engine.loaded.name}'; fit one for this model"
            )
        candidates = torch.tensor(meta.pop("candidates"), dtype=torch.long)
        return cls(base, candidates, tensors["weight"], tensors["bias"], meta)


@dataclass
class ProbeFit:
    probe: TaskProbe
    traces: torch.Tensor  # [N, L, C] out-of-fold logits for the training prompts
    teacher: torch.Tensor  # [N] the final layer's class per training prompt


def _fit_layer(x: np.ndarray, y: np.ndarray, classes: int, c: float) -> tuple[np.ndarray, ...]:
    """Standardised multinomial logistic regression, folded back into one affine map."""
    from sklearn.linear_model import LogisticRegression

    weight = np.zeros((classes, x.shape[1]))
    bias = np.full(classes, -1e4)  # a class never seen in training is never predicted
    present = np.unique(y)
    if len(present) == 1:
        bias[present[0]] = 0.0
        return weight, bias
    mean, scale = x.mean(0), x.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit((x - mean) / scale, y)
    coef, intercept = model.coef_, model.intercept_
    if len(present) == 2:  # sklearn keeps one row for two classes: logit of the second
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    folded = coef / scale
    bias[present] = intercept - folded @ mean
    weight[present] = folded
    return weight, bias


def fit_task_probe(
    base: ExitReadout,
    states: torch.Tensor,
    candidates: torch.Tensor,
    c: float = 0.05,
    folds: int = 5,
    seed: int = 0,
) -> ProbeFit:
    """Fit probes on last-position states [N, L, H] of unlabelled training prompts.

    Targets are the final layer's answers (distillation: an exit should say what the full
    model says); gold labels are never used, so any unlabelled prompts will do.
    """
    num, num_layers, _ = states.shape
    if num < 2 * folds:
        raise EarlyExitError(f"fitting a task probe needs at least {2 * folds} prompts, got {num}")
    final = base.logits(states[:, -1], num_layers, candidates).float()
    teacher = final.argmax(-1)
    classes = len(candidates)
    y = teacher.numpy()
    x_all = _rms_normalise(states[:, :-1]).numpy().astype(np.float64)
    order = np.random.default_rng(seed).permutation(num)
    fold_of = np.empty(num, dtype=int)
    fold_of[order] = np.arange(num) % folds
    traces = torch.zeros(num, num_layers, classes)
    traces[:, -1] = final
    weight = torch.zeros(num_layers - 1, classes, states.shape[-1])
    bias = torch.zeros(num_layers - 1, classes)
    for layer in range(num_layers - 1):
        x = x_all[:, layer]
        for fold in range(folds):
            held = fold_of == fold
            w, b = _fit_layer(x[~held], y[~held], classes, c)
            traces[held, layer] = torch.from_numpy(x[held] @ w.T + b).float()
        w, b = _fit_layer(x, y, classes, c)
        weight[layer], bias[layer] = torch.from_numpy(w), torch.from_numpy(b)
    meta = {"examples": num, "c": c, "folds": folds, "target": "final-layer answer"}
    return ProbeFit(TaskProbe(base, candidates, weight, bias, meta), traces, teacher)

"""Run lm-evaluation-harness tasks through earlyexit, with the local ee_* task configs.

The harness loads datasets from the Hugging Face Hub by default; the ee_* configs (in
tasks/, shipped with the package) point its own loaders at the evaluation files under
EARLYEXIT_DATA instead. They are rendered with that folder's path into a temporary
directory handed to the harness's TaskManager (`include_path`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_file, data_root

TASK_DIR = Path(__file__).parent / "tasks"
LOCAL_TASKS = tuple(sorted(p.stem for p in TASK_DIR.glob("ee_*.yaml")))


def render_tasks(dest: Path, data: Path | None = None) -> Path:
    """The ee_* configs with `{data}` replaced by the evaluation data folder, in `dest`."""
    data = (data or data_root()).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASK_DIR / "utils.py", dest / "utils.py")
    for path in TASK_DIR.glob("ee_*.yaml"):
        (dest / path.name).write_text(path.read_text().replace("{data}", str(data)))
    return dest


def run_harness(
    model: str,
    method: str,
    tasks: Sequence[str],
    limit: int | None = None,
    output: Path | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    score_layer: int | None = None,
    lm: Any = None,
    score_exit: str | None = None,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` on `tasks` (ee_* configs or any task the harness knows)
    with earlyexit as the model; the harness's results dict, also written to `output`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from earlyexit.harness.lm import EarlyExitLM

    if not tasks:
        raise EarlyExitError(f"name at least one task (local ones: {', '.join(LOCAL_TASKS)})")
    lm = lm or EarlyExitLM(
        model,
        method=method,
        dtype=dtype,
        batch_size=batch_size,
        score_layer=score_layer,
        score_exit=score_exit,
    )
    with tempfile.TemporaryDirectory(prefix="earlyexit-tasks-") as tmp:
        manager = TaskManager(include_path=str(render_tasks(Path(tmp))))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise EarlyExitError(
                f"unknown harness task '{unknown[0]}'; local ones: {', '.join(LOCAL_TASKS)}"
            )
        results = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            limit=limit,
            num_fewshot=num_fewshot,
            task_manager=manager,
            apply_chat_template=apply_chat_template,
            log_samples=False,
        )
    results = json.loads(json.dumps(results, default=str))  # what the harness itself writes
    results["earlyexit"] = {
        "model": lm.ee.name,
        "weights": lm.engine.weights,
        "method": lm.method,
        "score_layer": lm.score_layer,
        "score_exit": {
            "requests": len(lm.exit_layers),
            "mean_layer": sum(lm.exit_layers) / len(lm.exit_layers),
        }
        if lm.exit_layers
        else None,
        "generation": lm.generation_summary(),
    }
    if output is not None:
        with atomic_file(output) as tmp_path:
            tmp_path.write_text(json.dumps(results, indent=1))
    return results

"""Prompted classification and multiple choice on a causal LM: built-in and custom tasks."""

from earlyexit.tasks.base import Example, Task, seeded_split
from earlyexit.tasks.builtin import TASKS, get_task
from earlyexit.tasks.custom import load_custom_task
from earlyexit.tasks.metrics import compute_metric

__all__ = [
    "TASKS",
    "Example",
    "Task",
    "compute_metric",
    "get_task",
    "load_custom_task",
    "seeded_split",
]

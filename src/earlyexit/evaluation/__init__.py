"""Evaluation: run exit policies on tasks, measure quality, depth and wall-clock time."""

"""earlyexit inside EleutherAI's lm-evaluation-harness: the `earlyexit` model (lm.py) and
local task configs for the evaluation data folder (tasks/, run.py). Needs `lm-eval`
(the `harness` extra); importing this package registers the model with the harness."""

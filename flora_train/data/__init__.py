"""Loading per-user examples, tokenisation, the user-aware batch planner, synthetic tasks."""

from flora_train.data.loading import BadRows, Columns, DataError, load_examples
from flora_train.data.planner import BatchPlanner, StepPlan
from flora_train.data.synthetic import SyntheticTask
from flora_train.data.tokenize import IGNORE, collate, tokenize_examples

__all__ = [
    "IGNORE",
    "BadRows",
    "BatchPlanner",
    "Columns",
    "DataError",
    "StepPlan",
    "SyntheticTask",
    "collate",
    "load_examples",
    "tokenize_examples",
]

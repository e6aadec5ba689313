"""The adapter parameter server: registry, rows, row-wise optimizer. Knows nothing of models."""

from flora_train.store.optimizers import OptimizerHyper, RowOptimizer, make_optimizer
from flora_train.store.registry import UserRegistry
from flora_train.store.store import AdapterStore, StepRows

__all__ = ["AdapterStore", "OptimizerHyper", "RowOptimizer", "StepRows", "UserRegistry", "make_optimizer"]

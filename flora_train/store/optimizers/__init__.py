"""Row-wise sparse optimizers, one file each: state per row, updates only the rows they are given.

``OPTIMIZERS`` is the one registry: the recipe's ``store.optimizer.name`` values
(``config.choices.OptimizerName``) are its keys. The update of one row is ``torch.optim.AdamW`` /
``Adagrad`` (``fused=True``) on a dense parameter holding that row alone, run through their public
functional forms on the rows where they live; ``rowwise_adagrad`` is TorchRec's.
"""

from __future__ import annotations

from flora_train.store.optimizers.adagrad import Adagrad
from flora_train.store.optimizers.adamw import AdamW
from flora_train.store.optimizers.base import (STATE_DTYPES, OptimizerHyper, RowAccess, RowOptimizer,
                                               state_dtype_refusal)
from flora_train.store.optimizers.rowwise_adagrad import RowwiseAdagrad

OPTIMIZERS: dict[str, type[RowOptimizer]] = {o.name: o for o in (AdamW, Adagrad, RowwiseAdagrad)}


def make_optimizer(hyper: OptimizerHyper) -> RowOptimizer:
    try:
        kind = OPTIMIZERS[hyper.name]
    except KeyError:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {hyper.name!r}") from None
    return kind(hyper)


__all__ = ["OPTIMIZERS", "STATE_DTYPES", "OptimizerHyper", "RowAccess", "RowOptimizer", "make_optimizer",
           "state_dtype_refusal"]

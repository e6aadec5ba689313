"""A run directory: the only code that knows its layout on disk (``layout.py``), who may write it
(``lock.py``), which run it holds (``identity.py``), the checkpoint format (``checkpoints.py``), which
checkpoints readers beside a run are using (``readers.py``) and which exports are its (``exports.py``)."""

from flora_train.run_dir.layout import NotARunDir, RunDir
from flora_train.run_dir.lock import RunLock, RunLocked

__all__ = ["NotARunDir", "RunDir", "RunLock", "RunLocked"]

"""flora_train: joint fine-tuning of thousands of per-user adapters on one frozen base."""

__version__ = "0.1.0"

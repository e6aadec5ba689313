"""Training: the session (a run's pieces), the step, the loop over a plan, checkpoints and resume,
evaluation, and ``run_training``, which runs a recipe end to end."""

"""``python -m flora_train.cli``: what launchers (torchrun -m, deepspeed --module) run."""

import sys

from flora_train.cli.commands import main

sys.exit(main())

"""Worker started by torchrun in the distributed tests: runs each recipe (a list of overrides)
named in a JSON file, in order, in one process group, and leaves results in each run directory."""

import json
import sys

from flora_train.config import load_recipe
from flora_train.train.run import run_training


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    for overrides in spec["runs"]:
        run_training(load_recipe(None, overrides), resume=spec.get("resume", False))


if __name__ == "__main__":
    main()

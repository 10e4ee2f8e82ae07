# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv data data-multilabel demo demo-multilabel test test-fast test-long bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pip byte-compiles every installed file on one core; these machines set PYTHONDONTWRITEBYTECODE,
	# so that is the only bytecode cache there is. compileall does the same on every core.
	$(BIN)/python -m pip install --quiet --progress-bar off --no-compile -e '.[dev,plots,export,tracking]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python examples/make_digits_dataset.py --output examples/data/digits --size 32

# Build the digits data set, train the tutorial CNN, classify the held-out test folder, score it.
demo: data
	$(BIN)/python jobs/train.py --config examples/configs/digits.yaml
	rm -rf runs/digits/predictions
	$(BIN)/python jobs/predict.py --model runs/digits/model --input examples/data/digits/test \
		--output runs/digits/predictions
	$(BIN)/python examples/score_predictions.py --predictions runs/digits/predictions \
		--labelled examples/data/digits/test

data-multilabel: $(STAMP)
	$(BIN)/python examples/make_multilabel_dataset.py --output examples/data/digits_multilabel

# Multi-label: canvases of zero, one or two digits; train a sigmoid per digit, score the held-out
# canvases with the artifact's per-class thresholds.
demo-multilabel: data-multilabel
	$(BIN)/python jobs/train.py --config examples/configs/digits_multilabel.yaml
	$(BIN)/python jobs/evaluate.py --model runs/digits_multilabel/model \
		--data examples/data/digits_multilabel/test.csv --output runs/digits_multilabel/evaluation

# Three test processes, each module whole in one of them (its module fixtures made once; each process
# starts its own Ray and S3 endpoint when its tests need them): most of the suite waits on processes
# and clusters, not on the CPU. The modules that train go first, longest first (tests/conftest.py).
test: $(STAMP)
	$(BIN)/python -m pytest tests -m "not long" -n 3 --dist loadfile

# The scenarios too long for the suite's 20 minutes (see README, Development).
test-long: $(STAMP)
	$(BIN)/python -m pytest tests -m long

# The tests that need no Ray, S3 endpoint or cluster: a minute or two while you work.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not services"

bench: data
	$(BIN)/python bench/train_job.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/read_throughput.py
	$(BIN)/python bench/predict_throughput.py
	$(BIN)/python bench/export_time.py

clean:
	rm -rf runs bench/results .pytest_cache

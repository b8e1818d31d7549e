# The two set-up commands of the README. Both create .venv on a fresh machine.
#   make demo   install everything, generate a small phantom and run the pipeline on it
#   make test   install everything and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= smoulder-demo

.PHONY: install demo test lint validator browser
VALIDATOR := .ci/node_modules/.bin/bids-validator

# The pinned closure (.ci/lock_requirements.py writes it): CI, containers/build_rootfs.sh,
# containers/Dockerfile and containers/smoulder.def all install requirements/lock.txt.
LOCK := requirements/lock.txt requirements/test.txt

$(BIN)/smoulder: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of PyTorch first: a bare 'torch' requirement would pull a multi-GB CUDA build.
	# GPU users: install the torch build that matches your CUDA before 'make', it is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$$(grep '^torch==' requirements/lock.txt)"
	# everything else at the lock's pins; its torch line is left out so that the build above stays
	grep -hv '^torch==' $(LOCK) > $(VENV)/requirements.txt
	$(BIN)/pip install --quiet -r $(VENV)/requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip check
	touch $(BIN)/smoulder

install: $(BIN)/smoulder

demo: install
	$(BIN)/smoulder demo $(DEMO)

# The official BIDS validator (npm) checks the phantom in the test suite; skipped without npm.
# Installed from the committed lock file (npm ci): a fresh resolution depends on what the
# registry holds that day, and once failed for a version the lock does not need.
$(VALIDATOR): .ci/package.json .ci/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix .ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the BIDS-validator test will be skipped"; fi

validator: $(VALIDATOR)

# The report's browser test drives Debian's chromium through chromedriver (selenium);
# installed here when missing and apt is usable, otherwise that one test is skipped.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) || \
	  echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "chromium/chromedriver not found: the browser test will be skipped"; fi

test: install validator browser
	$(BIN)/python -m pytest -q --doctest-modules src tests

lint: install
	$(BIN)/ruff check src pipelines tests benchmarks

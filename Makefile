# Two entry points for a new user: `make demo` (the whole job on a small sample) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-gpu demo demo-smoke bench clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull the newest multi-GB build.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests README.md docs

test-gpu: $(STAMP)
	$(PY) -m pytest -q -ra -m gpu tests

demo: $(STAMP)
	$(VENV)/bin/nemo-curator-image demo --output demo_output

demo-smoke: $(STAMP)
	$(VENV)/bin/nemo-curator-image demo --output demo_output --smoke

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf demo_output .pytest_cache

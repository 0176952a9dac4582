# Two entry points on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/widenets demo --out demo-output

test: $(STAMP)
	$(VPY) -m ruff check src tests benchmarks
	$(VPY) -m pytest -q

lint: $(STAMP)
	$(VPY) -m ruff check src tests benchmarks

bench: $(STAMP)
	$(VPY) benchmarks/bench_kernels.py
	$(VPY) benchmarks/bench_conv.py
	$(VPY) benchmarks/bench_empirical.py
	$(VPY) benchmarks/bench_tiles.py

clean:
	rm -rf $(VENV) demo-output

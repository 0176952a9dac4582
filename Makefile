# Two entry points on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

.PHONY: demo test lint bench bench-peer clean

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
	$(VPY) benchmarks/bench_speed.py --float32
	$(VPY) benchmarks/bench_kernels.py
	$(VPY) benchmarks/bench_conv.py
	$(VPY) benchmarks/bench_empirical.py
	$(VPY) benchmarks/bench_tiles.py
	$(VPY) benchmarks/bench_heap.py

# Neural Tangents in its own environment, for the side-by-side comparison (issue 7).
$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet neural-tangents==0.6.5 'jax[cpu]==0.4.30'
	touch $(PEER_STAMP)

bench-peer: $(STAMP) $(PEER_STAMP)
	$(VPY) benchmarks/bench_peer.py --peer-python $(PEER_VENV)/bin/python

clean:
	rm -rf $(VENV) $(PEER_VENV) demo-output

# Two entry points on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

.PHONY: demo test lint docs bench bench-peer bench-fashion gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -c constraints.txt -e '.[all,dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/widenets demo --out demo-output

test: $(STAMP)
	$(VPY) -m ruff check --no-cache src tests benchmarks examples docs/conf.py
	$(VPY) -m mypy
	$(VPY) -m pytest -q

lint: $(STAMP)
	$(VPY) -m ruff check --no-cache src tests benchmarks examples docs/conf.py

# The documentation site, warnings as errors (-W) and every reference checked (-n):
# open docs/_build/html/index.html.
docs: $(STAMP)
	$(VPY) -m sphinx -b html -W --keep-going -n docs docs/_build/html

bench: $(STAMP)
	$(VPY) benchmarks/bench_speed.py --float32
	$(VPY) benchmarks/bench_kernels.py
	$(VPY) benchmarks/bench_conv.py
	$(VPY) benchmarks/bench_empirical.py
	$(VPY) benchmarks/bench_tiles.py
	$(VPY) benchmarks/bench_heap.py
	$(VPY) benchmarks/bench_rnn.py

# CUDA checks, ready for a machine with a GPU: the tests marked `cuda` (tests/test_cuda.py:
# every entry point on the GPU against the CPU), then the speed benchmark with its inputs
# on the GPU, then benchmarks/bench_gpu.py (CPU against GPU on larger workloads). Without a
# GPU (torch.cuda.is_available() is False) the tests are reported as
# skipped with that reason, the benchmark is left out and a message says so, and the exit
# status is 0: it is non-zero only when a test or the benchmark fails.
gpu-check: $(STAMP)
	$(VPY) -m pytest -m cuda -rs -q
	@if $(VPY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then \
		echo "$(VPY) benchmarks/bench_speed.py --device cuda --float32"; \
		$(VPY) benchmarks/bench_speed.py --device cuda --float32; \
		echo "$(VPY) benchmarks/bench_gpu.py"; \
		$(VPY) benchmarks/bench_gpu.py; \
	else \
		echo "gpu-check: no CUDA GPU found (torch.cuda.is_available() is False):" \
			"the CUDA tests were skipped and the GPU benchmark was not run"; \
	fi

# Neural Tangents in its own environment, for the side-by-side comparison.
$(PEER_STAMP):
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet neural-tangents==0.6.5 'jax[cpu]==0.4.30'
	touch $(PEER_STAMP)

bench-peer: $(STAMP) $(PEER_STAMP)
	$(VPY) benchmarks/bench_peer.py --peer-python $(PEER_VENV)/bin/python

# Full Fashion-MNIST, kernel to predictions, on disk (not part of make test; about an
# hour on 2 cores, 40 GB of disk under runs/); Debian's package holds the data set.
FASHION_MNIST = /usr/share/datasets/fashion-mnist
bench-fashion: $(STAMP)
	test -d $(FASHION_MNIST) || (apt-get update && apt-get install -y dataset-fashion-mnist)
	$(VPY) benchmarks/bench_fashion.py --folder $(FASHION_MNIST) --store runs/fashion-mnist

clean:
	rm -rf $(VENV) $(PEER_VENV) demo-output docs/_build

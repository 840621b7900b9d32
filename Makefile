# One command sets up and runs the demo, one sets up and runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build (any other version pulls GBs of CUDA)
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/poi simulate --out runs/demo --force \
	  --run-config "num-subscribers=10 num-server-rounds=10 attack=label-flip+collude attackers=1,4,7"
	$(BIN)/poi ledger verify runs/demo
	scripts/demo-buy.sh runs/demo
	$(BIN)/poi audit runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ledger.bench --out benchmarks/results
	$(BIN)/python -m benchmarks.strategy --out benchmarks/results/strategy
	$(BIN)/python -m benchmarks.market --out benchmarks/results/market
	$(BIN)/python -m benchmarks.inference --out benchmarks/results/inference

lint: $(STAMP)
	$(BIN)/python -m ruff check server client crypto ledger tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

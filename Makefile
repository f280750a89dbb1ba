# Switchboard: `make run` starts the gateway on its embedded default, `make test` runs
# everything against real PostgreSQL and Redis. Both set up what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard protos/switchboard/v1/*.proto)
GEN    := clients/python/switchboard/v1
GENSTAMP := $(GEN)/.generated-stamp

export SWITCHBOARD_TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/test
export SWITCHBOARD_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0

.PHONY: run test lint typecheck pytest proto install bench clean

run: $(GENSTAMP)
	$(BIN)/switchboard migrate
	$(BIN)/switchboard serve all --dev

test: lint typecheck pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "switchboard needs Python 3.11 or newer; $(PYTHON) is " + sys.version.split()[0] + " (try: make PYTHON=python3.11 ...)")'
	@# A venv left by an older Python (an earlier failed run) is made again, not reused.
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

proto: $(GENSTAMP)

# Generated code is not committed: it is rebuilt from protos/ whenever they change.
$(GENSTAMP): $(PROTOS) $(STAMP)
	rm -f $(GEN)/*_pb2.py $(GEN)/*_pb2.pyi $(GEN)/*_pb2_grpc.py $(GEN)/*_pb2_grpc.pyi
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=clients/python --pyi_out=clients/python \
	  --grpc_python_out=clients/python --mypy_grpc_out=quiet:clients/python $(PROTOS)
	touch $@

lint: $(GENSTAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(GENSTAMP)
	$(BIN)/mypy

pytest: $(GENSTAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(GENSTAMP)
	@for b in bench/*.py; do n=$$(basename $$b .py); [ "$$n" = "__init__" ] || [ "$$n" = "_common" ] || $(BIN)/python -m bench.$$n; done

clean:
	rm -rf $(VENV) $(GEN)/*_pb2* $(GENSTAMP) .pytest_cache .mypy_cache .ruff_cache

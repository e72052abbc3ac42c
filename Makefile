# dtsd developer tasks. `make` alone lists them.
#
# Production and `make test` use Debian's interpreter and Debian's python3-* packages;
# `make test-pypi` runs the same suite in a venv holding the newest PyPI releases.

SHELL := /bin/bash
.DEFAULT_GOAL := help
# Targets share the machine (apt, one PostgreSQL per suite): keep them in order.
.NOTPARALLEL:

PYTHON      ?= /usr/bin/python3
PYTEST_ARGS ?=
TESTS       ?= tests
VENV        ?= .venv-pypi
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEB_PACKAGES := \
	python3-grpcio python3-protobuf python3-redis python3-hiredis python3-psycopg \
	python3-psycopg-pool python3-etcd3 python3-croniter python3-daemon python3-sdnotify \
	python3-click python3-pytest python3-pytest-timeout python3-hypothesis python3-venv \
	python3-setuptools protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
	redis-server postgresql-15 etcd-server util-linux procps

PYPI_PACKAGES := \
	grpcio protobuf redis hiredis psycopg psycopg-pool croniter python-daemon sdnotify \
	click etcd3 pytest pytest-timeout hypothesis

PROTOS := \
	proto/dtsd/v1/dtsd.proto proto/dtsd/seed/scheduler.proto \
	proto/dtsd/health/health.proto proto/dtsd/reflection/reflection.proto
# Debian's protoc 3.21 and grpc_python_plugin 1.51: their stubs load on Debian 12's
# protobuf 4.21 and on PyPI's newer ones (PyPI's grpcio-tools output does not load on Debian 12).
PROTOC := protoc -Iproto -I/usr/include \
	--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin

.PHONY: help deps proto proto-check test test-pypi run bench clean

help: ## list the targets
	@echo "dtsd make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk -F':.*## ' '{ printf "  %-12s %s\n", $$1, $$2 }'
	@echo "Variables: TESTS=tests/test_config.py (default tests), PYTEST_ARGS='-k name -x'"

deps: ## install the Debian packages dtsd needs and tests use (only the missing ones)
	@# supervisor is for the tests only (tests/test_integration_managers.py). Installing it,
	@# redis-server, postgresql-15 or etcd-server on a host with a running init would start
	@# system daemons (a second supervisord, ...): a policy-rc.d that exits 101 forbids that
	@# for the install; it is created only if absent and removed again afterwards.
	@missing=""; \
	for pkg in $(DEB_PACKAGES) supervisor; do \
		status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
		[ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "deps: all Debian packages are installed"; \
	else \
		echo "deps: installing$$missing"; \
		policy=/usr/sbin/policy-rc.d; \
		if [ ! -e "$$policy" ]; then \
			trap '$(SUDO) rm -f "$$policy"' EXIT; \
			printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee "$$policy" >/dev/null && \
			$(SUDO) chmod 755 "$$policy" || exit 1; \
		fi; \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; \
	fi

proto: ## regenerate the committed gRPC stubs from proto/ with Debian's compilers
	$(PROTOC) --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

proto-check: ## fail if regenerating the stubs would change the committed ones
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p "$$tmp/generated" "$$tmp/committed"; \
	$(PROTOC) --python_out="$$tmp/generated" --pyi_out="$$tmp/generated" \
		--grpc_python_out="$$tmp/generated" $(PROTOS) || exit 1; \
	find dtsd -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) \
		-exec cp --parents {} "$$tmp/committed/" \; ; \
	if diff -r "$$tmp/committed" "$$tmp/generated"; then \
		echo "proto-check: committed stubs match proto/"; \
	else \
		echo "proto-check: committed stubs differ from proto/ (< committed, > generated); run 'make proto'" >&2; \
		exit 1; \
	fi

test: deps proto-check ## run the suite on Debian's Python and packages
	$(PYTHON) -m pytest -q $(TESTS) $(PYTEST_ARGS)

# The venv is (re)filled when pyproject.toml, setup.cfg or this Makefile change;
# `rm -rf $(VENV)` (or `make clean`) fetches the newest releases again.
$(VENV)/.stamp: pyproject.toml setup.cfg Makefile
	@[ -x "$(VENV)/bin/python" ] || $(PYTHON) -m venv "$(VENV)"
	@# A current pip and wheel first: Debian's bundled pip 23.0 would build sdists
	@# (etcd3, sdnotify) with the deprecated `setup.py install`.
	"$(VENV)/bin/python" -m pip install -qq --upgrade pip wheel
	"$(VENV)/bin/python" -m pip install -qq --upgrade $(PYPI_PACKAGES)
	@"$(VENV)/bin/python" -m pip list --format=freeze 2>/dev/null | \
		grep -iE '^(grpcio|protobuf|redis|hiredis|psycopg|psycopg-pool|croniter|python-daemon|sdnotify|click|etcd3|pytest|pytest-timeout|hypothesis)==' | \
		tr '\n' ' '; echo
	@touch "$@"

test-pypi: deps $(VENV)/.stamp ## run the suite on the newest PyPI releases (venv .venv-pypi)
	PYTHONPATH="$(CURDIR)" "$(VENV)/bin/python" -m pytest -q $(TESTS) $(PYTEST_ARGS)

run: deps ## run a private PostgreSQL + Redis under .run/ and dtsd in the foreground
	scripts/dev-run

bench: ## run the pipeline benchmark
	$(PYTHON) bench/pipeline.py

clean: ## remove .run/ (stopping its servers), the PyPI venv and caches
	@if [ -f .run/pg/postmaster.pid ]; then \
		echo "clean: stopping the PostgreSQL of .run/"; \
		if [ "$$(id -u)" = 0 ]; then \
			runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$(CURDIR)/.run/pg" -m fast -w stop || true; \
		else \
			/usr/lib/postgresql/15/bin/pg_ctl -D .run/pg -m fast -w stop || true; \
		fi; \
	fi
	@if [ -f .run/redis/redis.pid ]; then kill "$$(cat .run/redis/redis.pid)" 2>/dev/null || true; fi
	rm -rf .run "$(VENV)" .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +

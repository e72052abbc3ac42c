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
PEERS_VENV  ?= .venv-peers
BENCH_ARGS  ?=
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEB_PACKAGES := \
	python3-grpcio python3-protobuf python3-redis python3-hiredis python3-psycopg \
	python3-psycopg-pool python3-etcd3 python3-croniter python3-daemon python3-sdnotify \
	python3-click python3-aiohttp python3-prometheus-client python3-pytest \
	python3-pytest-timeout python3-hypothesis python3-venv \
	python3-setuptools protobuf-compiler protobuf-compiler-grpc libprotobuf-dev \
	redis-server postgresql-15 etcd-server util-linux procps prometheus python3-yaml \
	python3-jinja2 python3-selenium chromium chromium-driver

PYPI_PACKAGES := \
	grpcio protobuf redis hiredis psycopg psycopg-pool croniter python-daemon sdnotify \
	click etcd3 aiohttp prometheus-client jinja2 pytest pytest-timeout hypothesis pyyaml selenium

PROTOS := \
	proto/dtsd/v1/dtsd.proto proto/dtsd/seed/scheduler.proto \
	proto/dtsd/health/health.proto proto/dtsd/reflection/reflection.proto
# Debian's protoc 3.21 and grpc_python_plugin 1.51: their stubs load on Debian 12's
# protobuf 4.21 and on PyPI's newer ones (PyPI's grpcio-tools output does not load on Debian 12).
PROTOC := protoc -Iproto -I/usr/include \
	--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin

# bench-peers: the peers it measures dtsd against, newest of their major versions, and
# matplotlib for its chart. Only their workers and its chart run on this venv.
PEERS_PACKAGES := 'celery>=5,<6' 'dramatiq[redis]>=2,<3' redis matplotlib

# The .deb: built with dh + pybuild in build/deb/ (the man pages are generated from the
# click commands, hence click, grpcio and protobuf); tested in a booted Debian 12.
DEB_DIR          := build/deb
DEB_BUILD_DEPS   := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
	python3-click python3-grpcio python3-protobuf lintian
DEB_TEST_DEPS    := debootstrap systemd-container util-linux
DEB_LINT_DEPS    := systemd python3-click python3-grpcio python3-protobuf
# `systemd-analyze security` exposure, times ten: the unit must stay at 3.0 or below.
UNIT_EXPOSURE_MAX := 30
DEB_VERSION       = $(shell dpkg-parsechangelog -l packaging/debian/changelog -S Version)

# $(call apt-install-missing,PACKAGES): install those not installed yet, without letting
# their maintainer scripts start daemons (as in `deps`), and without leaving the services
# they enabled to start at boot (the ones enabled by this install are disabled again).
define apt-install-missing
	@missing=""; \
	for pkg in $(1); do \
		status=$$(dpkg-query -W -f='$${Status}' "$$pkg" 2>/dev/null || true); \
		[ "$$status" = "install ok installed" ] || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "all of these are installed:$(1)" | cut -c1-100; \
	else \
		echo "installing$$missing"; \
		policy=/usr/sbin/policy-rc.d; \
		if [ ! -e "$$policy" ]; then \
			trap '$(SUDO) rm -f "$$policy"' EXIT; \
			printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee "$$policy" >/dev/null && \
			$(SUDO) chmod 755 "$$policy" || exit 1; \
		fi; \
		enabled() { command -v systemctl >/dev/null && systemctl list-unit-files \
			--type=service --state=enabled --no-legend 2>/dev/null | awk '{print $$1}' | sort; }; \
		before=$$(enabled); \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing || exit 1; \
		new=$$(comm -13 <(echo "$$before") <(enabled) | tr '\n' ' '); \
		if [ -n "$${new// /}" ]; then \
			echo "not starting at boot what this install enabled: $$new(systemctl enable NAME undoes it)"; \
			$(SUDO) systemctl disable --quiet $$new 2>/dev/null || true; \
		fi; \
	fi
endef

.PHONY: help deps proto proto-check test test-pypi test-faults run bench bench-peers bench-scale clean deb lint-deb test-deb

help: ## list the targets
	@echo "dtsd make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | \
		awk -F':.*## ' '{ printf "  %-12s %s\n", $$1, $$2 }'
	@echo "Variables: TESTS=tests/test_config.py (default tests), PYTEST_ARGS='-k name -x'"

deps: ## install the Debian packages dtsd needs and tests use (only the missing ones)
	@# supervisor is for the tests only (tests/test_integration_managers.py), and so are
	@# prometheus, for its promtool, and python3-yaml (tests/test_monitoring_examples.py).
	@# Installing supervisor, prometheus, redis-server, postgresql-15 or etcd-server on a host
	@# with a running init would start system daemons (a second supervisord, a Prometheus
	@# on :9090, ...): a policy-rc.d that exits 101 forbids that for the install; it is
	@# created only if absent and removed again afterwards. Their packages also enable them
	@# at boot: the services this install enabled are disabled again (`systemctl enable
	@# --now NAME` if you want one as a system service).
	$(call apt-install-missing,$(DEB_PACKAGES) supervisor)

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

# The fault scenarios (tests/faults/) have a target of their own: `make test` and
# `make test-pypi` leave them out when they run the whole of tests/.
NO_FAULTS = $(if $(filter tests tests/,$(TESTS)),--ignore=tests/faults)

test: deps proto-check ## run the suite on Debian's Python and packages
	$(PYTHON) -m pytest -q $(TESTS) $(NO_FAULTS) $(PYTEST_ARGS)

test-faults: deps ## stores restarted, blackholed, slow; clock skew, OOM, failover, orphans (tests/faults)
	$(PYTHON) -m pytest -q tests/faults $(PYTEST_ARGS)

# The venv is (re)filled when pyproject.toml, setup.cfg or this Makefile change;
# `rm -rf $(VENV)` (or `make clean`) fetches the newest releases again.
$(VENV)/.stamp: pyproject.toml setup.cfg Makefile
	@[ -x "$(VENV)/bin/python" ] || $(PYTHON) -m venv "$(VENV)"
	@# A current pip and wheel first: Debian's bundled pip 23.0 would build sdists
	@# (etcd3, sdnotify) with the deprecated `setup.py install`.
	"$(VENV)/bin/python" -m pip install -qq --upgrade pip wheel
	"$(VENV)/bin/python" -m pip install -qq --upgrade $(PYPI_PACKAGES)
	@"$(VENV)/bin/python" -m pip list --format=freeze 2>/dev/null | \
		grep -iE '^(grpcio|protobuf|redis|hiredis|psycopg|psycopg-pool|croniter|python-daemon|sdnotify|click|etcd3|aiohttp|prometheus[-_]client|jinja2|pytest|pytest-timeout|hypothesis|pyyaml|selenium)==' | \
		tr '\n' ' '; echo
	@touch "$@"

test-pypi: deps $(VENV)/.stamp ## run the suite on the newest PyPI releases (venv .venv-pypi)
	PYTHONPATH="$(CURDIR)" "$(VENV)/bin/python" -m pytest -q $(TESTS) $(NO_FAULTS) $(PYTEST_ARGS)

run: deps ## run a private PostgreSQL + Redis under .run/ and dtsd in the foreground
	scripts/dev-run

bench: ## run the pipeline benchmark
	$(PYTHON) bench/pipeline.py

# Filled again when this Makefile changes; `rm -rf $(PEERS_VENV)` fetches the newest releases.
$(PEERS_VENV)/.stamp: Makefile
	@[ -x "$(PEERS_VENV)/bin/python" ] || $(PYTHON) -m venv "$(PEERS_VENV)"
	"$(PEERS_VENV)/bin/python" -m pip install -qq --upgrade pip wheel
	"$(PEERS_VENV)/bin/python" -m pip install -qq --upgrade $(PEERS_PACKAGES)
	@touch "$@"

bench-peers: $(PEERS_VENV)/.stamp ## dtsd beside Celery, Dramatiq and a bare Redis loop (BENCH_ARGS='--jobs 500 --runs 1')
	$(PYTHON) bench/peers.py --venv "$(PEERS_VENV)" $(BENCH_ARGS)

bench-scale: ## time GetJob, ListJobs, ClusterStatus and prune over 1,000,000 stored jobs
	$(PYTHON) bench/scale.py

deb: ## build build/deb/dtsd_<version>_all.deb from a clean export, then lintian
	$(call apt-install-missing,$(DEB_BUILD_DEPS))
	@set -euo pipefail; \
	version=$$(dpkg-parsechangelog -l packaging/debian/changelog -S Version); \
	upstream=$$($(PYTHON) -c 'import re; print(re.search(r"__version__ = \"(.+)\"", open("dtsd/__init__.py").read())[1])'); \
	if [ "$$version" != "$$upstream" ]; then \
		echo "deb: packaging/debian/changelog is at $$version, dtsd/__init__.py at $$upstream" >&2; exit 1; \
	fi; \
	tree="$(DEB_DIR)/dtsd-$$version"; \
	rm -rf "$(DEB_DIR)"; mkdir -p "$$tree"; \
	echo "deb: exporting the tracked and unignored files to $$tree (a clean clone: HEAD)"; \
	git ls-files -z --cached --others --exclude-standard | \
		while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done | \
		tar --null -T - -cf - | tar -xf - -C "$$tree"; \
	rm -rf "$$tree/debian"; \
	cp -a packaging/debian "$$tree/debian"; \
	cp packaging/systemd/dtsd.service "$$tree/debian/dtsd.service"; \
	(cd "$$tree" && env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		dpkg-buildpackage -us -uc -b); \
	deb="$(DEB_DIR)/dtsd_$${version}_all.deb"; \
	if dpkg-deb -f "$$deb" Depends Recommends | grep -w supervisor >/dev/null; then \
		echo "deb: the package must not depend on supervisor" >&2; exit 1; \
	fi; \
	echo "deb: lintian"; \
	lintian --fail-on error,warning --display-info --pedantic --tag-display-limit 0 \
		"$(DEB_DIR)/dtsd_$${version}_"*.changes; \
	echo "deb: lintian passed"; \
	ls -l "$$deb"; dpkg-deb -f "$$deb" Package Version Architecture Depends Recommends Suggests

lint-deb: ## check the systemd unit (verify, security exposure) and the dtsctl completions
	$(call apt-install-missing,$(DEB_LINT_DEPS))
	@set -euo pipefail; \
	unit=packaging/systemd/dtsd.service; \
	out=$$(systemd-analyze verify --man=no "$$unit" 2>&1 | \
		grep -v '^dtsd.service: Command /usr/bin/dtsd is not executable' || true); \
	if [ -n "$$out" ]; then echo "$$out" >&2; echo "lint-deb: systemd-analyze verify $$unit failed" >&2; exit 1; fi; \
	echo "lint-deb: systemd-analyze verify $$unit: clean (/usr/bin/dtsd comes with the package)"; \
	out=$$(SYSTEMD_COLORS=0 systemd-analyze security --offline=yes --threshold=$(UNIT_EXPOSURE_MAX) "$$unit" 2>&1) || \
		{ echo "$$out" >&2; echo "lint-deb: the unit's exposure is above $(UNIT_EXPOSURE_MAX)/10" >&2; exit 1; }; \
	echo "$$out" | grep -E '^(✗|-) |Overall exposure'; \
	for pair in bash:dtsctl zsh:_dtsctl fish:dtsctl.fish; do \
		shell=$${pair%%:*}; file=packaging/completion/$${pair#*:}; \
		expected=$$(_DTSCTL_COMPLETE=$${shell}_source $(PYTHON) -c 'from dtsd.cli import main; main()'); \
		if [ "$$shell" = bash ]; then actual=$$(grep -v '^#' "$$file"); else actual=$$(cat "$$file"); fi; \
		if [ "$$expected" != "$$actual" ]; then \
			echo "lint-deb: $$file differs from click's $${shell}_source; regenerate it (bash: below its comment):" >&2; \
			echo "  _DTSCTL_COMPLETE=$${shell}_source $(PYTHON) -c 'from dtsd.cli import main; main()'" >&2; exit 1; \
		fi; \
		echo "lint-deb: $$file matches click's $${shell}_source"; \
	done

test-deb: deb lint-deb ## install, run, reload, kill and purge the .deb on systemd in a Debian 12 container
	$(call apt-install-missing,$(DEB_TEST_DEPS))
	$(SUDO) tests/deb/run-test.sh "$(DEB_DIR)/dtsd_$(DEB_VERSION)_all.deb"

clean: ## remove .run/ (stopping its servers), the PyPI and peers venvs and caches
	@# .run/pg may point to /var/tmp/dtsd-dev-HASH (scripts/dev-run, as root under /root).
	@if [ -f .run/pg/postmaster.pid ]; then \
		echo "clean: stopping the PostgreSQL of .run/"; \
		data=$$(readlink -f .run/pg); \
		if [ "$$(id -u)" = 0 ]; then \
			(cd "$$(dirname "$$data")" && runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$$data" -m fast -w stop) || true; \
		else \
			/usr/lib/postgresql/15/bin/pg_ctl -D "$$data" -m fast -w stop || true; \
		fi; \
	fi
	@if [ -f .run/redis/redis.pid ]; then kill "$$(cat .run/redis/redis.pid)" 2>/dev/null || true; fi
	@if [ -L .run/pg ]; then \
		case "$$(readlink .run/pg)" in /var/tmp/dtsd-dev-*/pg) rm -rf "$$(dirname "$$(readlink .run/pg)")";; esac; \
	fi
	rm -rf .run "$(VENV)" "$(PEERS_VENV)" .pytest_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +

# kernelscope: `make test`, `make demo` and `make lab` work on a fresh Debian 12 machine as root.
#
# setup = Debian packages (skipped when dpkg has them all) -> .venv with kernelscope editable
# and only Debian's `bcc` package linked in -> `kernelscope setup` (mount tracefs, link headers).
# The first two leave stamp files in the venv; the last runs every time because mounts do not
# survive a reboot (it takes a fraction of a second and says what it did).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
VENV_ABS := $(abspath $(VENV))
BIN := $(VENV_ABS)/bin
# Extra arguments for pytest, e.g. make test PYTEST_ARGS='-k doctor -x'
PYTEST_ARGS ?=

# Debian packages: BCC (Python bindings + library), headers for BCC, bpftool, and the CO-RE
# toolchain (clang, libbpf), and chromium for the browser test and static plots (Playwright and
# kaleido drive it; neither may download a browser), and bpftrace for %%bpftrace cells. BCC is
# not on PyPI; its PyPI namesakes are unrelated projects.
APT_PACKAGES := python3-bpfcc libbpfcc linux-headers-amd64 bpftool clang libbpf-dev gcc chromium bpftrace
DEBIAN_BCC := /usr/lib/python3/dist-packages/bcc

# named for the package list, so adding a package to it installs that package on a machine
# set up before
SYSTEM_STAMP := $(VENV_ABS)/.stamp-system-$(shell printf %s '$(APT_PACKAGES)' | sha256sum | cut -c1-12)
INSTALL_STAMP := $(VENV_ABS)/.stamp-install

.PHONY: help setup system venv test test-notebooks test-notebooks-live test-binder record-notebooks lint demo lab clean \
	check-libbpf-tools

help:
	@echo "make setup  - Debian packages, $(VENV), tracefs and kernel headers (needs root)"
	@echo "make test   - setup, then ruff + mypy, pytest with real eBPF, the notebooks live, and"
	@echo "              test-binder (the notebooks replayed)"
	@echo "make test-notebooks - the notebooks live, then replayed, in $(VENV)"
	@echo "make test-binder - the notebooks as Binder runs them: binder/ venv, replay, uid $(BINDER_UID)"
	@echo "make demo   - setup, then attach a real probe for a few seconds and summarize it"
	@echo "make lab    - setup, then JupyterLab on http://127.0.0.1:8888 in notebooks/"
	@echo "make lint   - ruff + mypy over kernelscope/"
	@echo "make record-notebooks - re-run the notebooks live, saving their captures for replay"
	@echo "make check-libbpf-tools [BCC=PATH] - run the real libbpf-tools through kernelscope, checked"
	@echo "make clean  - remove $(VENV) and caches"

setup: $(INSTALL_STAMP)
	$(BIN)/kernelscope setup

system: $(SYSTEM_STAMP)
venv: $(INSTALL_STAMP)

# apt-get runs only when a package is missing; the exact headers for the running kernel are
# added when the archive has them (Debian kernels), else linux-headers-amd64 is what BCC gets.
$(SYSTEM_STAMP):
	@mkdir -p $(VENV_ABS)
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "Debian packages present: $(APT_PACKAGES)"; \
	else \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update; \
		exact=linux-headers-$$(uname -r); \
		if apt-cache show "$$exact" >/dev/null 2>&1; then extra=$$exact; else extra=; fi; \
		apt-get install -y --no-install-recommends $(APT_PACKAGES) $$extra; \
	fi
	@touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV_ABS)

# Only Debian's `bcc` folder is linked into site-packages: adding all of dist-packages would
# shadow the venv's numpy/pandas with Debian's older builds.
$(INSTALL_STAMP): pyproject.toml $(SYSTEM_STAMP) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	ln -sfn $(DEBIAN_BCC) "$$site/bcc"; \
	echo "linked $$site/bcc -> $(DEBIAN_BCC)"
	$(BIN)/python -c 'import bcc, kernelscope; print("bcc", bcc.__version__, "imports in $(VENV)")'
	@touch $@

lint: $(INSTALL_STAMP)
	$(BIN)/ruff check kernelscope tests
	$(BIN)/mypy

# The notebooks (the teaching ones and widget-demo) run twice under nbval: live on this
# kernel, then replaying the captures committed beside them (what Binder does). Only cells
# marked NBVAL_CHECK_OUTPUT have their outputs compared; each notebook's assert cells check
# its claims.
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

# `make test` replays the notebooks once, as Binder does (test-binder: replay mode, no BPF, uid
# 65534, Binder's own venv), which holds everything a root replay in .venv would check;
# test-notebooks runs both live and replayed in .venv, for a quick look while writing one.
test: setup lint
	KERNELSCOPE_REQUIRE_BPF=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-notebooks-live
	$(MAKE) --no-print-directory test-binder

test-notebooks-live: setup
	@if [ -n "$(NOTEBOOKS)" ]; then \
		KERNELSCOPE_REQUIRE_BPF=1 $(BIN)/python -m pytest --nbval-lax -p no:cacheprovider $(NOTEBOOKS); \
	else echo "no notebooks yet"; fi

test-notebooks: test-notebooks-live
	@if [ -n "$(NOTEBOOKS)" ]; then \
		KERNELSCOPE_MODE=replay $(BIN)/python -m pytest --nbval-lax -p no:cacheprovider $(NOTEBOOKS); \
	fi

# What Binder runs, checked here: a venv of the system python with binder/requirements.txt
# alone (plus pytest and nbval), binder/postBuild run into it inside a copy of the
# repository's tracked files (as the working tree has them: `git add` a new capture for the
# check to see it), then every notebook under nbval through binder/start (replay mode) as
# uid 65534, who cannot read tracefs, /root or perhaps this checkout. The venv is cached in
# /var/tmp (readable by every user, kept across reboots) and rebuilt when
# binder/requirements.txt changes.
BINDER_PYTHON ?= /usr/bin/python3
BINDER_UID ?= 65534
BINDER_CACHE ?= /var/tmp/kernelscope-binder-$(shell printf %s '$(CURDIR)' | sha256sum | cut -c1-12)
BINDER_VENV := $(BINDER_CACHE)/venv
BINDER_STAMP := $(BINDER_VENV)/.stamp-binder
BINDER_TEST_PACKAGES := 'pytest>=8' 'nbval>=0.11'

$(BINDER_STAMP): binder/requirements.txt
	@if [ -e $(BINDER_CACHE) ] && [ "$$(stat -c %u $(BINDER_CACHE))" != "$$(id -u)" ]; then \
		echo "$(BINDER_CACHE) belongs to someone else: remove it or set BINDER_CACHE"; exit 1; fi
	rm -rf $(BINDER_VENV)
	mkdir -p $(BINDER_CACHE) && chmod 755 $(BINDER_CACHE)
	$(BINDER_PYTHON) -m venv $(BINDER_VENV)
	$(BINDER_VENV)/bin/python -m pip install --quiet -r binder/requirements.txt $(BINDER_TEST_PACKAGES)
	@touch $@

test-binder: $(BINDER_STAMP)
	@if [ "$$(id -u)" != 0 ]; then echo "test-binder runs the notebooks as uid $(BINDER_UID): run it as root"; exit 1; fi
	@run=$$(mktemp -d); trap 'rm -rf "$$run"' EXIT; chmod 755 "$$run"; \
	mkdir "$$run/repo" "$$run/home" "$$run/tmp"; \
	git ls-files -z | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$$run/repo"; \
	echo "test-binder: postBuild in a copy of the tracked files at $$run/repo"; \
	(cd "$$run/repo" && PATH="$(BINDER_VENV)/bin:$$PATH" binder/postBuild) | tail -n 1; \
	chown -R $(BINDER_UID):$(BINDER_UID) "$$run/repo" "$$run/home" "$$run/tmp"; \
	echo "test-binder: the notebooks in replay mode as uid $(BINDER_UID)"; \
	cd "$$run/repo" && setpriv --reuid=$(BINDER_UID) --regid=$(BINDER_UID) --clear-groups \
		env -i HOME="$$run/home" TMPDIR="$$run/tmp" LANG=C.UTF-8 PATH="$(BINDER_VENV)/bin:/usr/bin:/bin" \
		binder/start python -m pytest --nbval-lax -p no:cacheprovider $(NOTEBOOKS)

# Re-run every notebook live, saving each named probe's capture and the outputs shown.
# nbconvert saves every widget's state in the notebook's metadata (5 MB for the live panel's
# plots); the committed notebooks keep the static outputs only.
export STRIP_WIDGET_STATE := import json, sys; p = sys.argv[1]; d = json.load(open(p)); \
	d["metadata"].pop("widgets", None); open(p, "w").write(json.dumps(d, indent=1, ensure_ascii=False) + "\n")

record-notebooks: setup
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		KERNELSCOPE_MODE=record $(BIN)/jupyter nbconvert --to notebook --execute --inplace "$$nb"; \
		$(BIN)/python -c "$$STRIP_WIDGET_STATE" "$$nb"; \
	done

# The real libbpf-tools (iovisor/bcc), run through kernelscope and checked against ground truth
# (README "Checking against libbpf-tools"). Not part of `test`: it needs the tools' sources,
# from BCC=PATH (a bcc checkout) or the fetched mirror. Exits 1 unless every tool passes.
BCC ?=
check-libbpf-tools: setup
	$(BIN)/python tools/libbpf_tools_check.py $(if $(BCC),--bcc $(BCC))

demo: setup
	$(BIN)/kernelscope demo

lab: setup
	cd notebooks && $(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --allow-root

clean:
	rm -rf $(VENV_ABS) $(BINDER_CACHE) build dist .pytest_cache .mypy_cache .ruff_cache
	find kernelscope tests -name __pycache__ -type d -prune -exec rm -rf {} +

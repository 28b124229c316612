# encfs-cloud: every target sets up what it needs from nothing on a Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := fuse3 libfuse3-dev pkg-config
# Real programs the end-to-end tests run on mounts (test_programs, test_gio, test_admin, test_acl).
TEST_APT_PACKAGES := restic borgbackup rsync git sqlite3 libglib2.0-bin gvfs dbus-daemon \
	util-linux man-db acl
DEMO_DIR ?= $(CURDIR)/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install apt test-apt venv demo demo-stop test test-fast lint stress bench install-system clean

install: apt $(BIN)/encfs-cloud

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

test-apt:
	@missing=""; for p in $(TEST_APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages for the tests:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(BIN)/encfs-cloud: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/encfs-cloud

demo: install
	@$(BIN)/python scripts/demo.py --dir "$(DEMO_DIR)"

demo-stop:
	@$(BIN)/python scripts/demo.py --dir "$(DEMO_DIR)" --stop

lint: install
	$(BIN)/ruff check encfs_cloud tests scripts
	$(BIN)/ruff format --check encfs_cloud tests scripts
	$(BIN)/mypy

test: install test-apt lint
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not fuse and not slow" tests

stress: install
	ENCFS_STRESS=1 $(BIN)/python -m pytest -q -m slow tests

bench: install
	$(BIN)/python scripts/bench.py --update-readme

install-system: install
	ln -sf $(CURDIR)/$(BIN)/mount.encfs-cloud /sbin/mount.encfs-cloud
	ln -sf $(CURDIR)/contrib/umount.fuse.encfs-cloud /sbin/umount.fuse.encfs-cloud
	ln -sf $(CURDIR)/$(BIN)/encfs-cloud /usr/local/bin/encfs-cloud

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# encfs-cloud: every target sets up what it needs from nothing on a Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Everything a fresh Debian lacks to build pyfuse3 and make a venv: a C compiler, Python's
# headers and venv module, pkg-config and libfuse3's headers; fuse3 for fusermount3.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv
# Real programs the end-to-end tests run on mounts (test_programs, test_gio, test_admin, test_acl).
TEST_APT_PACKAGES := restic borgbackup rsync git sqlite3 libglib2.0-bin gvfs dbus-daemon \
	util-linux man-db acl strace
DEMO_DIR ?= $(CURDIR)/demo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# `make install-system`: a self-contained install (its own venv, the package copied in, not
# linked to this clone), with links where mount(8), umount(8) and PATH look, and the man pages.
SYSTEM_PREFIX ?= /opt/encfs-cloud
BINDIR ?= /usr/local/bin
SBINDIR ?= /sbin
MANDIR ?= /usr/local/share/man

.PHONY: install apt test-apt venv demo demo-stop test test-fast lint stress bench install-system \
	uninstall-system clean

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

install-system: apt
	$(PYTHON) -m venv --clear $(SYSTEM_PREFIX)
	$(SYSTEM_PREFIX)/bin/pip install -q --upgrade pip
	$(SYSTEM_PREFIX)/bin/pip install -q $(CURDIR)
	install -m 0755 contrib/umount.fuse.encfs-cloud $(SYSTEM_PREFIX)/bin/umount.fuse.encfs-cloud
	install -d $(BINDIR) $(SBINDIR) $(MANDIR)/man1
	ln -sfn $(SYSTEM_PREFIX)/bin/encfs-cloud $(BINDIR)/encfs-cloud
	ln -sfn $(SYSTEM_PREFIX)/bin/mount.encfs-cloud $(SBINDIR)/mount.encfs-cloud
	ln -sfn $(SYSTEM_PREFIX)/bin/umount.fuse.encfs-cloud $(SBINDIR)/umount.fuse.encfs-cloud
	install -m 0644 docs/man/encfs-cloud.1 docs/man/mount.encfs-cloud.1 $(MANDIR)/man1/
	@echo "installed in $(SYSTEM_PREFIX); the clone may go"

uninstall-system:
	rm -f $(BINDIR)/encfs-cloud $(SBINDIR)/mount.encfs-cloud $(SBINDIR)/umount.fuse.encfs-cloud
	rm -f $(MANDIR)/man1/encfs-cloud.1 $(MANDIR)/man1/mount.encfs-cloud.1
	rm -rf $(SYSTEM_PREFIX)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

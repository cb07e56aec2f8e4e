#!/usr/bin/env bash
# Install fusesqlite and the system packages it needs, on Debian 12 or 13
# (README, "Supported systems"; scripts/test-on.sh runs this in a Debian 13 root).
#
#   bash scripts/install.sh          # system packages + `pip install .`
#   bash scripts/install.sh --test   # system packages + `pip install -e '.[test]'`
#
# Safe to run again (idempotent): apt only installs what is missing, pip
# re-installs the project in place. Needs no terminal (CI=true, no stdin).
#
# Runs as root; as another user, the steps that need root go through sudo.
#
# Which Python: the `python3` on PATH (e.g. pyenv's). If that interpreter is
# "externally managed" (PEP 668: the distribution's own /usr/bin/python3 on
# Debian 12 and 13 / Ubuntu 23.04+, where plain `pip install` is refused), we do not
# force it with --break-system-packages; instead we create a virtualenv at
# /opt/fusesqlite-venv (override: FUSESQLITE_VENV) and install there. Either way
# `fusesqlite` is linked into /usr/local/bin (override: FUSESQLITE_BINDIR), where
# the systemd unit scripts/fusesqlite@.service runs it. To run the tests with a
# venv, put it first on PATH:
#   . /opt/fusesqlite-venv/bin/activate
set -euo pipefail

usage() { echo "usage: $0 [--test]" >&2; exit 2; }
TEST=0
case $# in
    0) ;;
    1) [ "$1" = --test ] && TEST=1 || usage ;;
    *) usage ;;
esac

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FUSESQLITE_VENV:-/opt/fusesqlite-venv}
BINDIR=${FUSESQLITE_BINDIR:-/usr/local/bin}   # where the venv's `fusesqlite` is linked
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config python3-dev python3-pip python3-venv sqlite3 gcc liblz4-dev libxxhash-dev)
if [ "$TEST" -eq 1 ]; then
    # tests/test_conformance.py builds SQLite's testfixture from Debian's source package;
    # tests/test_real_programs.py runs fossil and CPython's own test_sqlite3 (which
    # Debian's python3 ships in a package of its own)
    # scripts/conformance.py records the revision tested (git describe)
    APT_PACKAGES+=(tcl-dev dpkg-dev make fossil git "libpython3.$(python3 -c 'import sys; print(sys.version_info.minor)' 2>/dev/null || echo 11)-testsuite")
fi

export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "install.sh: error: run as root (sudo is not available)" >&2
    exit 1
fi

# --- 1. system packages --------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
    echo "==> system packages already installed: ${APT_PACKAGES[*]}"
fi

# --- 2. the project --------------------------------------------------------
command -v python3 >/dev/null 2>&1 || { echo "install.sh: error: no python3 on PATH" >&2; exit 1; }
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "install.sh: error: fusesqlite needs Python >= 3.11, python3 is $(python3 -V 2>&1)" >&2
    exit 1
fi

# PEP 668: externally managed = not inside a venv and the stdlib directory
# holds an EXTERNALLY-MANAGED marker file.
externally_managed() {
    python3 - <<'EOF'
import os, sys, sysconfig
in_venv = sys.prefix != sys.base_prefix
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if (not in_venv and os.path.exists(marker)) else 1)
EOF
}

if [ "$TEST" -eq 1 ]; then
    TARGET=(-e "$REPO[test]")      # editable, so the tests run against the tree
else
    TARGET=("$REPO")
fi

if externally_managed; then
    echo "==> $(command -v python3) is externally managed (PEP 668): using the venv $VENV"
    if [ ! -x "$VENV/bin/python3" ]; then
        "${SUDO[@]}" "$(python3 -c 'import sys; print(sys.executable)')" -m venv "$VENV"
    fi
    PY=("${SUDO[@]}" "$VENV/bin/python3")
    "${PY[@]}" -m pip install -q --upgrade pip
    "${PY[@]}" -m pip install "${TARGET[@]}"
    "${SUDO[@]}" mkdir -p "$BINDIR"
    "${SUDO[@]}" ln -sfn "$VENV/bin/fusesqlite" "$BINDIR/fusesqlite"
    where="venv $VENV (fusesqlite linked into $BINDIR; tests: . $VENV/bin/activate)"
else
    PY=(python3)
    echo "==> pip install into $(python3 -c 'import sys; print(sys.prefix)')"
    "${PY[@]}" -m pip install "${TARGET[@]}"
    # pyenv only creates shims for new console scripts on rehash.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    # the systemd unit (scripts/fusesqlite@.service) runs $BINDIR/fusesqlite
    script="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/fusesqlite"
    if [ "$script" != "$BINDIR/fusesqlite" ] && { [ ! -e "$BINDIR/fusesqlite" ] || [ -L "$BINDIR/fusesqlite" ]; }; then
        "${SUDO[@]}" mkdir -p "$BINDIR"
        "${SUDO[@]}" ln -sfn "$script" "$BINDIR/fusesqlite"
    fi
    where="$(python3 -c 'import sys; print(sys.executable)') ($BINDIR/fusesqlite -> $(readlink -f "$BINDIR/fusesqlite"))"
fi

extras=""; [ "$TEST" -eq 1 ] && extras=" [test], editable"
version=$(cd / && "${PY[@]}" -c 'from importlib.metadata import version; print(version("fusesqlite"))' 2>/dev/null || echo '?')
echo "installed: fusesqlite $version$extras into $where; apt: ${APT_PACKAGES[*]}"

#!/bin/sh
# Build SQLite's test harness, testfixture, from Debian's sqlite3 source package.
#
#     bench/build_testfixture.sh [CACHE_DIR [BUILD_DIR]]
#         CACHE_DIR  where the source is unpacked (default /var/tmp/fusesqlite-bench-cache)
#         BUILD_DIR  the out-of-tree build (default CACHE_DIR/sqlite3-testfixture); a
#                    directory that already holds a testfixture is used as it is
#
# Prints the path of the binary on its last line; its directory's Makefile names
# the source tree (TOP = ...), whose test/*.test files scripts/conformance.py runs.
# The build is cached: a second run only prints the path. Needs root
# (bench/debian_source.sh), gcc, make and tcl-dev. `configure --enable-all`
# matches the build SQLite's own release testing uses for testfixture.
set -eu
cache=${1:-/var/tmp/fusesqlite-bench-cache}
build=${2:-$cache/sqlite3-testfixture}
bin=$build/testfixture
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
for tool in gcc make; do
    command -v $tool >/dev/null || { echo "$tool not found: apt-get install gcc make tcl-dev" >&2; exit 1; }
done
[ -f /usr/lib/tclConfig.sh ] || ls /usr/lib/tcl8.*/tclConfig.sh >/dev/null 2>&1 \
    || { echo "tclConfig.sh not found: apt-get install tcl-dev" >&2; exit 1; }
src=$(sh "$(dirname "$0")/debian_source.sh" sqlite3 "$cache" | tail -n 1)
mkdir -p "$build"
cd "$build"
[ -f Makefile ] || "$src/configure" --enable-all >&2
make -j"$(nproc)" testfixture >&2
echo "$bin"

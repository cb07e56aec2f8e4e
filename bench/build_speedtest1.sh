#!/bin/sh
# Build SQLite's own speedtest1 benchmark from Debian's sqlite3 source package.
#
#     bench/build_speedtest1.sh [CACHE_DIR]     (default /var/tmp/fusesqlite-bench-cache)
#
# Prints the path of the binary on its last line. The binary is cached: a second
# run only prints the path. Needs root (bench/debian_source.sh), gcc and
# libsqlite3-dev. speedtest1.c is linked against the system libsqlite3 so that
# the program measures the same SQLite that applications on this machine use.
set -eu
cache=${1:-/var/tmp/fusesqlite-bench-cache}
bin=$cache/speedtest1
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
command -v gcc >/dev/null || { echo "gcc not found: apt-get install gcc libsqlite3-dev" >&2; exit 1; }
[ -f /usr/include/sqlite3.h ] || { echo "sqlite3.h not found: apt-get install libsqlite3-dev" >&2; exit 1; }
src=$(sh "$(dirname "$0")/debian_source.sh" sqlite3 "$cache" | tail -n 1)
gcc -O2 -o "$bin.tmp" "$src/test/speedtest1.c" -lsqlite3 -lm >&2
mv "$bin.tmp" "$bin"
echo "$bin"

#!/bin/sh
# Build SQLite's own speedtest1 benchmark from Debian's sqlite3 source package.
#
#     bench/build_speedtest1.sh [CACHE_DIR]     (default /var/tmp/fusesqlite-bench-cache)
#
# Prints the path of the binary on its last line. The binary is cached: a second
# run only prints the path. Needs root (apt-get update, a deb-src entry), gcc and
# libsqlite3-dev. speedtest1.c is linked against the system libsqlite3 so that
# the program measures the same SQLite that applications on this machine use.
set -eu
cache=${1:-/var/tmp/fusesqlite-bench-cache}
bin=$cache/speedtest1
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
for tool in gcc apt-get dpkg-source; do
    command -v $tool >/dev/null || { echo "$tool not found: apt-get install gcc dpkg-dev libsqlite3-dev" >&2; exit 1; }
done
[ -f /usr/include/sqlite3.h ] || { echo "sqlite3.h not found: apt-get install libsqlite3-dev" >&2; exit 1; }
mkdir -p "$cache"
cd "$cache"

if ! ls sqlite3-*/test/speedtest1.c >/dev/null 2>&1; then
    # Source entries mirroring the binary ones this machine already uses.
    if ! grep -rqs '^\(Types:.*deb-src\|deb-src\)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        if [ -f /etc/apt/sources.list.d/debian.sources ]; then
            sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
                > /etc/apt/sources.list.d/fusesqlite-bench-deb-src.sources
        elif grep -qs '^deb ' /etc/apt/sources.list; then
            sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/fusesqlite-bench-deb-src.list
        else
            . /etc/os-release
            echo "deb-src http://deb.debian.org/debian $VERSION_CODENAME main" \
                > /etc/apt/sources.list.d/fusesqlite-bench-deb-src.list
        fi
    fi
    apt-get update -qq >&2
    apt-get source -qq sqlite3 >&2   # downloads and unpacks (dpkg-source, from dpkg-dev)
fi
src=$(ls sqlite3-*/test/speedtest1.c | head -n 1)
gcc -O2 -o "$bin.tmp" "$src" -lsqlite3 -lm >&2
mv "$bin.tmp" "$bin"
echo "$bin"

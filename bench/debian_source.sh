#!/bin/sh
# Unpack a Debian source package into a cache directory, once.
#
#     bench/debian_source.sh PACKAGE [CACHE_DIR]     (default /var/tmp/fusesqlite-bench-cache)
#
# Prints the unpacked source directory on its last line. Needs root (apt-get
# update, a deb-src entry mirroring the binary ones) and dpkg-source (dpkg-dev).
# Used for inputs of the benchmark that Debian ships only as source: SQLite's
# speedtest1 and libfuse's example file systems.
set -eu
pkg=$1
cache=${2:-/var/tmp/fusesqlite-bench-cache}
for tool in apt-get dpkg-source; do
    command -v $tool >/dev/null || { echo "$tool not found: apt-get install dpkg-dev" >&2; exit 1; }
done
mkdir -p "$cache"
cd "$cache"
if ! ls -d "$pkg"-[0-9]*/ >/dev/null 2>&1; then
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
        apt-get update -qq >&2
    fi
    apt-get source -qq "$pkg" >&2 || { apt-get update -qq >&2 && apt-get source -qq "$pkg" >&2; }
fi
dir=$(ls -d "$pkg"-[0-9]*/ | head -n 1)
echo "$cache/${dir%/}"

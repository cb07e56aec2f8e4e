#!/bin/sh
# Build libfuse's own pass-through file system (example/passthrough_ll.c) from
# Debian's fuse3 source package: the benchmark's yardstick for what any FUSE file
# system can do on this machine (a C daemon that forwards each request to a local
# directory, with no store behind it).
#
#     bench/build_passthrough_ll.sh [CACHE_DIR]     (default /var/tmp/fusesqlite-bench-cache)
#
# Prints the path of the binary on its last line; cached like build_speedtest1.sh.
# Needs root (bench/debian_source.sh), gcc, pkg-config and libfuse3-dev.
set -eu
cache=${1:-/var/tmp/fusesqlite-bench-cache}
bin=$cache/passthrough_ll
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
command -v gcc >/dev/null || { echo "gcc not found: apt-get install gcc pkg-config libfuse3-dev" >&2; exit 1; }
flags=$(pkg-config --cflags --libs fuse3) || { echo "fuse3.pc not found: apt-get install pkg-config libfuse3-dev" >&2; exit 1; }
src=$(sh "$(dirname "$0")/debian_source.sh" fuse3 "$cache" | tail -n 1)
# shellcheck disable=SC2086 # pkg-config's flags are words
gcc -O2 -DHAVE_POSIX_FALLOCATE -o "$bin.tmp" "$src/example/passthrough_ll.c" $flags >&2
mv "$bin.tmp" "$bin"
echo "$bin"

#!/usr/bin/env bash
# Install fusesqlite and run its tests on another Debian release, in a root of
# that release's own packages (debootstrap) on this machine.
#
#   bash scripts/test-on.sh RELEASE [PYTEST ARGS...]   # RELEASE: bookworm or trixie
#   e.g. bash scripts/test-on.sh trixie                 # the README's test command
#        bash scripts/test-on.sh trixie -m "not slow" -x
#
# What it does, as root:
#   1. builds the root under $FUSESQLITE_ROOTS/RELEASE (default /var/tmp/fusesqlite-roots)
#      with debootstrap from $DEBIAN_MIRROR (default http://deb.debian.org/debian), or
#      reuses the one a previous run built (delete the directory to start afresh);
#   2. gives it Debian's sources for the release (deb and deb-src: the conformance test
#      builds SQLite from Debian's source package), this machine's CA certificates, DNS
#      and pip configuration (/etc/pip.conf, ~/.config/pip, ~/.pip, PIP_* variables;
#      local directories they name, such as find-links or file:// indexes, are bound
#      in read-only);
#   3. binds /dev, /dev/pts, /proc and /sys in (FUSE needs /dev/fuse; unbound on exit);
#   4. copies the repository's committed HEAD (git archive: commit what you want tested)
#      to /src/fusesqlite in the root, and there runs
#      `bash scripts/install.sh --test && python3 -m pytest -q`, as .ci/run does.
#
# Takes minutes: not part of CI. The results for each release are in README.md
# ("Supported systems"). Exit code: pytest's.
set -euo pipefail

usage() { echo "usage: $0 bookworm|trixie [PYTEST ARGS...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
RELEASE=$1; shift
case $RELEASE in bookworm|trixie) ;; *) usage ;; esac
[ "$(id -u)" -eq 0 ] || { echo "test-on.sh: error: run as root (debootstrap, chroot and mounts need it)" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOTS=${FUSESQLITE_ROOTS:-/var/tmp/fusesqlite-roots}
ROOT=$ROOTS/$RELEASE
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
DONE=$ROOT/.fusesqlite-root-complete
export DEBIAN_FRONTEND=noninteractive

# --- 1. the root ------------------------------------------------------------
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "==> apt-get install debootstrap"
    apt-get install -y -q debootstrap
fi
if [ ! -e "$DONE" ]; then
    echo "==> debootstrap $RELEASE into $ROOT (from $MIRROR)"
    rm -rf "$ROOT"
    mkdir -p "$ROOTS"
    debootstrap --variant=minbase --include=ca-certificates,python3,sudo "$RELEASE" "$ROOT" "$MIRROR"
    touch "$DONE"
else
    echo "==> reusing $ROOT (built $(date -r "$DONE" '+%F %T'))"
fi

# --- 2. configuration copied in ---------------------------------------------------
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb deb-src
URIs: $MIRROR
Suites: $RELEASE $RELEASE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: $SECURITY_MIRROR
Suites: $RELEASE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
mkdir -p "$ROOT/etc/ssl/certs" "$ROOT/usr/local/share/ca-certificates"
cp -a /etc/ssl/certs/. "$ROOT/etc/ssl/certs/"
[ -d /usr/local/share/ca-certificates ] && cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
pip_files=()
for f in /etc/pip.conf "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [ -f "$f" ] || continue
    dest=$ROOT${f/#$HOME//root}
    mkdir -p "$(dirname "$dest")"
    cp "$f" "$dest"
    pip_files+=("$f")
done
pip_env=()
while IFS= read -r name; do pip_env+=("$name=${!name}"); done < <(compgen -e | grep '^PIP_' || true)

# --- 3. mounts (undone on exit, whatever happens) ------------------------------------
mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
        umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true
    done
}
trap cleanup EXIT
bind() {  # bind SRC [ro]: SRC at the same path inside the root
    local src=$1 dest=$ROOT$1
    mountpoint -q "$dest" && return 0
    mkdir -p "$dest"
    mount --bind "$src" "$dest"
    mounted+=("$dest")
    [ "${2:-}" = ro ] && mount -o remount,bind,ro "$dest"
    return 0
}
for d in /dev /dev/pts /dev/shm /proc /sys; do bind "$d"; done
# local directories pip's configuration names (find-links; file:// indexes: the
# directory that holds simple/, whose pages may link to files beside it)
for dir in $( { cat "${pip_files[@]}" /dev/null; printf '%s\n' "${pip_env[@]}"; } \
        | grep -oE '(file://)?/[^[:space:]"]+' | sed -e 's|^file://||' -e 's|/simple/\?$||' | sort -u); do
    [ -d "$dir" ] || continue
    case $dir in /etc/*|/usr/*|/dev/*|/proc/*|/sys/*) continue ;; esac
    bind "$dir" ro
done

# --- 4. the project, installed and tested -------------------------------------------
rm -rf "$ROOT/src/fusesqlite"
mkdir -p "$ROOT/src/fusesqlite"
git -C "$REPO" archive --format=tar HEAD | tar -x -C "$ROOT/src/fusesqlite"
echo "==> $RELEASE: fusesqlite $(git -C "$REPO" rev-parse --short HEAD) in $ROOT/src/fusesqlite"

# the command is run by bash inside the root; pytest's arguments follow it
inner='set -e
cd /src/fusesqlite
chroot_start=$(date +%s)
bash scripts/install.sh --test
# install.sh used a venv if python3 is externally managed (Debian 12 and 13 are)
[ -x /opt/fusesqlite-venv/bin/python3 ] && . /opt/fusesqlite-venv/bin/activate
echo "==> $(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 -V), libfuse $(pkg-config --modversion fuse3), pyfuse3 $(python3 -c "import pyfuse3; print(pyfuse3.__version__)")"
rc=0
python3 -m pytest -q "$@" || rc=$?
echo "==> pytest exit code $rc after $(( $(date +%s) - chroot_start )) s in all"
exit $rc'
rc=0
chroot "$ROOT" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" CI=true LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pip_env[@]}" \
    bash -c "$inner" test-on "$@" || rc=$?
echo "==> test-on.sh $RELEASE: exit code $rc"
exit "$rc"

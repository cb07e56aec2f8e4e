#!/usr/bin/env bash
# Provision a Debian 12 (or Ubuntu, amd64) machine to run the whole fusesqlite
# test suite, FoundationDB backend included:
#   1. FoundationDB server + client from the official release packages,
#      pinned to a 7.3 release (the pip bindings are pinned to >=7.3,<7.4;
#      any 7.3.x libfdb_c serves their API version 730);
#   2. fuse3, build tools and the project (scripts/install.sh --test);
#   3. the test suite (.ci/run) with FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster.
#
# The Vagrantfile runs it as `bash /vagrant/scripts/provision-vagrant.sh`; by
# hand, on any such machine, as root:  bash scripts/provision-vagrant.sh
# Idempotent: a second run skips what is already installed and re-runs the tests.
set -euo pipefail

# 7.3.62: the newest 7.3 release built for any x86-64; the release packages from
# 7.3.63 on need AVX2, which many VMs' virtual CPUs lack (kvm64, some clouds)
FDB_VERSION=${FDB_VERSION:-7.3.62}
FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "provision-vagrant.sh: error: run as root" >&2
    exit 1
fi
arch=$(dpkg --print-architecture)
if [ "$arch" != amd64 ]; then
    echo "provision-vagrant.sh: error: the FoundationDB .deb packages used here are amd64 only (this is $arch)" >&2
    exit 1
fi

# --- 1. FoundationDB -----------------------------------------------------------
version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }
if version_at_least "$FDB_VERSION" 7.3.63 && ! grep -qw avx2 /proc/cpuinfo; then
    echo "provision-vagrant.sh: error: FoundationDB $FDB_VERSION needs a CPU with AVX2, which this one lacks;" \
         "run with FDB_VERSION=7.3.62" >&2
    exit 1
fi
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }
have_fdb=1
for pkg in foundationdb-clients foundationdb-server; do
    case "$(installed_version "$pkg")" in
        "$FDB_VERSION"|"$FDB_VERSION"-*) ;;
        *) have_fdb=0 ;;
    esac
done

if [ "$have_fdb" -eq 1 ]; then
    echo "==> FoundationDB $FDB_VERSION already installed"
else
    echo "==> installing FoundationDB $FDB_VERSION from github.com/apple/foundationdb/releases"
    apt-get update -q
    apt-get install -y -q ca-certificates curl
    cache=/var/cache/fusesqlite-fdb/$FDB_VERSION
    mkdir -p "$cache"
    base=https://github.com/apple/foundationdb/releases/download/$FDB_VERSION
    debs=()
    for pkg in foundationdb-clients foundationdb-server; do
        deb=${pkg}_${FDB_VERSION}-1_amd64.deb
        if [ ! -s "$cache/$deb" ]; then
            curl -fsSL --retry 5 -o "$cache/$deb.part" "$base/$deb"
            mv "$cache/$deb.part" "$cache/$deb"
        fi
        # Each release asset has a "<sha256>  <file>" companion: check against it.
        if curl -fsSL --retry 5 -o "$cache/$deb.sha256" "$base/$deb.sha256"; then
            expected=$(awk '{print $1; exit}' "$cache/$deb.sha256")
            actual=$(sha256sum "$cache/$deb" | awk '{print $1}')
            if [ "$expected" != "$actual" ]; then
                rm -f "$cache/$deb"
                echo "provision-vagrant.sh: error: $deb: sha256 $actual, expected $expected (deleted; run again)" >&2
                exit 1
            fi
        else
            echo "warning: no $deb.sha256 published; not verifying the checksum" >&2
        fi
        debs+=("$cache/$deb")
    done
    # apt (not dpkg -i) so dependencies are resolved; the server's postinst
    # writes $FDB_CLUSTER_FILE (127.0.0.1:4500), starts the service and, for a
    # new cluster file, runs `configure new single memory`.
    apt-get install -y -q --allow-downgrades "${debs[@]}"
fi

systemctl enable --now foundationdb.service >/dev/null 2>&1 || service foundationdb start

echo "==> waiting for the FoundationDB database to be available"
configured=0
for i in $(seq 1 60); do
    status=$(fdbcli -C "$FDB_CLUSTER_FILE" --exec 'status minimal' --timeout 5 2>&1 || true)
    if grep -q 'The database is available' <<<"$status"; then
        break
    fi
    # A cluster that was never configured (e.g. postinst timed out) stays
    # unavailable: configure it once, like the package would.
    if [ "$configured" -eq 0 ] && [ "$i" -ge 10 ]; then
        echo "    not available yet ($status); trying: configure new single memory"
        fdbcli -C "$FDB_CLUSTER_FILE" --exec 'configure new single memory' --timeout 20 || true
        configured=1
    fi
    if [ "$i" -eq 60 ]; then
        echo "provision-vagrant.sh: error: FoundationDB not available: $status" >&2
        exit 1
    fi
    sleep 2
done
fdbcli -C "$FDB_CLUSTER_FILE" --exec 'status minimal' --timeout 5

# --- 2 + 3. the project and its test suite ------------------------------------
# .ci/run = scripts/install.sh --test (apt: fuse3, libfuse3-dev, ...; pip
# install -e '.[test]', in /opt/fusesqlite-venv on Debian's PEP 668 python3)
# followed by `python3 -m pytest -q`.
echo "==> running the test suite (the store tests against FoundationDB: $FDB_CLUSTER_FILE)"
export FDB_CLUSTER_FILE
export CI=${CI:-true}
cd "$REPO"
bash .ci/run </dev/null
# again with every mount on the cluster: mounts, many mounts, crashes, big
# transactions (tests/conftest.py, FUSESQLITE_TEST_STORE)
echo "==> running the test suite with every mount on FoundationDB"
python=$(command -v python3)
[ -x /opt/fusesqlite-venv/bin/python3 ] && python=/opt/fusesqlite-venv/bin/python3
FUSESQLITE_TEST_STORE="fdb:$FDB_CLUSTER_FILE" "$python" -m pytest -q </dev/null
echo "==> provisioning done: FoundationDB $FDB_VERSION, fusesqlite installed, tests passed"

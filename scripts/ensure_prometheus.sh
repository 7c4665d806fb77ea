#!/bin/sh
# Install Debian's `prometheus` package (prometheus + promtool) when either is missing.
# The metrics tests start their own Prometheus; `make test` runs this first. Needs root and apt.
# ~22 MB download, ~330 MB on disk; about 16 s with the archives cached, longer on a cold mirror.
set -eu

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "ensure_prometheus: prometheus/promtool not on PATH; run as root (or: sudo apt-get install prometheus)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_prometheus: no apt-get here; install Prometheus 2.x so that prometheus and promtool are on PATH" >&2
    exit 1
fi

# The package's postinst starts a system Prometheus on :9090 where an init system lets it; the tests
# need none. Where no policy-rc.d exists, put one that refuses service starts for the install only.
POLICY=/usr/sbin/policy-rc.d
ADDED=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$POLICY"
    chmod 755 "$POLICY"
    ADDED=1
fi
cleanup() { if [ -n "$ADDED" ]; then rm -f "$POLICY"; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends prometheus
command -v prometheus >/dev/null && command -v promtool >/dev/null

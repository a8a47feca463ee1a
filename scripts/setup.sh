#!/usr/bin/env bash
# Take a fresh Debian 12 (bookworm) machine, as root, to a state where evictor
# runs and its tests pass: LXC, CRIU >= 4.2, iptables, a static busybox and a C
# compiler for the test workload, and a virtualenv (.venv) with evictor in it.
# Idempotent: a second run only checks. docs/design.md says why each piece is needed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EVICTOR_VENV:-$here/.venv}
python=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (LXC and CRIU need it)"
command -v apt-get >/dev/null || die "apt-get not found: a Debian 12 machine is required"

export DEBIAN_FRONTEND=noninteractive
bookworm_packages=(lxc lxc-dev lxc-templates busybox-static iptables gcc libc6-dev
                   pkg-config python3-venv python3-dev procps util-linux zstd)
missing=()
for p in "${bookworm_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get update"
    apt-get update -qq
    say "installing from bookworm: ${missing[*]}"
    # bookworm's packages go in first: installing forky's criu first pulls a
    # libxtables12 that bookworm's iptables and lxc-dev can no longer live beside.
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

criu_ok() {
    command -v criu >/dev/null || return 1
    dpkg --compare-versions "$(criu --version | sed -n 's/^Version: //p')" ge 4.2
}
add_forky() {
    # Pinned low, so that nothing else is upgraded from it.
    [ -f /etc/apt/sources.list.d/evictor-forky.sources ] && return
    say "adding Debian forky at pin priority 100"
    cat > /etc/apt/sources.list.d/evictor-forky.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: forky
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no
SRC
    cat > /etc/apt/preferences.d/evictor-forky <<'PIN'
Package: *
Pin: release n=forky
Pin-Priority: 100
PIN
    apt-get update -qq
}

if ! criu_ok; then
    # Kernels >= 6.13 need CRIU >= 4.1 (vDSO layout) and >= 6.16 need >= 4.2
    # (TCP socket options); bookworm has 3.17 and trixie 4.1: take forky's.
    add_forky
    say "installing criu from forky"
    apt-get install -y -qq --no-install-recommends -t forky criu >/dev/null
    criu_ok || die "criu >= 4.2 is still not installed ($(criu --version 2>&1 | head -1))"
fi
say "criu $(criu --version | sed -n 's/^Version: //p')"
if ! command -v promtool >/dev/null; then
    # Only for the tests of deploy/prometheus (bookworm ships it inside the
    # prometheus server package; forky has it on its own).
    add_forky
    say "installing promtool from forky"
    apt-get install -y -qq --no-install-recommends -t forky promtool >/dev/null
fi

say "criu check"
if ! out=$(criu check 2>&1); then
    die "'criu check' fails on this kernel ($(uname -r)): $(printf '%s' "$out" | tail -n 3 | tr '\n' ' ')"
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
say "installing evictor into $venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e "$here[test]"
"$venv/bin/python" -c 'import lxc, evictor' || die "evictor or the lxc binding does not import in $venv"
say "ready: $venv/bin/evictor"

#!/usr/bin/env bash
# Take a fresh Debian 12 (bookworm) or 13 (trixie) machine, as root, to a state
# where evictor runs and its tests pass: LXC, CRIU >= 4.2, iptables, nftables, a
# static busybox and a C compiler for the test workload, debootstrap and uidmap for the
# stock Debian test containers, root's subordinate ids for unprivileged ones,
# the lxcbr0 bridge for containers with a NIC, and a virtualenv (.venv) with
# evictor in it. Idempotent: a second run only checks. docs/design.md says why
# each piece is needed.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EVICTOR_VENV:-$here/.venv}
python=${PYTHON:-python3}

say() { printf '==> %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (LXC and CRIU need it)"
command -v apt-get >/dev/null || die "apt-get not found: a Debian 12 or 13 machine is required"

export DEBIAN_FRONTEND=noninteractive
# From the machine's own release (bookworm or trixie). debootstrap builds the
# stock test containers' rootfs (evictor/tools/stock.py); uidmap has the
# newuidmap/newgidmap that lxc-usernsexec needs to unpack an unprivileged one;
# iproute2 and dnsmasq-base are what lxc-net uses to make lxcbr0 and answer DHCP
# (lxc only recommends dnsmasq-base, and recommends are not installed here);
# nftables has the nft that removes the network lock of a CRIU killed mid-dump.
bookworm_packages=(lxc lxc-dev lxc-templates busybox-static iptables nftables gcc libc6-dev
                   pkg-config python3-venv python3-dev procps util-linux zstd
                   debootstrap uidmap iproute2 dnsmasq-base)
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

# Unprivileged test containers map their ids to 100000-165535 (lxc.idmap);
# lxc-usernsexec (newuidmap) unpacks their rootfs only within a range
# /etc/subuid and /etc/subgid grant root. A range root already has is kept.
for subid in /etc/subuid /etc/subgid; do
    touch "$subid"
    if ! grep -q '^root:' "$subid"; then
        say "granting root the ids 100000-165535 in $subid"
        echo 'root:100000:65536' >> "$subid"
    elif ! awk -F: '$1 == "root" && $2 <= 100000 && $2 + $3 >= 165536 { ok = 1 } END { exit !ok }' "$subid"; then
        say "warning: root's range in $subid does not cover 100000-165535: unprivileged test containers will fail"
    fi
done

# Test containers with a NIC sit on lxcbr0, the bridge lxc-net makes
# (10.0.3.1/24, its dnsmasq answering DHCP). DHCP leases from .100 up:
# 10.0.3.2-10.0.3.99 are left to the tests' static addresses. The bridge can
# outlive its dnsmasq (a machine whose processes were ended): then DHCP is
# silent, so a dead dnsmasq restarts lxc-net too.
dnsmasq_alive() {
    pid=$(cat /run/lxc/dnsmasq.pid 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
if ! ip link show lxcbr0 >/dev/null 2>&1 || ! dnsmasq_alive; then
    if ! grep -qs '^[[:space:]]*USE_LXC_BRIDGE="\{0,1\}true' /etc/default/lxc-net; then
        say "enabling lxc-net's bridge in /etc/default/lxc-net"
        # Appended: lxc-net sources the file, so these lines win over earlier ones.
        cat >> /etc/default/lxc-net <<'NET'
# Added by evictor's scripts/setup.sh: lxcbr0 for test containers with a NIC,
# DHCP from .100 up (10.0.3.2-10.0.3.99 are for static test addresses).
USE_LXC_BRIDGE="true"
LXC_DHCP_RANGE="10.0.3.100,10.0.3.254"
NET
    fi
    say "starting lxc-net (lxcbr0)"
    if [ -d /run/systemd/system ]; then
        # restart, not start: the unit may be "active" from a start that found
        # the bridge disabled and did nothing.
        systemctl restart lxc-net
    else
        # No systemd (as on these test machines): run the service's script. Its
        # stop clears a stale /run/lxc/network_up that would make start refuse.
        /usr/libexec/lxc/lxc-net stop >/dev/null 2>&1 || true
        /usr/libexec/lxc/lxc-net start
    fi
    ip link show lxcbr0 >/dev/null 2>&1 || die "lxc-net did not bring lxcbr0 up"
    dnsmasq_alive || die "lxc-net did not start dnsmasq: containers on lxcbr0 get no DHCP lease"
fi

if [ ! -x "$venv/bin/python" ]; then
    say "creating virtualenv $venv"
    "$python" -m venv "$venv"
fi
say "installing evictor into $venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
# "compat": the checkout on sys.path through a plain .pth line. The default mode's
# import hook costs every evictor command ~25 ms of start-up (docs/benchmarks.md).
"$venv/bin/pip" install -q -e "$here[test]" --config-settings editable_mode=compat 2>/dev/null ||
    "$venv/bin/pip" install -q -e "$here[test]"
"$venv/bin/python" -c 'import lxc, evictor' || die "evictor or the lxc binding does not import in $venv"
say "ready: $venv/bin/evictor"

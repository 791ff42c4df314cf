#!/usr/bin/env bash
# Installs the Debian packages vpcd, its demo and its tests need: QEMU 10 and libvirt 11 from
# bookworm-backports, plus the networking, storage and image-building tools.
# Idempotent: does nothing when everything is already there.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "install-deps.sh: no cargo; install Rust (rustup) first" >&2; exit 1; }

need=(qemu-system-x86_64 virsh libvirtd virtlogd dbus-daemon busctl xorriso cpio busybox
      qemu-img nft ip ethtool setpriv pkg-config syslinux mformat debugfs clang bpftool iperf3 dhclient
      dnsmasq vtysh jq conntrack nbdinfo nbdcopy nbdkit qemu-io qemu-nbd)
missing=0
for c in "${need[@]}"; do command -v "$c" >/dev/null 2>&1 || missing=1; done
[ -e /usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc ] || missing=1
[ -e /usr/include/bpf/bpf_helpers.h ] || missing=1
compgen -G '/boot/vmlinuz-*' >/dev/null || missing=1
# What cloud-init's metadata readers import (the tests unpack cloud-init itself, scripts/cloud-init-lib.sh).
/usr/bin/python3 -c 'import requests, yaml, jinja2, configobj, jsonpatch, jsonschema, netifaces' 2>/dev/null || missing=1
if [ "$missing" = 0 ]; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if [ ! -e /etc/apt/sources.list.d/backports.sources ]; then
    cat > /etc/apt/sources.list.d/backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -q
apt-get install -y -q -o Dpkg::Options::=--force-confold -t bookworm-backports \
    libvirt-daemon-system libvirt-clients libvirt-dev qemu-system-x86 qemu-utils
apt-get install -y -q -o Dpkg::Options::=--force-confold \
    dbus systemd util-linux nftables iproute2 iptables ethtool iputils-ping busybox-static linux-image-amd64 \
    xorriso cpio xz-utils e2fsprogs syslinux syslinux-common mtools pkg-config clang llvm libbpf-dev bpftool dnsmasq tcpdump iperf3 \
    isc-dhcp-client frr jq conntrack libnbd-bin nbdkit \
    python3-requests python3-yaml python3-jinja2 python3-configobj python3-jsonpatch python3-jsonschema \
    python3-netifaces python3-serial

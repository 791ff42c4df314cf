#!/usr/bin/env bash
# Unpacks Debian's cloud-init package (not installed: no units, nothing that runs at boot) into
# DIR, so the tests can use its EC2 and OpenStack metadata readers as real clients of vpcd's
# metadata service. Prints the directory to put on PYTHONPATH. Idempotent.
#   scripts/cloud-init-lib.sh DIR
set -euo pipefail
dir=$1
lib=$dir/usr/lib/python3/dist-packages
if [ ! -e "$lib/cloudinit/sources/helpers/openstack.py" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 1777 "$tmp" # apt downloads as _apt
    (cd "$tmp" && apt-get download -q cloud-init >/dev/null)
    rm -rf "$dir"
    mkdir -p "$dir"
    dpkg-deb -x "$tmp"/cloud-init_*.deb "$dir"
fi
echo "$lib"

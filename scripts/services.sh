#!/usr/bin/env bash
# Starts the services vpcd needs, by hand when the machine has no systemd: the system D-Bus,
# virtlogd and libvirtd. Idempotent: running services are left alone.
set -euo pipefail

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
    systemctl start dbus.service libvirtd.service
    exit 0
fi

mkdir -p /run/dbus
if ! dbus-send --system --dest=org.freedesktop.DBus --print-reply / org.freedesktop.DBus.GetId >/dev/null 2>&1; then
    rm -f /run/dbus/pid /run/dbus/system_bus_socket
    dbus-daemon --system --fork
fi
mkdir -p /run/libvirt
# Running, not a zombie (a daemon killed where nothing reaps it stays in the process table).
alive() { pgrep -x -r D,R,S,T "$1" >/dev/null; }
alive virtlogd || virtlogd -d
if ! alive libvirtd; then
    libvirtd -d
fi
# The first connection probes QEMU's capabilities (~8 s); wait until libvirtd answers. One
# that was shutting down when we looked (it can take half a minute) is started again once gone.
for _ in $(seq 1 120); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    alive libvirtd || libvirtd -d
    sleep 0.5
done
echo "libvirtd did not answer on qemu:///system" >&2
exit 1

#!/usr/bin/env bash
# Sets a host up to run vpcd: packages, a release build installed to /usr/local/bin, the D-Bus
# policy, the systemd unit and an example config, the test guest images, and the services
# (D-Bus, virtlogd, libvirtd, vpcd): through systemd where it is PID 1, by hand otherwise.
# Idempotent: a second run rebuilds what changed and restarts vpcd only if its binary did.
set -euo pipefail
. "$(dirname "$0")/common.sh"

log "packages"
bash "$REPO/scripts/install-deps.sh"

log "build (release)"
cargo build --release --locked --manifest-path "$REPO/Cargo.toml" -p vpcd -p vpcctl

log "install"
install -d /usr/local/bin /etc/vpcd /etc/dbus-1/system.d /var/lib/vpcd/images
changed=0
for b in vpcd vpcctl; do
    if ! cmp -s "$CARGO_TARGET_DIR/release/$b" "/usr/local/bin/$b"; then
        install -m 0755 "$CARGO_TARGET_DIR/release/$b" "/usr/local/bin/$b.new"
        mv -f "/usr/local/bin/$b.new" "/usr/local/bin/$b"
        changed=1
    fi
done
install -m 0644 "$REPO/dist/dbus/org.vpcd.Host1.conf" /etc/dbus-1/system.d/org.vpcd.Host1.conf
[ -e /etc/vpcd/vpcd.toml ] || install -m 0644 "$REPO/dist/vpcd.toml" /etc/vpcd/vpcd.toml
install -d /etc/systemd/system
install -m 0644 "$REPO/dist/systemd/vpcd.service" /etc/systemd/system/vpcd.service

log "guest images"
bash "$REPO/images/build.sh" /var/lib/vpcd/images

log "services"
bash "$REPO/scripts/services.sh"
# The bus re-reads policy files on reload; a bus started before the file existed needs it.
dbus-send --system --dest=org.freedesktop.DBus --type=method_call / org.freedesktop.DBus.ReloadConfig || true

if has_systemd; then
    systemctl daemon-reload
    systemctl enable vpcd.service
    if [ "$changed" = 1 ]; then systemctl restart vpcd.service; else systemctl start vpcd.service; fi
else
    pid=$(cat /run/vpcd.pid 2>/dev/null || true)
    running=0
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = vpcd ]; then running=1; fi
    if [ "$running" = 1 ] && [ "$changed" = 1 ]; then
        # VMs keep running across a vpcd restart.
        kill "$pid"
        for _ in $(seq 1 50); do [ -e /proc/"$pid" ] || break; sleep 0.1; done
        running=0
    fi
    if [ "$running" = 0 ]; then
        setsid /usr/local/bin/vpcd >>/var/log/vpcd.log 2>&1 < /dev/null &
        echo $! > /run/vpcd.pid
    fi
fi
for _ in $(seq 1 200); do
    busctl --system status org.vpcd.Host1 >/dev/null 2>&1 && break
    sleep 0.1
done
busctl --system status org.vpcd.Host1 >/dev/null 2>&1 || {
    echo "vpcd did not come up; see /var/log/vpcd.log" >&2
    tail -20 /var/log/vpcd.log >&2 || true
    exit 1
}
echo "vpcd is up on the system bus as org.vpcd.Host1"

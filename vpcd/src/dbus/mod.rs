//! The D-Bus adapter: a thin layer that maps calls onto the [`Manager`] and its events onto
//! signals and property changes.
//!
//! - `/org/vpcd/Host1`: `org.vpcd.Host1` and `org.freedesktop.DBus.ObjectManager`
//! - `/org/vpcd/Host1/domain/<name>`: `org.vpcd.Domain1` per VM

mod domain;
mod error;
mod host;
mod network;
mod path;
mod router;
mod volume;

use std::sync::Arc;

use zbus::connection::Builder;
use zbus::Connection;

pub use domain::DomainIface;
pub use error::ApiError;
pub use host::HostIface;
pub use network::{NetworkIface, PortIface};
pub use path::{domain_path, network_path, port_path, HOST_PATH};

use crate::manager::{Manager, ManagerEvent, VmInfo};
use router::{FloatingIpIface, RouterIface};

/// Connects to the bus at `address` (empty: the system bus), exports every object and takes
/// `name`. Keeps objects and signals in step with the manager until the connection drops.
pub async fn serve(manager: Arc<Manager>, address: &str, name: &str) -> anyhow::Result<Connection> {
    let builder = if address.is_empty() {
        Builder::system()?
    } else {
        Builder::address(address)?
    };
    let conn = builder
        .serve_at(HOST_PATH, zbus::fdo::ObjectManager)?
        .serve_at(
            HOST_PATH,
            HostIface {
                manager: manager.clone(),
            },
        )?
        .build()
        .await?;
    // Subscribe before exporting the current domains, so nothing that happens in between is lost.
    let mut events = manager.subscribe();
    for info in manager
        .list()?
        .into_iter()
        .chain(manager.half_undefined_domains()?)
    {
        export_domain(&conn, &manager, info).await;
    }
    sync_net_objects(&conn, &manager).await;
    volume::sync_volume_objects(&conn, &manager, None).await;
    if manager.storage().is_ok() {
        // Volumes made or deleted through other hosts.
        let (c, m) = (conn.clone(), manager.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(volume::SYNC_INTERVAL).await;
                let volumes = volume::sync_volume_objects(&c, &m, None).await;
                // (A release that waits on the cluster delays the next sync, no more.)
                m.release_stale_claims(&volumes).await;
            }
        });
    }
    conn.request_name(name).await?;
    let c = conn.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(ev) => apply(&c, &manager, ev).await,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("d-bus adapter lagged {n} events; resyncing");
                    for info in manager.list().unwrap_or_default() {
                        add_domain(&c, &manager, &info.name).await;
                        refresh_state(&c, &info.name, info.state, "resync").await;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    Ok(conn)
}

/// Exports the domain object of `name` unless it is already there.
async fn add_domain(conn: &Connection, manager: &Arc<Manager>, name: &str) {
    let Some(info) = manager
        .list()
        .ok()
        .and_then(|l| l.into_iter().find(|i| i.name == name))
    else {
        return;
    };
    export_domain(conn, manager, info).await;
}

async fn export_domain(conn: &Connection, manager: &Arc<Manager>, info: VmInfo) {
    let path = domain_path(&info.name);
    let name = info.name.clone();
    let iface = DomainIface {
        manager: manager.clone(),
        info,
    };
    if let Err(e) = conn.object_server().at(path, iface).await {
        tracing::warn!(vm = name, "export domain: {e}");
    }
}

async fn apply(conn: &Connection, manager: &Arc<Manager>, ev: ManagerEvent) {
    match ev {
        ManagerEvent::Defined(name) => {
            add_domain(conn, manager, &name).await;
            sync_net_objects(conn, manager).await;
        }
        ManagerEvent::Undefined(name) => {
            let _ = conn
                .object_server()
                .remove::<DomainIface, _>(domain_path(&name))
                .await;
            sync_net_objects(conn, manager).await;
        }
        ManagerEvent::State(ev) => refresh_state(conn, &ev.name, ev.state, &ev.reason).await,
        ManagerEvent::Changed(name) => refresh_devices(conn, manager, &name).await,
    }
}

/// A VM's disks (and so its spec) changed: the object's properties follow.
async fn refresh_devices(conn: &Connection, manager: &Arc<Manager>, name: &str) {
    let Some(iface) = domain_iface(conn, name).await else {
        return;
    };
    let Ok(info) = manager.info(name).await else {
        return;
    };
    iface.get_mut().await.info = info;
    let emitter = iface.signal_emitter();
    let d = iface.get().await;
    let _ = d.disks_changed(emitter).await;
    let _ = d.spec_changed(emitter).await;
}

/// The exported object of domain `name`, if there is one.
async fn domain_iface(
    conn: &Connection,
    name: &str,
) -> Option<zbus::object_server::InterfaceRef<DomainIface>> {
    conn.object_server()
        .interface::<_, DomainIface>(domain_path(name))
        .await
        .ok()
}

async fn refresh_state(conn: &Connection, name: &str, state: hypervisor::VmState, reason: &str) {
    let Some(iface) = domain_iface(conn, name).await else {
        return;
    };
    let changed = {
        let mut d = iface.get_mut().await;
        let changed = d.info.state != state;
        d.info.state = state;
        changed
    };
    let emitter = iface.signal_emitter();
    if changed {
        let _ = iface.get().await.state_changed(emitter).await;
    }
    let _ = DomainIface::lifecycle_event(emitter, state.as_str(), reason).await;
}

/// Exports an object per network and per port, and removes those that are gone. Run after
/// every change of the tenant networks (and at start-up).
pub(crate) async fn sync_net_objects(conn: &Connection, manager: &Arc<Manager>) {
    type Exported = (Vec<String>, Vec<u32>, Vec<String>, Vec<std::net::Ipv4Addr>);
    static EXPORTED: std::sync::Mutex<Option<Exported>> = std::sync::Mutex::new(None);
    let Ok(net) = manager.net() else { return };
    let Ok(st) = net.state() else { return };
    let nets: Vec<String> = st.networks.keys().cloned().collect();
    let ports: Vec<u32> = st.ports.keys().copied().collect();
    let routers: Vec<String> = st.routers.keys().cloned().collect();
    let fips: Vec<std::net::Ipv4Addr> = st.floating_ips.iter().map(|f| f.ip).collect();
    let (old_nets, old_ports, old_routers, old_fips) = EXPORTED
        .lock()
        .unwrap()
        .replace((nets.clone(), ports.clone(), routers.clone(), fips.clone()))
        .unwrap_or_default();
    let server = conn.object_server();
    for n in old_nets.iter().filter(|n| !nets.contains(n)) {
        let _ = server.remove::<NetworkIface, _>(network_path(n)).await;
    }
    for p in old_ports.iter().filter(|p| !ports.contains(p)) {
        let _ = server.remove::<PortIface, _>(port_path(*p)).await;
    }
    for r in old_routers.iter().filter(|r| !routers.contains(r)) {
        let _ = server.remove::<RouterIface, _>(path::router_path(r)).await;
    }
    for f in old_fips.iter().filter(|f| !fips.contains(f)) {
        let _ = server
            .remove::<FloatingIpIface, _>(path::floating_ip_path(*f))
            .await;
    }
    for r in &routers {
        let iface = RouterIface {
            manager: manager.clone(),
            name: r.clone(),
        };
        let _ = server.at(path::router_path(r), iface).await;
    }
    for f in &fips {
        let iface = FloatingIpIface {
            manager: manager.clone(),
            ip: *f,
        };
        let _ = server.at(path::floating_ip_path(*f), iface).await;
    }
    for n in &nets {
        let iface = NetworkIface {
            manager: manager.clone(),
            name: n.clone(),
        };
        let _ = server.at(network_path(n), iface).await;
    }
    for p in &ports {
        let iface = PortIface {
            manager: manager.clone(),
            id: *p,
        };
        let _ = server.at(port_path(*p), iface).await;
    }
}

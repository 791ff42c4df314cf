//! `org.vpcd.Volume1` at `/org/vpcd/Host1/volume/<name>`: a replicated volume of the storage
//! cluster (this host serves every one, those it holds no replica of through their leaders).
//! The properties are the volume as last seen, not asked for on each read (a lookup may wait
//! seconds on a node that does not answer, and the object server is locked while it sends a
//! new object's properties): the objects and their properties follow the cluster's volumes
//! after every change through this host and every few seconds for changes made elsewhere,
//! with `PropertiesChanged` for what changed. `Host1.VolumeInfo` asks the cluster there and
//! then.

use std::collections::BTreeSet;
use std::sync::Arc;

use zbus::interface;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use super::error::ApiError;
use super::path::volume_path;
use crate::manager::Manager;
use crate::storage::VolumeInfo;

pub(super) fn volume_object(name: &str) -> OwnedObjectPath {
    OwnedObjectPath::try_from(volume_path(name)).expect("escaped names are valid paths")
}

/// How often the objects are brought in line with volumes made or deleted elsewhere.
pub(super) const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug)]
pub struct VolumeIface {
    pub(super) manager: Arc<Manager>,
    pub(super) name: String,
    /// What the properties say.
    info: VolumeInfo,
}

#[interface(name = "org.vpcd.Volume1")]
impl VolumeIface {
    /// Grows the volume to `size` bytes (volumes never shrink).
    async fn resize(
        &mut self,
        size: u64,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), ApiError> {
        let info = self.manager.storage()?.resize(&self.name, size).await?;
        self.update(info, &emitter).await;
        Ok(())
    }

    /// Deletes the volume on all its nodes.
    async fn delete(&self, #[zbus(connection)] conn: &Connection) -> Result<(), ApiError> {
        delete(conn, &self.manager, &self.name, false).await
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Bytes.
    #[zbus(property)]
    fn size(&self) -> u64 {
        self.info.size
    }

    /// The group's leader as this host sees it (0: none).
    #[zbus(property)]
    fn leader(&self) -> u64 {
        self.info.leader
    }

    /// `ok` with a leader, `no leader` without.
    #[zbus(property)]
    fn health(&self) -> String {
        self.info.health.clone()
    }

    /// The nodes holding a replica: (id, address).
    #[zbus(property)]
    fn replicas(&self) -> Vec<(u64, String)> {
        self.info.members.clone()
    }

    /// Where this host serves it: `nbd+unix:///<name>?socket=...`.
    #[zbus(property)]
    fn uri(&self) -> String {
        self.info.uri.clone()
    }

    /// Over TCP (`nbd://` or, with TLS, `nbds://`); "" without a TCP listener.
    #[zbus(property)]
    fn tcp_uri(&self) -> String {
        self.info.tcp_uri.clone()
    }

    /// The domains that have it as a disk: (storage node, domain, disk, read-only).
    #[zbus(property)]
    fn attachments(&self) -> Vec<(u64, String, String, bool)> {
        self.info
            .attachments
            .iter()
            .map(|a| (a.node, a.domain.clone(), a.disk.clone(), a.readonly))
            .collect()
    }
}

impl VolumeIface {
    /// Takes `info` as the volume's, and says what changed.
    async fn update(&mut self, info: VolumeInfo, emitter: &SignalEmitter<'_>) {
        let old = std::mem::replace(&mut self.info, info);
        let new = &self.info;
        if old.size != new.size {
            let _ = self.size_changed(emitter).await;
        }
        if old.leader != new.leader {
            let _ = self.leader_changed(emitter).await;
        }
        if old.health != new.health {
            let _ = self.health_changed(emitter).await;
        }
        if old.members != new.members {
            let _ = self.replicas_changed(emitter).await;
        }
        if old.uri != new.uri {
            let _ = self.uri_changed(emitter).await;
        }
        if old.tcp_uri != new.tcp_uri {
            let _ = self.tcp_uri_changed(emitter).await;
        }
        if old.attachments != new.attachments {
            let _ = self.attachments_changed(emitter).await;
        }
    }
}

/// Deletes volume `name` ([`Manager::delete_volume`]) and its object.
pub(super) async fn delete(
    conn: &Connection,
    manager: &Arc<Manager>,
    name: &str,
    force: bool,
) -> Result<(), ApiError> {
    manager.delete_volume(name, force).await?;
    sync_volume_objects(conn, manager, Some(name)).await;
    Ok(())
}

/// The names of the volumes with an object, guarded by the one sync at a time (a slow one
/// must not remove an object a later one added, or bring back one it removed).
static EXPORTED: tokio::sync::Mutex<BTreeSet<String>> =
    tokio::sync::Mutex::const_new(BTreeSet::new());

/// Brings the objects in line with the cluster's volumes: one per volume, with its properties
/// as the cluster's answer has them; those of volumes that are gone removed (`deleted`, just
/// deleted through this host, at once; others not while a storage node does not answer: its
/// volumes would come and go).
pub(crate) async fn sync_volume_objects(
    conn: &Connection,
    manager: &Arc<Manager>,
    deleted: Option<&str>,
) -> Vec<VolumeInfo> {
    let Ok(storage) = manager.storage() else {
        return Vec::new();
    };
    let mut exported = EXPORTED.lock().await;
    let (volumes, silent) = storage.list_all().await;
    let complete = silent.is_empty();
    let listed: BTreeSet<String> = volumes.iter().map(|v| v.name.clone()).collect();
    let server = conn.object_server();
    // (A volume just deleted is not exported again even if a replica cut off from the delete
    // still lists it; the object's own `Delete` runs this while it holds the object.)
    let deleted = |n: &str| deleted == Some(n);
    let gone: Vec<String> = exported
        .iter()
        .filter(|n| deleted(n) || (complete && !listed.contains(*n)))
        .cloned()
        .collect();
    for n in gone {
        let _ = server.remove::<VolumeIface, _>(volume_path(&n)).await;
        exported.remove(&n);
    }
    for info in volumes.iter().filter(|v| !deleted(&v.name)) {
        export(conn, manager, &mut exported, info.clone()).await;
    }
    volumes
}

/// Makes sure volume `info.name` has an object (one made elsewhere may not have had one yet),
/// with `info` as its properties.
pub(crate) async fn export_volume(conn: &Connection, manager: &Arc<Manager>, info: VolumeInfo) {
    let mut exported = EXPORTED.lock().await;
    export(conn, manager, &mut exported, info).await;
}

async fn export(
    conn: &Connection,
    manager: &Arc<Manager>,
    exported: &mut BTreeSet<String>,
    info: VolumeInfo,
) {
    let server = conn.object_server();
    let path = volume_path(&info.name);
    if exported.contains(&info.name) {
        if let Ok(iface) = server.interface::<_, VolumeIface>(path.as_str()).await {
            let emitter = iface.signal_emitter().clone();
            iface.get_mut().await.update(info, &emitter).await;
        }
        return;
    }
    let name = info.name.clone();
    let iface = VolumeIface {
        manager: manager.clone(),
        name: name.clone(),
        info,
    };
    if server.at(path, iface).await.is_ok() {
        exported.insert(name);
    }
}

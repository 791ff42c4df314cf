//! `org.vpcd.Volume1` at `/org/vpcd/Host1/volume/<name>`: a replicated volume of the storage
//! cluster (this host serves every one, those it holds no replica of through their leaders).
//! Properties are read from the storage node on each call; the set of objects follows the
//! cluster's volumes (after every change through this host, and every few seconds for changes
//! made through other hosts).

use std::sync::Arc;

use zbus::interface;
use zbus::zvariant::OwnedObjectPath;
use zbus::Connection;

use super::error::ApiError;
use super::network::fdo;
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
}

impl VolumeIface {
    async fn info(&self) -> Result<VolumeInfo, zbus::fdo::Error> {
        let get = async { Ok::<_, ApiError>(self.manager.storage()?.info(&self.name).await?) };
        get.await.map_err(fdo)
    }
}

#[interface(name = "org.vpcd.Volume1")]
impl VolumeIface {
    /// Grows the volume to `size` bytes (volumes never shrink).
    async fn resize(&self, size: u64) -> Result<(), ApiError> {
        self.manager.storage()?.resize(&self.name, size).await?;
        Ok(())
    }

    /// Deletes the volume on all its nodes.
    async fn delete(&self, #[zbus(connection)] conn: &Connection) -> Result<(), ApiError> {
        self.manager.storage()?.delete(&self.name).await?;
        sync_volume_objects(conn, &self.manager).await;
        Ok(())
    }

    #[zbus(property)]
    fn name(&self) -> String {
        self.name.clone()
    }

    /// Bytes.
    #[zbus(property)]
    async fn size(&self) -> Result<u64, zbus::fdo::Error> {
        Ok(self.info().await?.size)
    }

    /// The group's leader as this host sees it (0: none).
    #[zbus(property)]
    async fn leader(&self) -> Result<u64, zbus::fdo::Error> {
        Ok(self.info().await?.leader)
    }

    /// `ok` with a leader, `no leader` without.
    #[zbus(property)]
    async fn health(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.info().await?.health)
    }

    /// The nodes holding a replica: (id, address).
    #[zbus(property)]
    async fn replicas(&self) -> Result<Vec<(u64, String)>, zbus::fdo::Error> {
        Ok(self.info().await?.members)
    }

    /// Where this host serves it: `nbd+unix:///<name>?socket=...`.
    #[zbus(property)]
    async fn uri(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.info().await?.uri)
    }

    /// Over TCP (`nbd://` or, with TLS, `nbds://`); "" without a TCP listener.
    #[zbus(property)]
    async fn tcp_uri(&self) -> Result<String, zbus::fdo::Error> {
        Ok(self.info().await?.tcp_uri)
    }
}

/// Exports an object per volume of the cluster and removes those that are gone (not while
/// a storage node does not answer: its volumes would come and go).
pub(crate) async fn sync_volume_objects(conn: &Connection, manager: &Arc<Manager>) {
    static EXPORTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let Ok(storage) = manager.storage() else {
        return;
    };
    let (volumes, complete) = storage.list_all().await;
    let mut names: Vec<String> = volumes.into_iter().map(|v| v.name).collect();
    let old = EXPORTED.lock().unwrap().clone();
    if !complete {
        names.extend(
            old.iter()
                .filter(|n| !names.contains(n))
                .cloned()
                .collect::<Vec<_>>(),
        );
    }
    *EXPORTED.lock().unwrap() = names.clone();
    let server = conn.object_server();
    for n in old.iter().filter(|n| !names.contains(n)) {
        let _ = server.remove::<VolumeIface, _>(volume_path(n)).await;
    }
    for n in names.iter().filter(|n| !old.contains(n)) {
        let iface = VolumeIface {
            manager: manager.clone(),
            name: n.clone(),
        };
        let _ = server.at(volume_path(n), iface).await;
    }
}

//! The desired-state store: an embedded, transactional database (redb) under the state
//! directory. Every write is one transaction, fsynced before it returns, so a SIGKILL at any
//! point leaves either the old or the new state, never a mix.

use std::path::Path;

use hypervisor::{BackendKind, VmConfig, VmSpec};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Whole documents kept under one key each (the tenant-network state).
const DOCS: TableDefinition<&str, &[u8]> = TableDefinition::new("docs");

/// How far a VM's definition got. Define and undefine span several steps (files, backend); the
/// phase written before the first step lets a restarted vpcd finish or roll back the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Being defined: not yet acknowledged to the caller; rolled back after a crash.
    Defining,
    Defined,
    /// Being undefined: finished after a crash.
    Undefining,
}

/// A VM as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub uuid: uuid::Uuid,
    pub backend: BackendKind,
    pub phase: Phase,
    /// Filled in once the VM's files are prepared.
    pub config: Option<VmConfig>,
    /// Volume disks detached while the guest ran, (target, volume), until the guest has let
    /// go of them (or stops): the volume's use stays recorded meanwhile. Recorded before the
    /// unplug, so every volume a guest may have plugged is in the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unplugging: Vec<(String, String)>,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open store {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("store: {0}")]
    Db(String),
    #[error("store: record {name}: {reason}")]
    Corrupt { name: String, reason: String },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The store of one vpcd instance.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(VMS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.open_table(DOCS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// This instance's id, made on first use; it marks the libvirt domains this vpcd owns.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing = meta
                .get("instance_id")
                .map_err(db_err)?
                .map(|v| v.value().to_string());
            match existing {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().to_string();
                    meta.insert("instance_id", id.as_str()).map_err(db_err)?;
                    id
                }
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(id)
    }

    /// Inserts a new record; false (and nothing written) if the name is taken.
    pub fn insert_new(&self, rec: &VmRecord) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut vms = txn.open_table(VMS).map_err(db_err)?;
            if vms.get(rec.spec.name.as_str()).map_err(db_err)?.is_some() {
                return Ok(false);
            }
            vms.insert(rec.spec.name.as_str(), encode(rec).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(true)
    }

    pub fn put(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut vms = txn.open_table(VMS).map_err(db_err)?;
            vms.insert(rec.spec.name.as_str(), encode(rec).as_slice())
                .map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    pub fn get(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let vms = txn.open_table(VMS).map_err(db_err)?;
        let value = vms.get(name).map_err(db_err)?;
        value.map(|v| decode(name, v.value())).transpose()
    }

    pub fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let vms = txn.open_table(VMS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in vms.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut vms = txn.open_table(VMS).map_err(db_err)?;
            vms.remove(name).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

impl Store {
    /// Reads the document `key` (JSON), or its default when there is none yet.
    pub fn doc<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: &str,
    ) -> Result<T, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let docs = txn.open_table(DOCS).map_err(db_err)?;
        match docs.get(key).map_err(db_err)? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                name: key.to_string(),
                reason: e.to_string(),
            }),
            None => Ok(T::default()),
        }
    }

    /// Replaces the document `key` in one transaction.
    pub fn put_doc<T: Serialize>(&self, key: &str, doc: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(doc).expect("documents always serialize");
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut docs = txn.open_table(DOCS).map_err(db_err)?;
            docs.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }
}

fn encode(rec: &VmRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("records always serialize")
}

fn decode(name: &str, bytes: &[u8]) -> Result<VmRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str) -> VmRecord {
        VmRecord {
            spec: VmSpec::from_toml(&format!("name = \"{name}\"\n")).unwrap(),
            uuid: uuid::Uuid::new_v4(),
            backend: BackendKind::Qmp,
            phase: Phase::Defining,
            config: None,
            unplugging: Vec::new(),
        }
    }

    #[test]
    fn records_survive_reopen_and_names_are_unique() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let id;
        {
            let s = Store::open(&path).unwrap();
            id = s.instance_id().unwrap();
            assert!(s.insert_new(&rec("a")).unwrap());
            assert!(!s.insert_new(&rec("a")).unwrap());
            let mut b = rec("b");
            assert!(s.insert_new(&b).unwrap());
            b.phase = Phase::Defined;
            s.put(&b).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.instance_id().unwrap(), id);
        let all = s.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(s.get("b").unwrap().unwrap().phase, Phase::Defined);
        s.delete("a").unwrap();
        assert!(s.get("a").unwrap().is_none());
        s.delete("a").unwrap();
    }
}

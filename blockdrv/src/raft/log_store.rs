//! The durable raft log and vote of a volume's group, in a redb database (`raft-log.redb`):
//! table `log` (index -> bincode entry) and table `meta` (`vote`, `committed`, `purged`, as
//! JSON). Every change is one redb transaction committed with immediate durability (fsync)
//! before openraft hears it is done: an entry is acknowledged to the leader only once on disk.
//! Appends run on the blocking pool, so an fsync does not stall the runtime.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, ReadableTable, TableDefinition};

use super::{Entry, LogId, NodeId, StorageError, TypeConfig};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The log store (cheap to clone: the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(super::any(e)).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(super::any(e)).into()
}

impl LogStore {
    /// Opens (or creates) the log in directory `dir`.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let db = Database::create(dir.join("raft-log.redb")).map_err(super::io_err)?;
        let tx = db.begin_write().map_err(super::io_err)?;
        tx.open_table(LOG).map_err(super::io_err)?;
        tx.open_table(META).map_err(super::io_err)?;
        tx.commit().map_err(super::io_err)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(META).map_err(read_err)?;
        let Some(v) = t.get(key).map_err(read_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(read_err)
    }

    /// Writes a meta value in a transaction of its own (on the blocking pool).
    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &'static str,
        v: &T,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(v).map_err(write_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(META)
                .map_err(write_err)?
                .insert(key, bytes.as_slice())
                .map_err(write_err)?;
            tx.commit().map_err(write_err)
        })
        .await
        .map_err(write_err)?
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let Some((_, v)) = t.last().map_err(read_err)? else {
            return Ok(None);
        };
        let e: Entry = bincode::deserialize(v.value()).map_err(read_err)?;
        Ok(Some(e.log_id))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let t = tx.open_table(LOG).map_err(read_err)?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(read_err)? {
            let (_, v) = item.map_err(read_err)?;
            out.push(bincode::deserialize(v.value()).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let purged: Option<LogId> = self.meta("purged")?;
        let last = self.last_entry_id()?.or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta("vote", vote)
            .await
            .map_err(|e| StorageIOError::write_vote(super::any(e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta("committed", &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, bincode::serialize(&e).map_err(write_err)?)))
            .collect::<Result<_, StorageError>>()?;
        let db = self.db.clone();
        let r = tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(super::io_err)?;
            {
                let mut t = tx.open_table(LOG).map_err(super::io_err)?;
                for (i, bytes) in &encoded {
                    t.insert(*i, bytes.as_slice()).map_err(super::io_err)?;
                }
            }
            tx.commit().map_err(super::io_err)
        })
        .await
        .map_err(super::io_err)
        .and_then(|r| r);
        let failed = r.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(r);
        match failed {
            Some(e) => Err(write_err(e)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(LOG)
                .map_err(write_err)?
                .retain_in(log_id.index.., |_, _| false)
                .map_err(write_err)?;
            tx.commit().map_err(write_err)
        })
        .await
        .map_err(write_err)?
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(write_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(write_err)?;
            tx.open_table(META)
                .map_err(write_err)?
                .insert("purged", bytes.as_slice())
                .map_err(write_err)?;
            tx.open_table(LOG)
                .map_err(write_err)?
                .retain_in(..=log_id.index, |_, _| false)
                .map_err(write_err)?;
            tx.commit().map_err(write_err)
        })
        .await
        .map_err(write_err)?
    }
}

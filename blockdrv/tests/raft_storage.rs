//! openraft's own storage test suite on the volume's raft log (segment files) and state machine
//! (sparse file, file snapshots), each test on stores in a fresh directory.

use blockdrv::raft::segment_log::SegmentLog;
use blockdrv::raft::state_machine::StateMachine;
use blockdrv::raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct Dirs;

impl StoreBuilder<TypeConfig, SegmentLog, StateMachine, tempfile::TempDir> for Dirs {
    async fn build(&self) -> Result<(tempfile::TempDir, SegmentLog, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SegmentLog::open(&dir.path().join("log")).expect("log store");
        let sm = StateMachine::open(&dir.path().join("sm"), 1 << 20).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Dirs).unwrap();
}

fn entry(index: u64, op: blockdrv::raft::BlockOp) -> blockdrv::raft::Entry {
    openraft::Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
        payload: openraft::EntryPayload::Normal(op),
    }
}

fn read(sm: &StateMachine, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; len];
    sm.blocks()
        .read()
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn blocks_survive_reopen_snapshots_stay_sparse_and_install_elsewhere() {
    use blockdrv::raft::BlockOp;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let dir = tempfile::tempdir().unwrap();
    let size = 8 << 20;
    let mut sm = StateMachine::open(&dir.path().join("a"), size).unwrap();
    sm.apply(vec![
        entry(
            1,
            BlockOp::Write {
                offset: 0,
                data: vec![1; 65536].into(),
            },
        ),
        entry(
            2,
            BlockOp::Write {
                offset: 4 << 20,
                data: vec![2; 4096].into(),
            },
        ),
        entry(
            3,
            BlockOp::Zero {
                offset: 0,
                length: 4096,
                allocate: false,
            },
        ),
    ])
    .await
    .unwrap();
    assert_eq!(read(&sm, 0, 4096), vec![0; 4096]);
    assert_eq!(read(&sm, 4096, 4096), vec![1; 4096]);
    let snap = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    assert_eq!(snap.meta.last_log_id.unwrap().index, 3);
    // The snapshot image keeps the holes: far less allocated than its size.
    let img = std::fs::read_dir(dir.path().join("a/snapshots"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "img"))
        .unwrap()
        .path();
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&img).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );

    // Applied after the snapshot, then "crash": reopening starts from the snapshot, and the
    // entry applied again gives the same blocks.
    let later = entry(
        4,
        BlockOp::Write {
            offset: 65536,
            data: vec![4; 4096].into(),
        },
    );
    sm.apply(vec![later.clone()]).await.unwrap();
    drop(sm);
    let mut sm = StateMachine::open(&dir.path().join("a"), size).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.unwrap().index, 3);
    sm.apply(vec![later]).await.unwrap();
    assert_eq!(read(&sm, 65536, 4096), vec![4; 4096]);
    assert_eq!(read(&sm, 4 << 20, 4096), vec![2; 4096]);

    // Another node installs the current snapshot: its blocks become the snapshot's.
    let mut other = StateMachine::open(&dir.path().join("b"), size).unwrap();
    other
        .apply(vec![entry(
            1,
            BlockOp::Write {
                offset: 4 << 20,
                data: vec![9; 8192].into(),
            },
        )])
        .await
        .unwrap();
    let cur = sm.get_current_snapshot().await.unwrap().unwrap();
    let mut rx = other.begin_receiving_snapshot().await.unwrap();
    let mut src = cur.snapshot.into_std().await;
    let mut dst = rx.as_mut().try_clone().await.unwrap().into_std().await;
    std::io::copy(&mut src, &mut dst).unwrap();
    other.install_snapshot(&cur.meta, rx).await.unwrap();
    assert_eq!(other.applied_state().await.unwrap().0.unwrap().index, 3);
    assert_eq!(read(&other, 4096, 4096), vec![1; 4096]);
    assert_eq!(read(&other, 4 << 20, 8192)[..4096], vec![2; 4096]);
    assert_eq!(
        read(&other, (4 << 20) + 4096, 4096),
        vec![0; 4096],
        "its own write is gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_applies_its_operations_in_order_and_grows_the_volume() {
    use blockdrv::raft::BlockOp;
    use openraft::storage::RaftStateMachine;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(dir.path(), 1 << 20).unwrap();
    let size = sm.size();
    sm.apply(vec![entry(
        1,
        BlockOp::Batch(vec![
            BlockOp::Write {
                offset: 0,
                data: vec![1; 8192].into(),
            },
            BlockOp::Zero {
                offset: 0,
                length: 4096,
                allocate: true,
            },
            BlockOp::Resize { size: 2 << 20 },
            BlockOp::Write {
                offset: (2 << 20) - 4096,
                data: vec![3; 4096].into(),
            },
        ]),
    )])
    .await
    .unwrap();
    assert_eq!(read(&sm, 0, 4096), vec![0; 4096]);
    assert_eq!(read(&sm, 4096, 4096), vec![1; 4096]);
    assert_eq!(read(&sm, (2 << 20) - 4096, 4096), vec![3; 4096]);
    assert_eq!(size.load(std::sync::atomic::Ordering::SeqCst), 2 << 20);
}

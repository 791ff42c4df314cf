//! openraft's own storage test suite on the volume's raft log (segment files) and state machine
//! (sparse file, fuzzy snapshots), each test on stores in a fresh directory.

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
    // A snapshot is a sync and a record, not a copy: nothing but metadata in `snapshots/`.
    let files: Vec<String> = std::fs::read_dir(dir.path().join("a/snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().all(|f| f.ends_with(".json")),
        "snapshot files: {files:?}"
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

    // Another node installs the current snapshot: its blocks become the snapshot's (fuzzy:
    // they hold entry 4 too, and it applies what follows the snapshot's id again), holes kept.
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
    assert_eq!(cur.meta.last_log_id.unwrap().index, 3);
    let mut rx = other.begin_receiving_snapshot().await.unwrap();
    let mut src = cur.snapshot.into_std().await;
    let mut dst = rx.as_mut().try_clone().await.unwrap().into_std().await;
    std::io::copy(&mut src, &mut dst).unwrap();
    other.install_snapshot(&cur.meta, rx).await.unwrap();
    assert_eq!(other.applied_state().await.unwrap().0.unwrap().index, 3);
    assert_eq!(read(&other, 4096, 4096), vec![1; 4096]);
    assert_eq!(read(&other, 65536, 4096), vec![4; 4096]);
    assert_eq!(read(&other, 4 << 20, 8192)[..4096], vec![2; 4096]);
    assert_eq!(
        read(&other, (4 << 20) + 4096, 4096),
        vec![0; 4096],
        "its own write is gone"
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(dir.path().join("b/volume.img")).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );
    assert!(
        !dir.path().join("b/snapshots/incoming.img").exists(),
        "the received copy stays behind"
    );
}

/// A fuzzy snapshot, sent while writes go on, installed and followed by every entry after its
/// id: the receiver's blocks end up identical to the sender's, whatever the snapshot caught of
/// the later writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_fuzzy_snapshot_plus_the_entries_after_it_gives_identical_blocks() {
    use blockdrv::raft::BlockOp;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let mut a = StateMachine::open(&dir.path().join("a"), size).unwrap();
    let op = |i: u64| {
        let offset = (i * 12_288) % (size - 65_536);
        match i % 5 {
            3 => BlockOp::Zero {
                offset,
                length: 16_384,
                allocate: i.is_multiple_of(2),
            },
            _ => BlockOp::Write {
                offset,
                data: vec![i as u8; 20_000].into(),
            },
        }
    };
    let entries: Vec<_> = (1..=200).map(|i| entry(i, op(i))).collect();
    a.apply(entries[..100].to_vec()).await.unwrap();
    let snap = a
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap();
    // Entries after the snapshot change the blocks while it is read, half of it before.
    let mut src = snap.snapshot.into_std().await;
    let mut half = vec![0u8; (size / 2) as usize];
    std::io::Read::read_exact(&mut src, &mut half).unwrap();
    a.apply(entries[100..160].to_vec()).await.unwrap();
    let mut b = StateMachine::open(&dir.path().join("b"), size).unwrap();
    let rx = b.begin_receiving_snapshot().await.unwrap();
    let mut dst = rx.try_clone().await.unwrap().into_std().await;
    std::io::Write::write_all(&mut dst, &half).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    b.install_snapshot(&snap.meta, rx).await.unwrap();
    assert_eq!(b.applied_state().await.unwrap().0.unwrap().index, 100);
    a.apply(entries[160..].to_vec()).await.unwrap();
    b.apply(entries[100..].to_vec()).await.unwrap();
    assert_eq!(
        read(&a, 0, size as usize),
        read(&b, 0, size as usize),
        "blocks differ"
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

//! Who uses a volume: its attachments (a domain's disk on a node), and whether it is being
//! deleted. They go through the volume's raft log like its writes, so every node that serves
//! the volume sees the same ones, and they are decided on its leader: the leader refuses an
//! attachment that would give a second user a writable volume, and a delete of a volume that
//! is attached, before it proposes the change; the log carries only what was decided. So
//! applying is unconditional (an attachment set, one removed, the mark set), which, like the
//! writes, gives the same outcome when entries are applied again from a later state (a fuzzy
//! snapshot, a restart).

use serde::{Deserialize, Serialize};

use super::{BlockOp, NodeId};

/// A volume as a disk of a domain on a node (the node's host runs the domain).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Attachment {
    pub node: NodeId,
    pub domain: String,
    /// The guest device (`vdb`).
    pub disk: String,
    pub readonly: bool,
}

impl Attachment {
    fn same_disk(&self, other: &Attachment) -> bool {
        (self.node, &self.domain, &self.disk) == (other.node, &other.domain, &other.disk)
    }
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "domain {} (disk {}{}) on node {}",
            self.domain,
            self.disk,
            if self.readonly { ", read-only" } else { "" },
            self.node
        )
    }
}

/// A volume's users as its state machine has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Sorted.
    pub attachments: Vec<Attachment>,
    /// A delete began: nothing attaches it any more.
    pub deleting: bool,
}

impl Claims {
    /// Applies `op` if it changes the claims (other operations leave them alone).
    pub fn apply(&mut self, op: &BlockOp) {
        match op {
            BlockOp::Attach(a) => {
                self.attachments.retain(|b| !b.same_disk(a));
                self.attachments.push(a.clone());
                self.attachments.sort();
            }
            BlockOp::Detach { node, domain, disk } => self.attachments.retain(|b| {
                !(b.node == *node
                    && b.domain == *domain
                    && disk.as_ref().is_none_or(|d| *d == b.disk))
            }),
            BlockOp::Delete => self.deleting = true,
            BlockOp::Batch(ops) => ops.iter().for_each(|o| self.apply(o)),
            BlockOp::Write { .. } | BlockOp::Resize { .. } | BlockOp::Zero { .. } => {}
        }
    }

    /// Why the leader refuses `op` on volume `volume` now, if it does: an attachment while the
    /// volume is being deleted, or that would give it a second user where either one writes;
    /// a delete while it is attached. (Attaching a disk that has it already only changes
    /// whether it is read-only, which is checked against the others in the same way.)
    pub fn refusal(&self, volume: &str, op: &BlockOp) -> Option<String> {
        match op {
            BlockOp::Attach(a) => {
                if self.deleting {
                    return Some(format!("volume {volume} is being deleted"));
                }
                let other = self
                    .attachments
                    .iter()
                    .find(|b| !(b.same_disk(a) || (a.readonly && b.readonly)))?;
                Some(format!(
                    "volume {volume} is attached to {other}{}",
                    if other.readonly {
                        ": it can only be attached read-only"
                    } else {
                        ""
                    }
                ))
            }
            BlockOp::Delete => {
                let users: Vec<String> = self.attachments.iter().map(|a| a.to_string()).collect();
                (!users.is_empty()).then(|| {
                    format!(
                        "volume {volume} is attached to {}; detach it first",
                        users.join(", ")
                    )
                })
            }
            _ => None,
        }
    }
}

/// A state machine's claims, shared with its group (its status, its leader's checks, the
/// snapshots it sends), and those of the snapshots being received until they are installed.
#[derive(Debug, Default)]
pub struct Cell {
    pub now: Claims,
    /// Set by the receiver of a snapshot before it has it installed: snapshot id -> its
    /// claims.
    pub incoming: std::collections::BTreeMap<String, Claims>,
}

/// Snapshots whose claims [`Cell::incoming`] keeps (a receive given up leaves its entry).
const INCOMING_MOST: usize = 4;

impl Cell {
    /// Keeps the claims of snapshot `id` (being received) for its install.
    pub fn receiving(&mut self, id: &str, claims: Claims) {
        if self.incoming.len() >= INCOMING_MOST {
            self.incoming.clear();
        }
        self.incoming.insert(id.to_string(), claims);
    }
}

pub type Shared = std::sync::Arc<std::sync::Mutex<Cell>>;

pub fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Cell> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(node: NodeId, domain: &str, disk: &str, readonly: bool) -> Attachment {
        Attachment {
            node,
            domain: domain.into(),
            disk: disk.into(),
            readonly,
        }
    }

    #[test]
    fn one_writer_or_any_number_of_readers() {
        let mut c = Claims::default();
        let a = BlockOp::Attach(at(1, "web", "vdb", false));
        assert_eq!(c.refusal("v", &a), None);
        c.apply(&a);
        // The same disk again: nothing new.
        assert_eq!(c.refusal("v", &a), None);
        c.apply(&a);
        assert_eq!(c.attachments.len(), 1);
        let b = BlockOp::Attach(at(2, "db", "vdc", true));
        assert_eq!(
            c.refusal("v", &b).unwrap(),
            "volume v is attached to domain web (disk vdb) on node 1"
        );
        // Another disk of the same domain is another user.
        assert!(c
            .refusal("v", &BlockOp::Attach(at(1, "web", "vdc", false)))
            .is_some());
        c.apply(&BlockOp::Detach {
            node: 1,
            domain: "web".into(),
            disk: None,
        });
        assert!(c.attachments.is_empty());
        c.apply(&b);
        assert_eq!(
            c.refusal("v", &BlockOp::Attach(at(3, "x", "vdb", true))),
            None
        );
        assert_eq!(
            c.refusal("v", &BlockOp::Attach(at(3, "x", "vdb", false)))
                .unwrap(),
            "volume v is attached to domain db (disk vdc, read-only) on node 2: it can only be \
             attached read-only"
        );
        // Its own disk made writable: only if it is the only user.
        assert_eq!(
            c.refusal("v", &BlockOp::Attach(at(2, "db", "vdc", false))),
            None
        );
        c.apply(&BlockOp::Attach(at(3, "x", "vdb", true)));
        assert!(c
            .refusal("v", &BlockOp::Attach(at(2, "db", "vdc", false)))
            .is_some());
        // Detaching one disk leaves the domain's others.
        c.apply(&BlockOp::Detach {
            node: 3,
            domain: "x".into(),
            disk: Some("vda".into()),
        });
        assert_eq!(c.attachments.len(), 2);
        c.apply(&BlockOp::Detach {
            node: 3,
            domain: "x".into(),
            disk: Some("vdb".into()),
        });
        assert_eq!(c.attachments, vec![at(2, "db", "vdc", true)]);
    }

    #[test]
    fn an_attached_volume_is_not_deleted_and_a_deleted_one_not_attached() {
        let mut c = Claims::default();
        c.apply(&BlockOp::Batch(vec![
            BlockOp::Attach(at(1, "web", "vdb", true)),
            BlockOp::Attach(at(2, "db", "vdb", true)),
        ]));
        assert_eq!(
            c.refusal("v", &BlockOp::Delete).unwrap(),
            "volume v is attached to domain web (disk vdb, read-only) on node 1, domain db \
             (disk vdb, read-only) on node 2; detach it first"
        );
        for (node, domain) in [(1, "web"), (2, "db")] {
            c.apply(&BlockOp::Detach {
                node,
                domain: domain.into(),
                disk: None,
            });
        }
        assert_eq!(c.refusal("v", &BlockOp::Delete), None);
        c.apply(&BlockOp::Delete);
        assert_eq!(
            c.refusal("v", &BlockOp::Attach(at(1, "web", "vdb", true)))
                .unwrap(),
            "volume v is being deleted"
        );
        // Writes do not touch them.
        let before = c.clone();
        c.apply(&BlockOp::Resize { size: 1 });
        assert_eq!(c, before);
    }

    #[test]
    fn applied_again_from_a_later_state_the_outcome_is_the_same() {
        // What a restart from a fuzzy snapshot does: the entries after the snapshot's id are
        // applied again to claims that may already hold some of them.
        let ops = [
            BlockOp::Attach(at(1, "a", "vdb", false)),
            BlockOp::Detach {
                node: 1,
                domain: "a".into(),
                disk: None,
            },
            BlockOp::Attach(at(2, "b", "vdb", true)),
            BlockOp::Attach(at(3, "c", "vdb", true)),
            BlockOp::Detach {
                node: 2,
                domain: "b".into(),
                disk: Some("vdb".into()),
            },
        ];
        let mut whole = Claims::default();
        ops.iter().for_each(|o| whole.apply(o));
        for from in 0..ops.len() {
            for later in from..=ops.len() {
                let mut c = Claims::default();
                ops[..later].iter().for_each(|o| c.apply(o));
                ops[from..].iter().for_each(|o| c.apply(o));
                assert_eq!(c, whole, "snapshot at {from}, state at {later}");
            }
        }
    }
}

//! SBS, the block storage of vpcd: volumes behind one interface ([`volume::Volume`]), the front
//! ends that serve them (NBD, vhost-user-blk), and the raft replication of a volume (`raft`).
//! The front ends know nothing of raft.

pub mod nbd;
pub mod raft;
mod sys;
#[doc(hidden)]
pub mod testing;
pub mod vhost_user;
pub mod volume;

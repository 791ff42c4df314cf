//! SBS, the block storage of vpcd: volumes behind one interface ([`volume::Volume`]) and the
//! front ends that serve them (NBD now). Raft replication of volumes comes next (issue 6); the
//! front ends know nothing of it.

pub mod nbd;
pub mod volume;

//! SBS, the block storage of vpcd: volumes behind one interface ([`volume::Volume`]), the front
//! ends that serve them (NBD now), and the raft replication of a volume (`raft`, being built:
//! log and state machine so far). The front ends know nothing of raft.

pub mod nbd;
pub mod raft;
pub mod volume;

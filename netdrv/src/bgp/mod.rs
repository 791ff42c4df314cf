//! BGP for the EVPN control plane (issue 5): so far the wire format ([`wire`]); the session
//! state machine and the speaker that advertises vpcd's ports come next.

pub mod session;
pub mod wire;

//! Client side of vpcd's D-Bus API: typed proxies, used by `vpcctl` and by the integration
//! tests (any other client can use them too).

pub mod proxy;

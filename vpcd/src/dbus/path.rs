//! Object paths of domains: `/org/vpcd/Host1/domain/<escaped name>`.

/// The host object, which also carries the `ObjectManager` for every domain below it.
pub const HOST_PATH: &str = "/org/vpcd/Host1";

/// A domain's path. Names are escaped into one object-path element: letters and digits stay,
/// every other byte becomes `_xx` (hex), as systemd does for unit names.
pub fn domain_path(name: &str) -> String {
    escaped(&format!("{HOST_PATH}/domain/"), name)
}

/// A network's path.
pub fn network_path(name: &str) -> String {
    escaped(&format!("{HOST_PATH}/network/"), name)
}

/// A port's path.
pub fn port_path(id: u32) -> String {
    format!("{HOST_PATH}/port/{id}")
}

/// A router's path.
pub fn router_path(name: &str) -> String {
    escaped(&format!("{HOST_PATH}/router/"), name)
}

/// A volume's path.
pub fn volume_path(name: &str) -> String {
    escaped(&format!("{HOST_PATH}/volume/"), name)
}

/// A floating IP's path (`.` escaped like any other byte).
pub fn floating_ip_path(ip: std::net::Ipv4Addr) -> String {
    escaped(&format!("{HOST_PATH}/floating_ip/"), &ip.to_string())
}

fn escaped(base: &str, name: &str) -> String {
    let mut p = String::from(base);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() {
            p.push(b as char);
        } else {
            p.push_str(&format!("_{b:02x}"));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_to_valid_distinct_paths() {
        assert_eq!(domain_path("vm1"), "/org/vpcd/Host1/domain/vm1");
        assert_eq!(
            domain_path("a-b.c_d"),
            "/org/vpcd/Host1/domain/a_2db_2ec_5fd"
        );
        assert_ne!(domain_path("a_2d"), domain_path("a-"));
        for name in ["a-b", "x.y", "0_9"] {
            zbus::zvariant::ObjectPath::try_from(domain_path(name)).unwrap();
        }
    }
}

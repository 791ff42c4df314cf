//! The metadata service: http://169.254.169.254 answered inside each tenant's router (service)
//! namespace, in the layouts cloud-init's EC2 and OpenStack sources read. The VM is the one
//! whose port has the request's source address in that tenant (port security keeps VMs from
//! borrowing another's address), so a VM only ever sees its own data.
//!
//! | path | body |
//! |---|---|
//! | `/` | the EC2 versions, `openstack` |
//! | `/V/meta-data/` | the keys below, one per line |
//! | `/V/meta-data/instance-id` | the VM's UUID (as in its NoCloud seed) |
//! | `/V/meta-data/hostname`, `local-hostname` | `cloud_init.hostname` or the VM name |
//! | `/V/meta-data/local-ipv4` | the port's address |
//! | `/V/meta-data/public-ipv4` | its floating IP (404 without one) |
//! | `/V/meta-data/public-keys/`, `.../public-keys/N/openssh-key` | `N=key-N`, the key |
//! | `/V/user-data` | `cloud_init.user_data` (404 without) |
//! | `PUT /V/api/token` | an IMDSv2 session token (cloud-init asks for one first) |
//! | `/openstack` | the OpenStack versions |
//! | `/openstack/V/meta_data.json` | `uuid`, `name`, `hostname`, `launch_index`, `public_keys`, `keys` |
//! | `/openstack/V/user_data` | as `/V/user-data` |
//! | `/openstack/V/vendor_data.json` | `{}` |
//!
//! `V` is `latest` or any dated version (`2009-04-04`, ...): they are all served the same.
//! HTTP/1.0-style: one GET per connection, `Connection: close`. A source address that is no
//! VM's port gets 404 for everything.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::{Error, Result};

pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// What the service tells one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub uuid: String,
    pub name: String,
    pub hostname: String,
    pub local_ipv4: Ipv4Addr,
    pub public_ipv4: Option<Ipv4Addr>,
    pub user_data: Option<String>,
    pub public_keys: Vec<String>,
}

/// EC2 versions listed at `/`; any `YYYY-MM-DD` version (what cloud-init asks for, such as
/// `2009-04-04` or `2021-03-23`) is served the same as `latest`.
const EC2_VERSIONS: &str = "2009-04-04\nlatest\n";
/// OpenStack versions listed at `/openstack` (cloud-init picks the newest it knows).
const OPENSTACK_VERSIONS: &str = "2012-08-10\n2013-04-04\n2016-06-30\n2018-08-27\nlatest\n";

/// `latest` or a date, `YYYY-MM-DD`.
fn is_version(v: &str) -> bool {
    v == "latest"
        || (v.len() == 10
            && v.bytes().enumerate().all(|(i, b)| match i {
                4 | 7 => b == b'-',
                _ => b.is_ascii_digit(),
            }))
}

/// The status and body for `method` `path` from `vm` (`None`: the source is no VM's).
pub fn respond(method: &str, path: &str, vm: Option<&Instance>) -> (u16, String) {
    let not_found = (404, "not found\n".to_string());
    let Some(vm) = vm else {
        return not_found;
    };
    let path = path.split('?').next().unwrap_or("");
    let path = path.trim_start_matches('/');
    let (first, rest) = path.split_once('/').unwrap_or((path, ""));
    match (method, first) {
        // IMDSv2: a session token for the requests that follow (any token is accepted: the
        // VM is known by its address).
        ("PUT", v) if is_version(v) && rest == "api/token" => (200, vm.uuid.replace('-', "")),
        ("GET", "") => (200, format!("{EC2_VERSIONS}openstack\n")),
        ("GET", "openstack") => {
            let (v, rest) = rest.split_once('/').unwrap_or((rest, ""));
            match v {
                "" => (200, OPENSTACK_VERSIONS.into()),
                v if is_version(v) => openstack(rest, vm).unwrap_or(not_found),
                _ => not_found,
            }
        }
        ("GET", v) if is_version(v) => ec2(rest, vm).unwrap_or(not_found),
        _ => not_found,
    }
}

/// `/<version>/<path>` in the EC2 layout.
fn ec2(path: &str, vm: &Instance) -> Option<(u16, String)> {
    let ok = |s: String| Some((200, s));
    let path = path.trim_end_matches('/');
    match path {
        "" => ok("meta-data/\nuser-data\n".into()),
        "meta-data" => {
            let mut keys = vec!["hostname", "instance-id", "local-hostname", "local-ipv4"];
            if vm.public_ipv4.is_some() {
                keys.push("public-ipv4");
            }
            if !vm.public_keys.is_empty() {
                keys.push("public-keys/");
            }
            ok(keys.join("\n") + "\n")
        }
        "meta-data/instance-id" => ok(vm.uuid.clone()),
        "meta-data/hostname" | "meta-data/local-hostname" => ok(vm.hostname.clone()),
        "meta-data/local-ipv4" => ok(vm.local_ipv4.to_string()),
        "meta-data/public-ipv4" => ok(vm.public_ipv4?.to_string()),
        "meta-data/public-keys" if !vm.public_keys.is_empty() => ok((0..vm.public_keys.len())
            .map(|i| format!("{i}=key-{i}\n"))
            .collect()),
        "user-data" => ok(vm.user_data.clone()?),
        p => {
            // meta-data/public-keys/N/openssh-key and meta-data/public-keys/N/
            let rest = p.strip_prefix("meta-data/public-keys/")?;
            let (n, tail) = rest.split_once('/').unwrap_or((rest, ""));
            let key = vm.public_keys.get(n.parse::<usize>().ok()?)?;
            match tail {
                "openssh-key" => ok(key.clone() + "\n"),
                "" => ok("openssh-key\n".into()),
                _ => None,
            }
        }
    }
}

/// `/openstack/<version>/<path>` in the OpenStack layout.
fn openstack(path: &str, vm: &Instance) -> Option<(u16, String)> {
    let ok = |s: String| Some((200, s));
    match path.trim_end_matches('/') {
        "" => ok("meta_data.json\nuser_data\nvendor_data.json\n".into()),
        "meta_data.json" => {
            let keys: BTreeMap<String, &String> = vm
                .public_keys
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("key-{i}"), k))
                .collect();
            let key_list: Vec<serde_json::Value> = keys
                .iter()
                .map(|(name, data)| serde_json::json!({"name": name, "type": "ssh", "data": data}))
                .collect();
            ok(serde_json::json!({
                "uuid": vm.uuid,
                "name": vm.name,
                "hostname": vm.hostname,
                "launch_index": 0,
                "public_keys": keys,
                "keys": key_list,
            })
            .to_string())
        }
        "user_data" => ok(vm.user_data.clone()?),
        "vendor_data.json" => ok("{}".into()),
        _ => None,
    }
}

/// Finds the VM behind a source address, in the tenant the server serves.
pub type Lookup = Arc<dyn Fn(Ipv4Addr) -> Option<Instance> + Send + Sync>;

/// A running metadata server; stops when dropped.
#[derive(Debug)]
pub struct MetadataServer {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MetadataServer {
    /// Listens on 169.254.169.254:80 inside `netns` (the address must be on one of its
    /// interfaces already).
    pub fn spawn(netns: &netdrv::Netns, lookup: Lookup) -> Result<MetadataServer> {
        let listener = netns
            .run(|| {
                let l = std::net::TcpListener::bind(SocketAddr::from((ADDRESS, 80)))?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })?
            .map_err(|e| {
                Error::Failed(format!(
                    "metadata service in {}: {e}",
                    netns.path().display()
                ))
            })?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::Failed(format!("metadata service: {e}")))?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    continue;
                };
                let lookup = lookup.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(conn, peer, lookup).await {
                        tracing::debug!(%peer, "metadata request: {e}");
                    }
                });
            }
        });
        Ok(MetadataServer { task })
    }
}

async fn serve(
    mut conn: tokio::net::TcpStream,
    peer: SocketAddr,
    lookup: Lookup,
) -> std::io::Result<()> {
    // The request head, up to 8 KiB, within 5 s.
    let mut buf = Vec::with_capacity(1024);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
            let n = conn.read(&mut chunk).await?;
            if n == 0 || buf.len() > 8192 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read)
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some(method @ ("GET" | "PUT")), Some(path)) => {
            let vm = match peer.ip() {
                std::net::IpAddr::V4(ip) => lookup(ip),
                _ => None,
            };
            respond(method, path, vm.as_ref())
        }
        _ => (400, "bad request\n".to_string()),
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let reply = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Instance {
        Instance {
            uuid: "0d9d4e5c-0000-4000-8000-000000000001".into(),
            name: "web1".into(),
            hostname: "web-one".into(),
            local_ipv4: Ipv4Addr::new(10, 0, 0, 2),
            public_ipv4: None,
            user_data: Some("#cloud-config\nruncmd: [true]\n".into()),
            public_keys: vec!["ssh-ed25519 AAAA a@b".into()],
        }
    }

    #[test]
    fn ec2_layout() {
        let v = vm();
        assert_eq!(
            respond("GET", "/latest/meta-data/hostname", Some(&v)),
            (200, "web-one".into())
        );
        assert_eq!(
            respond("GET", "/latest/meta-data/instance-id", Some(&v)).1,
            "0d9d4e5c-0000-4000-8000-000000000001"
        );
        assert_eq!(
            respond("GET", "/latest/meta-data/local-ipv4", Some(&v)).1,
            "10.0.0.2"
        );
        assert_eq!(
            respond("GET", "/latest/meta-data/public-ipv4", Some(&v)).0,
            404
        );
        assert_eq!(
            respond("GET", "/latest/meta-data/public-keys/", Some(&v)).1,
            "0=key-0\n"
        );
        assert_eq!(
            respond(
                "GET",
                "/latest/meta-data/public-keys/0/openssh-key",
                Some(&v)
            )
            .1,
            "ssh-ed25519 AAAA a@b\n"
        );
        assert_eq!(
            respond(
                "GET",
                "/latest/meta-data/public-keys/1/openssh-key",
                Some(&v)
            )
            .0,
            404
        );
        assert!(respond("GET", "/latest/meta-data/", Some(&v))
            .1
            .contains("public-keys/"));
        assert_eq!(
            respond("GET", "/latest/user-data", Some(&v)).1,
            "#cloud-config\nruncmd: [true]\n"
        );
    }

    #[test]
    fn openstack_layout() {
        let v = vm();
        let (s, body) = respond("GET", "/openstack/latest/meta_data.json", Some(&v));
        assert_eq!(s, 200);
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["hostname"], "web-one");
        assert_eq!(j["name"], "web1");
        assert_eq!(j["public_keys"]["key-0"], "ssh-ed25519 AAAA a@b");
        assert_eq!(
            respond("GET", "/openstack/latest/user_data", Some(&v)).0,
            200
        );
    }

    #[test]
    fn dated_versions_and_the_imdsv2_token_as_cloud_init_asks() {
        let v = vm();
        for version in ["2009-04-04", "2021-03-23", "latest"] {
            assert_eq!(
                respond(
                    "GET",
                    &format!("/{version}/meta-data/instance-id"),
                    Some(&v)
                )
                .1,
                v.uuid
            );
            assert_eq!(
                respond("GET", &format!("/{version}/user-data"), Some(&v)).0,
                200
            );
        }
        assert_eq!(
            respond("GET", "/2009-4-4/meta-data/hostname", Some(&v)).0,
            404
        );
        let (s, token) = respond("PUT", "/latest/api/token", Some(&v));
        assert_eq!(s, 200);
        assert!(!token.is_empty());
        assert_eq!(
            respond("PUT", "/latest/meta-data/hostname", Some(&v)).0,
            404
        );
        let versions = respond("GET", "/openstack", Some(&v)).1;
        assert!(versions.lines().any(|l| l == "2012-08-10"), "{versions}");
        let (s, body) = respond("GET", "/openstack/2012-08-10/meta_data.json", Some(&v));
        assert_eq!(s, 200);
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["uuid"], v.uuid.as_str());
        assert_eq!(j["keys"][0]["data"], "ssh-ed25519 AAAA a@b");
        assert_eq!(
            respond("GET", "/", Some(&v)).1,
            "2009-04-04\nlatest\nopenstack\n"
        );
    }

    #[test]
    fn unknown_sources_and_paths_get_nothing() {
        assert_eq!(respond("GET", "/latest/meta-data/hostname", None).0, 404);
        assert_eq!(respond("GET", "/latest/nothing", Some(&vm())).0, 404);
        let mut v = vm();
        v.user_data = None;
        assert_eq!(respond("GET", "/latest/user-data", Some(&v)).0, 404);
    }
}

//! Volume verbs (block storage, on hosts with the storage role).

use clap::Subcommand;
use serde_json::json;
use vpcctl::proxy::HostProxy;

use crate::table::{print_table, said};

// The verbs are virsh-style names (vol-create, ...): the common prefix is the point.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a replicated volume: NAME SIZE (bytes, or with K, M, G, T).
    VolCreate {
        name: String,
        size: String,
        /// Replicas (default 3, or as many storage nodes as there are).
        #[arg(long, default_value_t = 0)]
        replicas: u32,
    },
    /// List the volumes of the storage cluster (this host serves every one).
    VolList,
    /// Show a volume: size, leader, replicas, health, NBD URI.
    VolInfo { name: String },
    /// Grow a volume to SIZE (volumes never shrink).
    VolResize { name: String, size: String },
    /// Delete a volume on all its nodes (refused while a domain has it as a disk).
    VolDelete {
        name: String,
        /// Also when no leader of the volume answers to tell whether a domain has it.
        #[arg(long)]
        force: bool,
    },
    /// Forget that DOMAIN on storage node --node (default: this host's) has the volume as a
    /// disk: for a host that is gone (its guests must not run). A domain of this host keeps
    /// its volumes (detach-disk, undefine).
    VolRelease {
        name: String,
        domain: String,
        /// The storage node of the domain's host.
        #[arg(long)]
        node: Option<u64>,
    },
    /// Add a storage node (running, with this cluster's members) to the cluster: ID ADDRESS:PORT;
    /// replicas move onto it.
    StorageNodeAdd { id: u64, address: String },
    /// Remove a storage node (alive or dead) from the cluster; its replicas move elsewhere first.
    StorageNodeRemove { id: u64 },
    /// List the storage nodes of the cluster.
    StorageNodeList,
    /// Print the NBD URI this host serves the volume at (its unix socket, or --tcp).
    VolExport {
        name: String,
        /// The TCP URI (nbd:// or nbds://), where this host serves NBD over TCP.
        #[arg(long)]
        tcp: bool,
    },
}

/// A size: bytes, or a number with K, M, G or T (binary units).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("size {s:?}: a number of bytes, or with K, M, G, T"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| anyhow::anyhow!("size {s:?} is too large"))
}

fn to_json(r: &crate::proxy::VolumeRow) -> serde_json::Value {
    let (name, size, leader, health, members, uri, tcp_uri, users) = r;
    json!({
        "name": name,
        "size": size,
        "leader": (*leader != 0).then_some(*leader),
        "health": health,
        "replicas": members.iter().map(|(id, addr)| json!({"node": id, "address": addr})).collect::<Vec<_>>(),
        "uri": uri,
        "tcp_uri": (!tcp_uri.is_empty()).then_some(tcp_uri),
        "attachments": users.iter().map(|(node, domain, disk, ro)| json!({"node": node, "domain": domain, "disk": disk, "readonly": ro})).collect::<Vec<_>>(),
    })
}

/// A volume's users as a table cell: `web/vdb@2`, `db/vdc@3 (ro)`, or `-`.
fn users(users: &[(u64, String, String, bool)]) -> String {
    if users.is_empty() {
        return "-".into();
    }
    users
        .iter()
        .map(|(node, domain, disk, ro)| {
            format!("{domain}/{disk}@{node}{}", if *ro { " (ro)" } else { "" })
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn run(cmd: VolumeCmd, host: &HostProxy<'_>, json: bool) -> anyhow::Result<()> {
    match cmd {
        VolumeCmd::VolCreate {
            name,
            size,
            replicas,
        } => {
            let r = host
                .create_volume(&name, parse_size(&size)?, replicas)
                .await?;
            said(
                json,
                &format!(
                    "Volume '{name}' created ({} bytes, {} replicas)",
                    r.1,
                    r.4.len()
                ),
            );
        }
        VolumeCmd::VolResize { name, size } => {
            let r = host.resize_volume(&name, parse_size(&size)?).await?;
            said(json, &format!("Volume '{name}' resized to {} bytes", r.1));
        }
        VolumeCmd::VolDelete { name, force } => {
            if force {
                host.force_delete_volume(&name).await?;
            } else {
                host.delete_volume(&name).await?;
            }
            said(json, &format!("Volume '{name}' deleted"));
        }
        VolumeCmd::VolRelease { name, domain, node } => {
            // (0: this host's node.)
            host.release_volume(&name, node.unwrap_or(0), &domain)
                .await?;
            let on = node.map_or("this host".to_string(), |n| format!("node {n}"));
            said(
                json,
                &format!("Volume '{name}' released by domain '{domain}' on {on}"),
            );
        }
        VolumeCmd::VolExport { name, tcp } => {
            let r = host.volume_info(&name).await?;
            let uri = if tcp { &r.6 } else { &r.5 };
            if uri.is_empty() {
                anyhow::bail!(
                    "volume {name}: this host serves no NBD over TCP (storage_nbd_listen)"
                );
            }
            if json {
                println!("{}", json!({ "uri": uri }));
            } else {
                println!("{uri}");
            }
        }
        VolumeCmd::VolInfo { name } => {
            let r = host.volume_info(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&r))?);
            } else {
                let replicas: Vec<String> =
                    r.4.iter().map(|(id, a)| format!("{id} ({a})")).collect();
                for (k, v) in [
                    ("Name:", r.0.clone()),
                    ("Size:", format!("{} bytes", r.1)),
                    (
                        "Leader:",
                        if r.2 == 0 {
                            "-".into()
                        } else {
                            r.2.to_string()
                        },
                    ),
                    ("Replicas:", replicas.join(", ")),
                    ("Health:", r.3.clone()),
                    ("Attached:", users(&r.7)),
                    ("URI:", r.5.clone()),
                    (
                        "TCP URI:",
                        if r.6.is_empty() {
                            "-".into()
                        } else {
                            r.6.clone()
                        },
                    ),
                ] {
                    println!("{k:<10} {v}");
                }
                println!();
            }
        }
        VolumeCmd::StorageNodeAdd { id, address } => {
            let moves = host.add_storage_node(id, &address).await?;
            print_moves(json, &format!("Storage node {id} added"), &moves);
        }
        VolumeCmd::StorageNodeRemove { id } => {
            let moves = host.remove_storage_node(id).await?;
            print_moves(json, &format!("Storage node {id} removed"), &moves);
        }
        VolumeCmd::StorageNodeList => {
            let nodes = host.list_storage_nodes().await?;
            if json {
                let v: Vec<_> = nodes
                    .iter()
                    .map(|(id, a)| json!({"id": id, "address": a}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Id", "Address"],
                    nodes
                        .into_iter()
                        .map(|(id, a)| vec![id.to_string(), a])
                        .collect(),
                );
            }
        }
        VolumeCmd::VolList => {
            let (rows, unreachable) = host.list_volumes_with_unreachable().await?;
            for (id, addr) in &unreachable {
                eprintln!(
                    "warning: storage node {id} ({addr}) did not answer: volumes only it holds are not listed"
                );
            }
            if json {
                let v: Vec<_> = rows.iter().map(to_json).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Name", "Size", "Leader", "Replicas", "Health", "Attached"],
                    rows.into_iter()
                        .map(|(name, size, leader, health, members, _, _, attached)| {
                            vec![
                                name,
                                size.to_string(),
                                if leader == 0 {
                                    "-".into()
                                } else {
                                    leader.to_string()
                                },
                                members.len().to_string(),
                                health,
                                users(&attached),
                            ]
                        })
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

/// What a node joining or leaving did: the replica moves.
fn print_moves(json: bool, what: &str, moves: &[(String, u64, u64)]) {
    if json {
        let v: Vec<_> = moves
            .iter()
            .map(|(v, f, t)| json!({"volume": v, "from": f, "to": t}))
            .collect();
        println!("{}", json!({ "result": what, "moves": v }));
    } else {
        println!("{what}; {} replica(s) moved", moves.len());
        for (v, f, t) in moves {
            println!("  {v}: node {f} -> node {t}");
        }
        println!();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_take_binary_units_and_refuse_garbage() {
        assert_eq!(super::parse_size("512").unwrap(), 512);
        assert_eq!(super::parse_size("16M").unwrap(), 16 << 20);
        assert_eq!(super::parse_size("2g").unwrap(), 2 << 30);
        assert!(super::parse_size("1.5G").is_err());
        assert!(super::parse_size("M").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}

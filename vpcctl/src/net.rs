//! Tenant-network verbs: networks, subnets, ports.

use clap::Subcommand;
use serde_json::json;
use vpcctl::proxy::{HostProxy, NetworkProxy, PortProxy};

use crate::table::{print_table, said};

#[derive(Debug, Subcommand)]
pub enum NetCmd {
    /// Create a tenant network (VPC).
    NetCreate { name: String },
    /// List tenant networks.
    NetList,
    /// Show a network and its subnets.
    NetInfo { name: String },
    /// Delete a network (it must have no ports).
    NetDelete { name: String },
    /// Add a subnet to a network.
    SubnetCreate {
        network: String,
        name: String,
        /// IPv4 CIDR, e.g. 10.0.1.0/24 (the first address is the gateway's).
        cidr: String,
        /// VxLAN VNI (1-16777215); hosts sharing the subnet must use the same one.
        #[arg(long, default_value_t = 0)]
        vni: u32,
        /// Host-local VLAN on the tenant bridge (1-4094).
        #[arg(long, default_value_t = 0)]
        vlan: u16,
    },
    /// List a network's subnets.
    SubnetList { network: String },
    /// Delete a subnet (it must have no ports).
    SubnetDelete { network: String, name: String },
    /// Create a port for a network namespace (a veth; the namespace gets the other end).
    PortCreate {
        network: String,
        subnet: String,
        /// The namespace, e.g. /run/netns/ns1.
        #[arg(long)]
        netns: String,
        #[arg(long, default_value = "eth0")]
        ifname: String,
        #[arg(long, default_value = "")]
        ip: String,
        #[arg(long, default_value = "")]
        mac: String,
        /// Let the port send from any MAC and address.
        #[arg(long)]
        no_port_security: bool,
    },
    /// Install a static FDB entry: MAC on a subnet lives behind a remote VTEP.
    FdbAdd {
        network: String,
        subnet: String,
        mac: String,
        vtep: String,
    },
    /// Remove a static FDB entry.
    FdbDelete {
        network: String,
        subnet: String,
        mac: String,
    },
    /// List a network's static FDB entries.
    FdbList { network: String },
    /// List ports.
    PortList,
    /// Show a port and its counters.
    PortInfo { id: u32 },
    /// Delete a namespace port (a VM's ports go with the VM).
    PortDelete { id: u32 },
    /// Switch port security on or off.
    PortSecurity {
        id: u32,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

async fn network(
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    name: &str,
) -> zbus::Result<NetworkProxy<'static>> {
    let path = host.lookup_network(name).await?;
    vpcctl::proxy::object::<NetworkProxy>(conn, bus, path).await
}

async fn port(
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    id: u32,
) -> zbus::Result<PortProxy<'static>> {
    let path = host.lookup_port(id).await?;
    vpcctl::proxy::object::<PortProxy>(conn, bus, path).await
}

pub async fn run(
    cmd: NetCmd,
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        NetCmd::NetCreate { name } => {
            host.create_network(&name).await?;
            said(json, &format!("Network '{name}' created"));
        }
        NetCmd::NetList => {
            let mut rows = Vec::new();
            for path in host.list_networks().await? {
                let n = vpcctl::proxy::object::<NetworkProxy>(conn, bus, path).await?;
                rows.push((n.name().await?, n.id().await?, n.subnets().await?.len()));
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, id, s)| json!({"name": n, "id": id, "subnets": s}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Name", "Id", "Subnets"],
                    rows.into_iter()
                        .map(|(n, id, s)| vec![n, id.to_string(), s.to_string()])
                        .collect(),
                );
            }
        }
        NetCmd::NetInfo { name } | NetCmd::SubnetList { network: name } => {
            let n = network(conn, host, bus, &name).await?;
            let subnets = n.subnets().await?;
            if json {
                let v: Vec<_> = subnets
                    .iter()
                    .map(|(s, c, g, vlan, vni)| {
                        json!({"name": s, "cidr": c, "gateway": g, "vlan": vlan, "vni": vni})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"name": name, "id": n.id().await?, "subnets": v})
                    )?
                );
            } else {
                println!("{:<16}{name}\n{:<16}{}\n", "Name:", "Id:", n.id().await?);
                print_table(
                    &["Subnet", "CIDR", "Gateway", "VLAN", "VNI"],
                    subnets
                        .into_iter()
                        .map(|(s, c, g, vlan, vni)| {
                            vec![s, c, g, vlan.to_string(), vni.to_string()]
                        })
                        .collect(),
                );
            }
        }
        NetCmd::NetDelete { name } => {
            network(conn, host, bus, &name).await?.delete().await?;
            said(json, &format!("Network '{name}' deleted"));
        }
        NetCmd::SubnetCreate {
            network: net,
            name,
            cidr,
            vni,
            vlan,
        } => {
            network(conn, host, bus, &net)
                .await?
                .create_subnet(&name, &cidr, vni, vlan)
                .await?;
            said(json, &format!("Subnet '{net}/{name}' created"));
        }
        NetCmd::SubnetDelete { network: net, name } => {
            network(conn, host, bus, &net)
                .await?
                .delete_subnet(&name)
                .await?;
            said(json, &format!("Subnet '{net}/{name}' deleted"));
        }
        NetCmd::PortCreate {
            network: net,
            subnet,
            netns,
            ifname,
            ip,
            mac,
            no_port_security,
        } => {
            let path = host
                .create_port(&net, &subnet, &netns, &ifname, &ip, &mac, !no_port_security)
                .await?;
            let id: u32 = path.as_str().rsplit('/').next().unwrap_or("0").parse()?;
            let p = port(conn, host, bus, id).await?;
            if json {
                println!(
                    "{}",
                    json!({"id": id, "device": p.device().await?, "mac": p.mac().await?, "ip": p.ip().await?})
                );
            } else {
                println!(
                    "Port {id} created: {} {} {}\n",
                    p.device().await?,
                    p.mac().await?,
                    p.ip().await?
                );
            }
        }
        NetCmd::FdbAdd {
            network: net,
            subnet,
            mac,
            vtep,
        } => {
            network(conn, host, bus, &net)
                .await?
                .add_remote_mac(&subnet, &mac, &vtep)
                .await?;
            said(json, &format!("{mac} on {net}/{subnet} is behind {vtep}"));
        }
        NetCmd::FdbDelete {
            network: net,
            subnet,
            mac,
        } => {
            network(conn, host, bus, &net)
                .await?
                .remove_remote_mac(&subnet, &mac)
                .await?;
            said(json, &format!("{mac} on {net}/{subnet} removed"));
        }
        NetCmd::FdbList { network: net } => {
            let entries = network(conn, host, bus, &net).await?.remote_macs().await?;
            if json {
                let v: Vec<_> = entries
                    .iter()
                    .map(|(s, m, v)| json!({"subnet": s, "mac": m, "vtep": v}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Subnet", "MAC", "VTEP"],
                    entries.into_iter().map(|(s, m, v)| vec![s, m, v]).collect(),
                );
            }
        }
        NetCmd::PortList => {
            let mut rows = Vec::new();
            for path in host.list_ports().await? {
                let p = vpcctl::proxy::object::<PortProxy>(conn, bus, path).await?;
                rows.push(vec![
                    p.id().await?.to_string(),
                    p.device().await?,
                    format!("{}/{}", p.network().await?, p.subnet().await?),
                    p.mac().await?,
                    p.ip().await?,
                    if p.port_security().await? {
                        "on"
                    } else {
                        "off"
                    }
                    .to_string(),
                    p.domain().await?,
                ]);
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        json!({"id": r[0].parse::<u32>().unwrap_or(0), "device": r[1], "subnet": r[2],
                               "mac": r[3], "ip": r[4], "port_security": r[5] == "on", "domain": r[6]})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Id", "Device", "Subnet", "MAC", "IP", "Security", "Domain"],
                    rows,
                );
            }
        }
        NetCmd::PortInfo { id } => {
            let p = port(conn, host, bus, id).await?;
            let c = p.get_counters().await?;
            let get = |k: &str| c.get(k).copied().unwrap_or(0);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "id": id, "device": p.device().await?, "kind": p.kind().await?,
                        "network": p.network().await?, "subnet": p.subnet().await?,
                        "mac": p.mac().await?, "ip": p.ip().await?,
                        "port_security": p.port_security().await?, "domain": p.domain().await?,
                        "counters": c,
                    }))?
                );
            } else {
                for (k, v) in [
                    ("Id", id.to_string()),
                    ("Device", p.device().await?),
                    ("Kind", p.kind().await?),
                    (
                        "Subnet",
                        format!("{}/{}", p.network().await?, p.subnet().await?),
                    ),
                    ("MAC", p.mac().await?),
                    ("IP", p.ip().await?),
                    (
                        "Port security",
                        if p.port_security().await? {
                            "on"
                        } else {
                            "off"
                        }
                        .into(),
                    ),
                    ("Domain", p.domain().await?),
                    ("RX packets", get("rx_packets").to_string()),
                    ("RX bytes", get("rx_bytes").to_string()),
                    ("TX packets", get("tx_packets").to_string()),
                    ("TX bytes", get("tx_bytes").to_string()),
                    ("Dropped VLAN", get("drop_vlan").to_string()),
                    ("Dropped security", get("drop_security").to_string()),
                ] {
                    println!("{:<18}{v}", format!("{k}:"));
                }
                println!();
            }
        }
        NetCmd::PortDelete { id } => {
            port(conn, host, bus, id).await?.delete().await?;
            said(json, &format!("Port {id} deleted"));
        }
        NetCmd::PortSecurity { id, state } => {
            port(conn, host, bus, id)
                .await?
                .set_port_security(state == "on")
                .await?;
            said(json, &format!("Port {id}: port security {state}"));
        }
    }
    Ok(())
}

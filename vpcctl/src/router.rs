//! Router and floating-IP verbs.

use clap::Subcommand;
use serde_json::json;
use vpcctl::proxy::{FloatingIpProxy, HostProxy, RouterProxy};

use crate::table::{print_table, said};

#[derive(Debug, Subcommand)]
pub enum RouterCmd {
    /// Create a router for a network (one per network).
    RouterCreate { name: String, network: String },
    /// List routers.
    RouterList,
    /// Show a router: subnets, gateway, routes, namespace.
    RouterInfo { name: String },
    /// Delete a router (it must have no subnets attached).
    RouterDelete { name: String },
    /// Attach a subnet of the router's network (SUBNET or NETWORK/SUBNET).
    RouterAddSubnet { name: String, subnet: String },
    /// Detach a subnet.
    RouterRemoveSubnet { name: String, subnet: String },
    /// Put the router on the external network (SNAT), or take it off with --clear.
    RouterSetGateway {
        name: String,
        /// The external address; default: the next free one of the pool.
        #[arg(long, default_value = "")]
        ip: String,
        #[arg(long, conflicts_with = "ip")]
        clear: bool,
    },
    /// Add (or replace) a static route: DEST (a.b.c.d/n) via NEXT_HOP.
    RouterAddRoute {
        name: String,
        destination: String,
        via: String,
    },
    /// Remove a static route.
    RouterRemoveRoute { name: String, destination: String },
    /// Allocate a floating IP from the external pool.
    FipCreate {
        /// The address; default: the next free one of the pool.
        #[arg(long, default_value = "")]
        ip: String,
    },
    /// Map a floating IP to a port (its subnet must be attached to a router with a gateway).
    FipAttach { ip: String, port: u32 },
    /// Unmap a floating IP.
    FipDetach { ip: String },
    /// Release a floating IP.
    FipDelete { ip: String },
    /// List floating IPs.
    FipList,
    /// EVPN: BGP sessions to the route reflectors, with state, uptime and routes received.
    BgpSessions,
    /// EVPN: routes learned (in) and advertised (out), per VNI.
    EvpnRoutes {
        /// Only this VNI.
        #[arg(long)]
        vni: Option<u32>,
    },
}

async fn router(
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    name: &str,
) -> zbus::Result<RouterProxy<'static>> {
    let path = host.lookup_router(name).await?;
    vpcctl::proxy::object::<RouterProxy>(conn, bus, path).await
}

async fn fip(
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    ip: &str,
) -> zbus::Result<FloatingIpProxy<'static>> {
    let path = host.lookup_floating_ip(ip).await?;
    vpcctl::proxy::object::<FloatingIpProxy>(conn, bus, path).await
}

pub async fn run(
    cmd: RouterCmd,
    conn: &zbus::Connection,
    host: &HostProxy<'_>,
    bus: &str,
    json: bool,
) -> anyhow::Result<()> {
    match cmd {
        RouterCmd::RouterCreate { name, network } => {
            host.create_router(&name, &network).await?;
            said(
                json,
                &format!("Router '{name}' created for network '{network}'"),
            );
        }
        RouterCmd::RouterList => {
            let mut rows = Vec::new();
            for path in host.list_routers().await? {
                let r = vpcctl::proxy::object::<RouterProxy>(conn, bus, path).await?;
                rows.push((
                    r.name().await?,
                    r.network().await?,
                    r.subnets().await?.join(","),
                    r.external_address().await?,
                ));
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, net, s, x)| {
                        json!({"name": n, "network": net, "subnets": s, "external_address": x})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Name", "Network", "Subnets", "External address"],
                    rows.into_iter()
                        .map(|(n, net, s, x)| vec![n, net, s, x])
                        .collect(),
                );
            }
        }
        RouterCmd::RouterInfo { name } => {
            let r = router(conn, host, bus, &name).await?;
            let (network, subnets, ext, routes, ns) = (
                r.network().await?,
                r.subnets().await?,
                r.external_address().await?,
                r.routes().await?,
                r.namespace().await?,
            );
            if json {
                let routes: Vec<_> = routes
                    .iter()
                    .map(|(d, v)| json!({"destination": d, "via": v}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": name, "network": network, "subnets": subnets,
                        "external_address": ext, "routes": routes, "namespace": ns,
                    }))?
                );
            } else {
                println!("{:<18}{name}", "Name:");
                println!("{:<18}{network}", "Network:");
                println!("{:<18}{}", "Subnets:", subnets.join(", "));
                println!("{:<18}{ext}", "External address:");
                println!("{:<18}{ns}\n", "Namespace:");
                print_table(
                    &["Destination", "Via"],
                    routes.into_iter().map(|(d, v)| vec![d, v]).collect(),
                );
            }
        }
        RouterCmd::RouterDelete { name } => {
            router(conn, host, bus, &name).await?.delete().await?;
            said(json, &format!("Router '{name}' deleted"));
        }
        RouterCmd::RouterAddSubnet { name, subnet } => {
            router(conn, host, bus, &name)
                .await?
                .add_subnet(&subnet)
                .await?;
            said(
                json,
                &format!("Subnet '{subnet}' attached to router '{name}'"),
            );
        }
        RouterCmd::RouterRemoveSubnet { name, subnet } => {
            router(conn, host, bus, &name)
                .await?
                .remove_subnet(&subnet)
                .await?;
            said(
                json,
                &format!("Subnet '{subnet}' detached from router '{name}'"),
            );
        }
        RouterCmd::RouterSetGateway { name, ip, clear } => {
            let r = router(conn, host, bus, &name).await?;
            if clear {
                r.clear_gateway().await?;
                said(
                    json,
                    &format!("Router '{name}' is off the external network"),
                );
            } else {
                let ip = r.set_gateway(&ip).await?;
                said(json, &format!("Router '{name}' gateway set: {ip}"));
            }
        }
        RouterCmd::RouterAddRoute {
            name,
            destination,
            via,
        } => {
            router(conn, host, bus, &name)
                .await?
                .add_route(&destination, &via)
                .await?;
            said(
                json,
                &format!("Route {destination} via {via} added to router '{name}'"),
            );
        }
        RouterCmd::RouterRemoveRoute { name, destination } => {
            router(conn, host, bus, &name)
                .await?
                .remove_route(&destination)
                .await?;
            said(
                json,
                &format!("Route {destination} removed from router '{name}'"),
            );
        }
        RouterCmd::FipCreate { ip } => {
            let path = host.create_floating_ip(&ip).await?;
            let f = vpcctl::proxy::object::<FloatingIpProxy>(conn, bus, path).await?;
            said(json, &format!("Floating IP {} created", f.address().await?));
        }
        RouterCmd::FipAttach { ip, port } => {
            fip(conn, host, bus, &ip).await?.attach(port).await?;
            said(json, &format!("Floating IP {ip} attached to port {port}"));
        }
        RouterCmd::FipDetach { ip } => {
            fip(conn, host, bus, &ip).await?.detach().await?;
            said(json, &format!("Floating IP {ip} detached"));
        }
        RouterCmd::FipDelete { ip } => {
            fip(conn, host, bus, &ip).await?.delete().await?;
            said(json, &format!("Floating IP {ip} deleted"));
        }
        RouterCmd::BgpSessions => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let rows = host.bgp_sessions().await?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(p, s, since, n)| {
                        json!({"peer": p, "state": s, "uptime_secs": (*since > 0).then(|| now.saturating_sub(*since)), "prefixes": n})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Peer", "State", "Up", "Prefixes"],
                    rows.into_iter()
                        .map(|(p, s, since, n)| {
                            let up = if since > 0 {
                                format!("{}s", now.saturating_sub(since))
                            } else {
                                "-".into()
                            };
                            vec![p, s, up, n.to_string()]
                        })
                        .collect(),
                );
            }
        }
        RouterCmd::EvpnRoutes { vni } => {
            let mut rows = host.evpn_routes().await?;
            rows.retain(|(_, v, _, _)| vni.is_none_or(|want| *v == want));
            rows.sort_by(|a, b| (a.1, &a.0, &a.2).cmp(&(b.1, &b.0, &b.2)));
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(d, v, r, t)| json!({"direction": d, "vni": v, "route": r, "vtep": t}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["VNI", "Dir", "Route", "VTEP"],
                    rows.into_iter()
                        .map(|(d, v, r, t)| vec![v.to_string(), d, r, t])
                        .collect(),
                );
            }
        }
        RouterCmd::FipList => {
            let mut rows = Vec::new();
            for path in host.list_floating_ips().await? {
                let f = vpcctl::proxy::object::<FloatingIpProxy>(conn, bus, path).await?;
                rows.push((f.address().await?, f.port().await?));
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(a, p)| json!({"address": a, "port": (*p != 0).then_some(*p)}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Address", "Port"],
                    rows.into_iter()
                        .map(|(a, p)| vec![a, if p == 0 { "-".into() } else { p.to_string() }])
                        .collect(),
                );
            }
        }
    }
    Ok(())
}

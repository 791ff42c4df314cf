//! The nftables table of a router: forwarding policy, SNAT and floating IPs, written as nft's
//! JSON and applied with `nft -j -f -` inside the router's namespace, as one transaction that
//! replaces the whole table (add, delete, add again), so a change never leaves half a table.
//!
//! The table is `ip vpcd`, the only one vpcd makes in a namespace it owns:
//!
//! ```text
//! table ip vpcd {
//!   chain forward { type filter hook forward priority 0; policy drop;
//!     ct state established,related accept
//!     iifname { <legs of attached subnets> } oifname { <same> } accept   # between subnets
//!     iifname { <legs> } oifname "ext0" accept                           # out, SNAT below
//!     iifname "ext0" ct status dnat accept                                # in, to floating IPs
//!   }
//!   chain prerouting { type nat hook prerouting priority -100;
//!     iifname "ext0" ip daddr <floating IP> dnat to <port address>        # per floating IP
//!   }
//!   chain postrouting { type nat hook postrouting priority 100;
//!     oifname "ext0" ip saddr <port address> snat to <floating IP>        # per floating IP
//!     oifname "ext0" ip saddr { <attached subnets> } snat to <router's external address>
//!   }
//! }
//! ```
//! Legs of subnets not attached to the router (DHCP only) forward nothing.
//!
//! In the host namespace vpcd has one more table, `bridge vpcd_<prefix>`, that keeps the
//! service legs (`dhcp.rs`), whose address and MAC every host shares, local: their frames never
//! go out of or come in through a VxLAN device.
//!
//! ```text
//! table bridge vpcd_<prefix> {
//!   chain forward { type filter hook forward priority 0; policy accept;
//!     oifname <VxLAN device> ether saddr <service MAC> drop     # per service leg
//!     oifname <VxLAN device> ether daddr <service MAC> drop
//!     iifname <VxLAN device> ether saddr <service MAC> drop
//!   }
//! }
//! ```

use std::net::Ipv4Addr;

use netdrv::ipam::{Ipv4Cidr, Mac};
use netdrv::Netns;
use serde_json::{json, Value};

use crate::error::{Error, Result};

pub const TABLE: &str = "vpcd";
/// The router's external interface inside its namespace.
pub const EXTERNAL_IF: &str = "ext0";

/// What a router's table says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouterRules {
    /// Interfaces (legs) of the attached subnets.
    pub legs: Vec<String>,
    /// CIDRs of the attached subnets (SNAT sources).
    pub subnets: Vec<Ipv4Cidr>,
    /// The router's external address, if it has a gateway.
    pub external_ip: Option<Ipv4Addr>,
    /// (floating IP, port address).
    pub floating: Vec<(Ipv4Addr, Ipv4Addr)>,
}

fn table() -> Value {
    json!({"family": "ip", "name": TABLE})
}

fn chain(name: &str, kind: &str, hook: &str, prio: i32, policy: &str) -> Value {
    json!({"add": {"chain": {
        "family": "ip", "table": TABLE, "name": name,
        "type": kind, "hook": hook, "prio": prio, "policy": policy
    }}})
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": "ip", "table": TABLE, "chain": chain, "expr": expr}}})
}

fn is(key: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"meta": {"key": key}}, "right": right}})
}

fn ip_is(field: &str, right: Value) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}}, "right": right}})
}

fn names(v: &[String]) -> Value {
    json!({"set": v})
}

/// The batch that replaces the table with `r`'s.
pub fn ruleset(r: &RouterRules) -> Value {
    let accept = json!({"accept": null});
    let mut cmds = vec![
        json!({"add": {"table": table()}}),
        json!({"delete": {"table": table()}}),
        json!({"add": {"table": table()}}),
        chain("forward", "filter", "forward", 0, "drop"),
        chain("prerouting", "nat", "prerouting", -100, "accept"),
        chain("postrouting", "nat", "postrouting", 100, "accept"),
        rule(
            "forward",
            vec![
                json!({"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                 "right": ["established", "related"]}}),
                accept.clone(),
            ],
        ),
    ];
    if !r.legs.is_empty() {
        cmds.push(rule(
            "forward",
            vec![
                is("iifname", names(&r.legs)),
                is("oifname", names(&r.legs)),
                accept.clone(),
            ],
        ));
    }
    if let Some(ext_ip) = r.external_ip {
        if !r.legs.is_empty() {
            cmds.push(rule(
                "forward",
                vec![
                    is("iifname", names(&r.legs)),
                    is("oifname", json!(EXTERNAL_IF)),
                    accept.clone(),
                ],
            ));
        }
        cmds.push(rule(
            "forward",
            vec![
                is("iifname", json!(EXTERNAL_IF)),
                json!({"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}),
                accept.clone(),
            ],
        ));
        for (fip, private) in &r.floating {
            cmds.push(rule(
                "prerouting",
                vec![
                    is("iifname", json!(EXTERNAL_IF)),
                    ip_is("daddr", json!(fip.to_string())),
                    json!({"dnat": {"addr": private.to_string()}}),
                ],
            ));
            cmds.push(rule(
                "postrouting",
                vec![
                    is("oifname", json!(EXTERNAL_IF)),
                    ip_is("saddr", json!(private.to_string())),
                    json!({"snat": {"addr": fip.to_string()}}),
                ],
            ));
        }
        if !r.subnets.is_empty() {
            let prefixes: Vec<Value> = r
                .subnets
                .iter()
                .map(|c| json!({"prefix": {"addr": c.network().to_string(), "len": c.prefix()}}))
                .collect();
            cmds.push(rule(
                "postrouting",
                vec![
                    is("oifname", json!(EXTERNAL_IF)),
                    ip_is("saddr", json!({"set": prefixes})),
                    json!({"snat": {"addr": ext_ip.to_string()}}),
                ],
            ));
        }
    }
    json!({"nftables": cmds})
}

/// The batch that removes the table (and nothing if there is none).
pub fn removal() -> Value {
    removal_of(table())
}

fn removal_of(table: Value) -> Value {
    json!({"nftables": [
        {"add": {"table": table}},
        {"delete": {"table": table}},
    ]})
}

/// The host-namespace table of the vpcd instance with link prefix `prefix`.
pub fn local_table(prefix: &str) -> String {
    format!("vpcd_{prefix}")
}

/// The batch that makes `bridge vpcd_<prefix>` keep the frames of `ports` ((VxLAN device,
/// MAC) pairs) off the VxLAN devices, replacing the table whole; without ports, its removal.
pub fn local_ruleset(prefix: &str, ports: &[(String, Mac)]) -> Value {
    let name = local_table(prefix);
    let table = json!({"family": "bridge", "name": name});
    if ports.is_empty() {
        return removal_of(table);
    }
    let mut cmds = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": table}}),
        json!({"add": {"chain": {
            "family": "bridge", "table": name, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"
        }}}),
    ];
    for (dev, mac) in ports {
        for (port, field) in [
            ("oifname", "saddr"),
            ("oifname", "daddr"),
            ("iifname", "saddr"),
        ] {
            cmds.push(json!({"add": {"rule": {
                "family": "bridge", "table": name, "chain": "forward",
                "expr": [
                    is(port, json!(dev)),
                    {"match": {"op": "==",
                               "left": {"payload": {"protocol": "ether", "field": field}},
                               "right": mac.to_string()}},
                    {"drop": null},
                ],
            }}}));
        }
    }
    json!({"nftables": cmds})
}

/// Runs `nft -j -f -` with `batch` inside `netns`.
pub fn apply(netns: &Netns, batch: &Value) -> Result<()> {
    use std::io::Write;
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["-j", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    netns.enter_in_child(&mut cmd);
    let what = || format!("nft in {}", netns.path().display());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Failed(format!("{}: {e} (is nftables installed?)", what())))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(batch.to_string().as_bytes())
        .map_err(|e| Error::Failed(format!("{}: {e}", what())))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::Failed(format!("{}: {e}", what())))?;
    if !out.status.success() {
        return Err(Error::Failed(format!(
            "{}: {}",
            what(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A table as vpcd last wrote it in a namespace: the batch, and the namespace's ruleset
/// generation right after.
pub type Written = (Value, u32);

/// Writes `batch` in `netns` unless `last` shows it there already: the same batch, and the
/// ruleset not changed since (its generation, `netdrv::nftgen`), so a table deleted or edited
/// behind vpcd's back is written again; `force` writes it regardless. Returns what to keep as
/// `last` next time.
pub fn sync_table(
    netns: &Netns,
    batch: &Value,
    last: Option<&Written>,
    force: bool,
) -> Result<Written> {
    if let Some((b, generation)) = last {
        if !force && b == batch && netdrv::nftgen::generation(netns)? == *generation {
            return Ok((batch.clone(), *generation));
        }
    }
    apply(netns, batch)?;
    Ok((batch.clone(), netdrv::nftgen::generation(netns)?))
}

/// The floating IP mappings (floating IP, port address) of the table in `netns` now: its
/// prerouting DNAT rules. None without a table.
pub fn floating_in(netns: &Netns) -> Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    let mut cmd = std::process::Command::new("nft");
    cmd.args(["-j", "list", "table", "ip", TABLE])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    netns.enter_in_child(&mut cmd);
    let out = cmd.output().map_err(|e| {
        Error::Failed(format!(
            "nft in {}: {e} (is nftables installed?)",
            netns.path().display()
        ))
    })?;
    if !out.status.success() {
        // No such table.
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Failed(format!("nft -j list: {e}")))?;
    Ok(dnat_mappings(&v))
}

/// The (destination, DNAT target) pairs of the prerouting rules in an `nft -j list` output.
fn dnat_mappings(v: &Value) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let rules = v["nftables"].as_array().into_iter().flatten();
    rules
        .filter_map(|item| {
            let r = item.get("rule")?;
            if r["chain"] != "prerouting" {
                return None;
            }
            let expr = r["expr"].as_array()?;
            let daddr = expr.iter().find_map(|e| {
                let m = e.get("match")?;
                (m["left"]["payload"]["field"] == "daddr").then(|| m["right"].as_str())?
            })?;
            let to = expr.iter().find_map(|e| e.get("dnat")?["addr"].as_str())?;
            Some((daddr.parse().ok()?, to.parse().ok()?))
        })
        .collect()
}

/// Deletes the conntrack entries of flows to or translated to `ip` inside `netns` (`conntrack
/// -D`, best effort: none to delete is fine, a missing tool is logged).
pub fn flush_flows(netns: &Netns, ip: Ipv4Addr) {
    for sel in ["--orig-dst", "--reply-dst"] {
        let mut cmd = std::process::Command::new("conntrack");
        cmd.args(["-D", sel, &ip.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        netns.enter_in_child(&mut cmd);
        if let Err(e) = cmd.status() {
            tracing::warn!("conntrack -D {sel} {ip}: {e} (is conntrack installed?)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: &Value) -> Vec<&Value> {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .collect()
    }

    #[test]
    fn a_router_without_gateway_only_forwards_between_its_subnets() {
        let r = RouterRules {
            legs: vec!["gw10".into(), "gw20".into()],
            subnets: vec!["10.0.0.0/24".parse().unwrap()],
            ..Default::default()
        };
        let v = ruleset(&r);
        let rs = rules(&v);
        assert_eq!(rs.len(), 2, "{v}");
        assert_eq!(rs[1]["expr"][0]["match"]["right"]["set"][1], "gw20");
        assert!(!v.to_string().contains("snat"));
        // The table is replaced whole: add, delete, add.
        let first: Vec<&str> = v["nftables"].as_array().unwrap()[..3]
            .iter()
            .map(|c| c.as_object().unwrap().keys().next().unwrap().as_str())
            .collect();
        assert_eq!(first, ["add", "delete", "add"]);
    }

    #[test]
    fn floating_ips_come_before_the_subnet_snat() {
        let r = RouterRules {
            legs: vec!["gw10".into()],
            subnets: vec!["10.0.0.0/24".parse().unwrap()],
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
            floating: vec![(Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(10, 0, 0, 2))],
        };
        let v = ruleset(&r);
        let all = rules(&v);
        let post: Vec<&Value> = all
            .iter()
            .copied()
            .filter(|r| r["chain"] == "postrouting")
            .collect();
        assert_eq!(post.len(), 2);
        assert_eq!(post[0]["expr"][2]["snat"]["addr"], "203.0.113.11");
        assert_eq!(post[1]["expr"][2]["snat"]["addr"], "203.0.113.10");
        assert_eq!(
            post[1]["expr"][1]["match"]["right"]["set"][0]["prefix"]["len"],
            24
        );
        let pre: Vec<&Value> = all
            .iter()
            .copied()
            .filter(|r| r["chain"] == "prerouting")
            .collect();
        assert_eq!(pre[0]["expr"][2]["dnat"]["addr"], "10.0.0.2");
    }

    #[test]
    fn dnat_mappings_are_read_back_from_nft_list_output() {
        // As `nft -j list table ip vpcd` prints a table with one floating IP.
        let listed = json!({"nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "vpcd", "handle": 1}},
            {"rule": {"family": "ip", "table": "vpcd", "chain": "prerouting", "handle": 7,
                "expr": [
                    {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "ext0"}},
                    {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                               "right": "203.0.113.11"}},
                    {"dnat": {"addr": "10.0.0.2"}}]}},
            {"rule": {"family": "ip", "table": "vpcd", "chain": "postrouting", "handle": 8,
                "expr": [{"snat": {"addr": "203.0.113.11"}}]}},
        ]});
        assert_eq!(
            dnat_mappings(&listed),
            vec![(Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(10, 0, 0, 2))]
        );
    }

    #[test]
    fn the_applied_table_reads_back_its_floating_ips() {
        // A real table in a throw-away namespace (needs root and nft, as CI has).
        let name = format!("vpcdut-nat-{}", std::process::id());
        let ns = Netns::create_named(&name).unwrap();
        let mapping = (Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(10, 0, 0, 2));
        let r = RouterRules {
            legs: vec!["gw10".into()],
            subnets: vec!["10.0.0.0/24".parse().unwrap()],
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
            floating: vec![mapping],
        };
        let got = (|| {
            let none = floating_in(&ns)?;
            apply(&ns, &ruleset(&r))?;
            let one = floating_in(&ns)?;
            apply(&ns, &removal())?;
            Ok::<_, Error>((none, one, floating_in(&ns)?))
        })();
        Netns::delete_named(&name).unwrap();
        let (none, one, after) = got.unwrap();
        assert!(none.is_empty());
        assert_eq!(one, vec![mapping]);
        assert!(after.is_empty());
    }

    #[test]
    fn service_legs_stay_off_the_vxlan_devices_in_both_directions() {
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        let v = local_ruleset("vpc", &[("vpcx2710".into(), mac)]);
        assert_eq!(v["nftables"][2]["add"]["table"]["name"], "vpcd_vpc");
        assert_eq!(v["nftables"][2]["add"]["table"]["family"], "bridge");
        let rs = rules(&v);
        assert_eq!(rs.len(), 3);
        for r in &rs {
            assert_eq!(r["expr"][0]["match"]["right"], "vpcx2710");
            assert_eq!(r["expr"][1]["match"]["right"], "02:00:00:00:00:01");
            assert!(r["expr"][2].get("drop").is_some());
        }
        // Nothing to keep local: the table goes.
        let none = local_ruleset("vpc", &[]);
        assert_eq!(none["nftables"][1]["delete"]["table"]["name"], "vpcd_vpc");
        assert!(rules(&none).is_empty());
    }

    #[test]
    fn nft_accepts_the_tables_it_is_given() {
        // Checked by nft itself (no kernel change: --check), when nft is installed.
        let r = RouterRules {
            legs: vec!["gw10".into(), "gw20".into()],
            subnets: vec![
                "10.0.0.0/24".parse().unwrap(),
                "10.0.1.0/24".parse().unwrap(),
            ],
            external_ip: Some(Ipv4Addr::new(203, 0, 113, 10)),
            floating: vec![(Ipv4Addr::new(203, 0, 113, 11), Ipv4Addr::new(10, 0, 0, 2))],
        };
        let local = [("vpcx2710".to_string(), Mac([2, 0, 0, 0, 0, 1]))];
        for batch in [
            ruleset(&r),
            ruleset(&RouterRules::default()),
            removal(),
            local_ruleset("vpc", &local),
            local_ruleset("vpc", &[]),
        ] {
            let mut child = std::process::Command::new("nft")
                .args(["-j", "--check", "-f", "-"])
                .stdin(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("nft (scripts/install-deps.sh installs nftables)");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(batch.to_string().as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{batch}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

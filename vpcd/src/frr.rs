//! The management role: FRR (zebra + bgpd) as the EVPN route reflector of the compute hosts,
//! configured and supervised by vpcd.
//!
//! vpcd writes `<state_dir>/frr/{zebra,bgpd}.conf` from its own configuration (AS `bgp_asn`,
//! router id `bgp_router_id` or `underlay_ip`, `bgp listen range <bgp_listen_range>` with a
//! peer group of iBGP route-reflector clients for l2vpn evpn), starts both daemons in the
//! host namespace (`netns`) with that directory for their pid files and vty sockets, and checks
//! them every second: a daemon that died is started again. The daemons outlive vpcd (a restarted
//! vpcd finds them by their pid files and keeps them if the configuration is unchanged), so a
//! vpcd restart does not reset the reflector's sessions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use netdrv::Netns;

/// What the reflector is made from.
#[derive(Debug, Clone)]
pub struct FrrConfig {
    pub dir: PathBuf,
    pub asn: u32,
    pub router_id: std::net::Ipv4Addr,
    pub listen_ranges: Vec<String>,
    pub hold_time: u16,
    /// Where the FRR daemons are (`/usr/lib/frr`).
    pub bin_dir: PathBuf,
}

const DAEMONS: [&str; 2] = ["zebra", "bgpd"];

/// bgpd.conf of the reflector.
pub fn bgpd_conf(c: &FrrConfig) -> String {
    let keepalive = (c.hold_time / 3).max(1);
    let mut s = format!(
        "! written by vpcd (management role); changes are overwritten\n\
         router bgp {asn}\n bgp router-id {id}\n no bgp default ipv4-unicast\n \
         timers bgp {keepalive} {hold}\n neighbor VTEP peer-group\n neighbor VTEP remote-as {asn}\n",
        asn = c.asn,
        id = c.router_id,
        hold = c.hold_time,
    );
    for r in &c.listen_ranges {
        s.push_str(&format!(" bgp listen range {r} peer-group VTEP\n"));
    }
    s.push_str(
        " address-family l2vpn evpn\n  neighbor VTEP activate\n  \
         neighbor VTEP route-reflector-client\n exit-address-family\n",
    );
    s
}

fn pid_of(dir: &Path, daemon: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(format!("{daemon}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    // Alive and that daemon (pids are reused).
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == daemon).then_some(pid)
}

/// Kills the daemon our pid file names (checked to be that daemon) and waits until it is gone.
fn kill(dir: &Path, daemon: &str) {
    if let Some(pid) = pid_of(dir, daemon) {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output();
        for _ in 0..100 {
            if pid_of(dir, daemon).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Starts one FRR daemon (`zebra` or `bgpd`) of `c` inside `netns`.
pub fn start(c: &FrrConfig, netns: &Netns, daemon: &str) -> std::io::Result<()> {
    let d = &c.dir;
    let mut cmd = std::process::Command::new(c.bin_dir.join(daemon));
    cmd.arg("-d")
        .arg("-f")
        .arg(d.join(format!("{daemon}.conf")))
        .arg("-i")
        .arg(d.join(format!("{daemon}.pid")))
        .arg("-z")
        .arg(d.join("zserv.api"))
        .arg("--vty_socket")
        .arg(d)
        .args(["-A", "127.0.0.1", "-P", "0"]);
    if daemon == "bgpd" {
        cmd.args(["-l", &c.router_id.to_string()]);
    }
    netns.enter_in_child(&mut cmd);
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{daemon}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Writes the configuration and makes sure both daemons run (restarting them if the
/// configuration changed). Returns the supervisor task.
pub fn run(c: FrrConfig, netns: Netns) -> std::io::Result<tokio::task::JoinHandle<()>> {
    std::fs::create_dir_all(&c.dir)?;
    let conf = bgpd_conf(&c);
    let path = c.dir.join("bgpd.conf");
    let changed = std::fs::read_to_string(&path).ok().as_deref() != Some(conf.as_str());
    // Stop daemons of another configuration before the file changes, so a crash in between
    // cannot leave them running with the old one while the file says the new.
    if changed {
        for d in DAEMONS.iter().rev() {
            kill(&c.dir, d);
        }
    }
    let tmp = c.dir.join("bgpd.conf.new");
    std::fs::write(&tmp, &conf)?;
    std::fs::rename(&tmp, &path)?;
    std::fs::write(c.dir.join("zebra.conf"), "! written by vpcd\n")?;
    // FRR drops privileges to frr:frr; its files and directory must be theirs.
    let _ = std::process::Command::new("chown")
        .args(["-R", "frr:frr"])
        .arg(&c.dir)
        .output();
    for d in DAEMONS {
        if pid_of(&c.dir, d).is_none() {
            // A failure here is retried by the supervisor below.
            match start(&c, &netns, d) {
                Ok(()) => {
                    tracing::info!(daemon = d, dir = %c.dir.display(), "FRR started (route reflector)")
                }
                Err(e) => tracing::warn!(daemon = d, "starting FRR: {e}"),
            }
        }
    }
    Ok(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for d in DAEMONS {
                if pid_of(&c.dir, d).is_none() {
                    tracing::warn!(daemon = d, "FRR daemon is gone; starting it again");
                    let (c2, n2) = (c.clone(), netns.clone());
                    let r = tokio::task::spawn_blocking(move || start(&c2, &n2, d)).await;
                    if let Ok(Err(e)) = r {
                        tracing::warn!(daemon = d, "starting FRR: {e}");
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reflector_config_has_the_listen_ranges_and_evpn_clients() {
        let c = FrrConfig {
            dir: "/x".into(),
            asn: 65000,
            router_id: "192.0.2.10".parse().unwrap(),
            listen_ranges: vec!["192.0.2.0/24".into(), "198.51.100.0/24".into()],
            hold_time: 9,
            bin_dir: "/usr/lib/frr".into(),
        };
        let s = bgpd_conf(&c);
        assert!(s.contains("router bgp 65000\n bgp router-id 192.0.2.10\n"));
        assert!(s.contains(" timers bgp 3 9\n"));
        assert!(s.contains("bgp listen range 192.0.2.0/24 peer-group VTEP"));
        assert!(s.contains("bgp listen range 198.51.100.0/24 peer-group VTEP"));
        assert!(s.contains("neighbor VTEP route-reflector-client"));
    }
}

//! The lab of the filter tests: a "host" namespace with a bridge `br0` and "VM" namespaces
//! joined to it by veth pairs (host end `p<i>` in br0, VM end `eth0` with 10.99.0.<i+1>/24 and
//! MAC 02:99:00:00:00:<i+1>). IPv6 is off unless asked for, so that no frame but a test's own
//! moves the counters. Namespaces and the pin directory (/sys/fs/bpf/vpcd-test-<pid>-<n>) are
//! removed by a drop guard, also when a test fails.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use netdrv::filter::{PortFilter, PortSecurity};
use netdrv::Netns;

pub static LAB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// Runs a command; panics with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a command succeeds.
pub fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub struct Vm {
    pub ns: String,
    /// The host end of the veth, in br0.
    pub port: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

impl Vm {
    pub fn exec<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.ns.as_str()];
        v.extend_from_slice(args);
        v
    }

    /// Three pings to `to` (1 s timeout each); true if any answer came back.
    pub fn ping(&self, to: Ipv4Addr) -> bool {
        let to = to.to_string();
        ok(&self.exec(&["ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", &to]))
    }

    /// Like `ping`, with source address `from`.
    pub fn ping_from(&self, from: Ipv4Addr, to: Ipv4Addr) -> bool {
        let (from, to) = (from.to_string(), to.to_string());
        ok(&self.exec(&[
            "ping", "-q", "-c", "3", "-i", "0.2", "-W", "1", "-I", &from, &to,
        ]))
    }

    /// Port security allowing exactly this VM's MAC and IPv4 address.
    pub fn security(&self) -> PortSecurity {
        PortSecurity {
            macs: vec![self.mac],
            ipv4: vec![self.ip],
            ipv6: vec![],
        }
    }
}

/// A host namespace with br0, VM namespaces, and a pin directory; all removed on drop.
pub struct Lab {
    pub host: String,
    pub netns: Netns,
    pub vms: Vec<Vm>,
    pub pin_dir: PathBuf,
}

impl Lab {
    pub fn new(n_vms: usize) -> Lab {
        Lab::build(n_vms, false, 0)
    }

    pub fn with_ipv6(n_vms: usize) -> Lab {
        Lab::build(n_vms, true, 0)
    }

    /// `n_vms` VMs numbered from `first` (their address is 10.99.0.<first + i + 1>).
    pub fn build(n_vms: usize, ipv6: bool, first: u8) -> Lab {
        let seq = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{seq}", std::process::id());
        let host = format!("vpcdt-{id}-host");
        let mut lab = Lab {
            host: host.clone(),
            netns: Netns::current().expect("own netns"),
            vms: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/vpcd-test-{id}")),
        };
        let disable_ipv6 = if ipv6 { "0" } else { "1" };
        let add_ns = |ns: &str| {
            sh(&["ip", "netns", "add", ns]);
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.all.disable_ipv6={disable_ipv6}"),
                &format!("net.ipv6.conf.default.disable_ipv6={disable_ipv6}"),
                "net.ipv6.conf.default.accept_dad=0",
            ]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        };
        add_ns(&host);
        // From here on, `lab` deletes what exists if a step panics.
        lab.netns = Netns::named(&host).expect("host netns");
        sh(&["ip", "-n", &host, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &host, "link", "set", "br0", "up"]);
        for i in 0..n_vms {
            let ns = format!("vpcdt-{id}-vm{i}");
            add_ns(&ns);
            let port = format!("p{i}");
            let n = first + i as u8 + 1;
            let mac = [0x02, 0x99, 0, 0, 0, n];
            let ip = Ipv4Addr::new(10, 99, 0, n);
            lab.vms.push(Vm {
                ns: ns.clone(),
                port: port.clone(),
                ifindex: 0,
                mac,
                ip,
            });
            sh(&[
                "ip", "-n", &host, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&[
                "ip", "-n", &host, "link", "set", &port, "master", "br0", "up",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "link",
                "set",
                "eth0",
                "address",
                &mac_str(mac),
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            let ifindex = sh(&[
                "ip",
                "netns",
                "exec",
                &host,
                "cat",
                &format!("/sys/class/net/{port}/ifindex"),
            ]);
            lab.vms[i].ifindex = ifindex.trim().parse().expect("ifindex");
        }
        lab
    }

    /// `args` run inside the host namespace.
    pub fn exec_host<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut v = vec!["ip", "netns", "exec", self.host.as_str()];
        v.extend_from_slice(args);
        v
    }

    pub fn vm(&self, i: usize) -> &Vm {
        &self.vms[i]
    }

    /// Runs `f` inside the host namespace.
    pub fn in_host<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.netns.run(f).expect("enter host netns")
    }

    /// Stops all real traffic through `vm`'s port (the VM's end goes down, so the bridge
    /// forwards nothing to the port either): only crafted frames move its counters.
    pub fn quiesce(&self, vm: &Vm) {
        sh(&vm.exec(&["ip", "link", "set", "eth0", "down"]));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for vm in &self.vms {
            let _ = Command::new("ip").args(["netns", "del", &vm.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.host])
            .status();
        // The filters went with the devices; the pins keep the maps and programs.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn plain(vlan: u16) -> PortFilter {
    PortFilter {
        vlan,
        security: None,
    }
}

pub fn secured(vm: &Vm, vlan: u16) -> PortFilter {
    PortFilter {
        vlan,
        security: Some(vm.security()),
    }
}

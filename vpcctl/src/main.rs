//! `vpcctl`: virsh-style commands over vpcd's D-Bus API (and nothing else).

mod console;
mod net;
mod router;
mod table;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use table::print_table;
use vpcctl::proxy::{self, DomainProxy, HostProxy};

/// Manage the VMs of a vpcd host, virsh style.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// D-Bus address of vpcd's bus (default: the system bus; DBUS_SYSTEM_BUS_ADDRESS is honoured).
    #[arg(long, global = true, env = "VPCCTL_BUS_ADDRESS", default_value = "")]
    bus_address: String,
    /// vpcd's bus name.
    #[arg(long, global = true, default_value = proxy::BUS_NAME)]
    bus_name: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List running domains (all with --all).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Define a domain from a TOML spec file (- for standard input).
    Define {
        file: String,
        /// libvirt or qmp (default: the host's default backend).
        #[arg(long, default_value = "")]
        backend: String,
    },
    /// Define and start a domain from a TOML spec file.
    Create {
        file: String,
        #[arg(long, default_value = "")]
        backend: String,
    },
    /// Start a defined domain.
    Start { domain: String },
    /// Power a domain off gracefully (ACPI) and wait until it is off.
    Shutdown {
        domain: String,
        /// Seconds to wait (default: vpcd's shutdown_timeout_secs).
        #[arg(long, default_value_t = 0)]
        timeout: u32,
    },
    /// Stop a domain at once.
    Destroy { domain: String },
    /// Reboot a domain (ACPI power-off, then start again).
    Reboot { domain: String },
    /// Remove a shut-off domain and the files vpcd made for it.
    Undefine { domain: String },
    /// Show a domain's details.
    Dominfo { domain: String },
    /// Show a domain's state.
    Domstate { domain: String },
    /// List a domain's network interfaces.
    Domiflist { domain: String },
    /// List a domain's disks.
    Domblklist { domain: String },
    /// Add a disk to a domain: hot-plugged if it runs, and kept in its definition.
    AttachDisk {
        domain: String,
        /// A replicated volume of this host's block storage.
        #[arg(long, group = "source")]
        volume: Option<String>,
        /// An existing disk file, used as it is.
        #[arg(long, group = "source")]
        path: Option<String>,
        /// A new blank disk of this many MiB, owned by the domain.
        #[arg(long, group = "source")]
        size_mib: Option<u64>,
        /// A base image: the domain gets its own overlay on it.
        #[arg(long, group = "source")]
        image: Option<String>,
        /// Format of --path: raw or qcow2 (probed if not given).
        #[arg(long)]
        format: Option<String>,
        /// Guest device, vdb..vdz (default: the first free one).
        #[arg(long, default_value = "")]
        target: String,
        #[arg(long)]
        readonly: bool,
    },
    /// Remove a disk from a domain (unplugged once the guest lets it go).
    DetachDisk { domain: String, target: String },
    /// Attach to a domain's serial console (Ctrl+] leaves).
    Console {
        domain: String,
        /// serial0 (the console) or serial1 (the test guest's command shell).
        #[arg(long, default_value = "serial0")]
        devname: String,
    },
    #[command(flatten)]
    Net(net::NetCmd),
    #[command(flatten)]
    Router(router::RouterCmd),
    #[command(flatten)]
    Volume(volume::VolumeCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let msg = match e.downcast_ref::<zbus::Error>() {
                Some(z) => proxy::error_message(z),
                None => format!("{e:#}"),
            };
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let conn = proxy::connect(&cli.bus_address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the D-Bus bus: {e}"))?;
    let host = HostProxy::builder(&conn)
        .destination(cli.bus_name.clone())?
        .build()
        .await?;
    let domain = |name: String| {
        let conn = conn.clone();
        let host = host.clone();
        let bus_name = cli.bus_name.clone();
        async move {
            let path = host.lookup_domain(&name).await?;
            let d = DomainProxy::builder(&conn)
                .destination(bus_name)?
                .path(path)?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            Ok::<_, zbus::Error>(d)
        }
    };
    match cli.cmd {
        Cmd::List { all } => {
            let mut rows = Vec::new();
            for path in host.list_domains().await? {
                let d = DomainProxy::builder(&conn)
                    .destination(cli.bus_name.clone())?
                    .path(path)?
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await?;
                let state = d.state().await?;
                if all || !matches!(state.as_str(), "shut off" | "crashed") {
                    rows.push((d.name().await?, state, d.backend().await?));
                }
            }
            rows.sort();
            if cli.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(n, s, b)| json!({"name": n, "state": s, "backend": b}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Name", "State", "Backend"],
                    rows.into_iter().map(|(n, s, b)| vec![n, s, b]).collect(),
                );
            }
        }
        Cmd::Define { file, backend } => {
            let spec = read_spec(&file)?;
            let path = host.define_domain(&spec, &backend).await?;
            report_new(&conn, &cli.bus_name, path, "defined", cli.json).await?;
        }
        Cmd::Create { file, backend } => {
            let spec = read_spec(&file)?;
            let path = host.create_domain(&spec, &backend).await?;
            report_new(&conn, &cli.bus_name, path, "created", cli.json).await?;
        }
        Cmd::Start { domain: name } => {
            domain(name.clone()).await?.start().await?;
            done(cli.json, &name, "started");
        }
        Cmd::Shutdown {
            domain: name,
            timeout,
        } => {
            domain(name.clone()).await?.shutdown(timeout).await?;
            done(cli.json, &name, "is shut down");
        }
        Cmd::Destroy { domain: name } => {
            domain(name.clone()).await?.destroy().await?;
            done(cli.json, &name, "destroyed");
        }
        Cmd::Reboot { domain: name } => {
            domain(name.clone()).await?.reboot().await?;
            done(cli.json, &name, "is being rebooted");
        }
        Cmd::Undefine { domain: name } => {
            domain(name.clone()).await?.undefine().await?;
            done(cli.json, &name, "has been undefined");
        }
        Cmd::AttachDisk {
            domain: name,
            volume,
            path,
            size_mib,
            image,
            format,
            target,
            readonly,
        } => {
            // The keys of one [[disks]] table; vpcd checks them as it checks a spec's.
            let quote = |s: &str| serde_json::to_string(s).expect("a string");
            let mut toml = String::new();
            for (key, value) in [
                ("volume", volume.as_deref().map(quote)),
                ("path", path.as_deref().map(quote)),
                ("image", image.as_deref().map(quote)),
                ("size_mib", size_mib.map(|n| n.to_string())),
                ("format", format.as_deref().map(quote)),
                ("readonly", readonly.then(|| "true".to_string())),
            ] {
                if let Some(v) = value {
                    toml.push_str(&format!("{key} = {v}\n"));
                }
            }
            let target = domain(name.clone())
                .await?
                .attach_disk(&toml, &target)
                .await?;
            if cli.json {
                println!("{}", json!({"domain": name, "target": target}));
            } else {
                println!("Disk {target} attached to domain {name}\n");
            }
        }
        Cmd::DetachDisk {
            domain: name,
            target,
        } => {
            domain(name.clone()).await?.detach_disk(&target).await?;
            if cli.json {
                println!("{}", json!({"domain": name, "target": target}));
            } else {
                println!("Disk {target} detached from domain {name}\n");
            }
        }
        Cmd::Domstate { domain: name } => {
            let state = domain(name).await?.state().await?;
            if cli.json {
                println!("{}", json!({"state": state}));
            } else {
                println!("{state}\n");
            }
        }
        Cmd::Dominfo { domain: name } => {
            let d = domain(name).await?;
            let fields = vec![
                ("Name", d.name().await?),
                ("UUID", d.uuid().await?),
                ("State", d.state().await?),
                ("CPU(s)", d.vcpus().await?.to_string()),
                (
                    "Max memory",
                    format!("{} KiB", d.memory_mib().await? * 1024),
                ),
                ("Backend", d.backend().await?),
                ("Accelerator", d.accel().await?),
                ("Console log", d.console_log().await?),
            ];
            if cli.json {
                let m: serde_json::Map<_, _> = fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_lowercase().replace(['(', ')'], "").replace(' ', "_"),
                            json!(v),
                        )
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                for (k, v) in fields {
                    println!("{:<16}{v}", format!("{k}:"));
                }
                println!();
            }
        }
        Cmd::Domblklist { domain: name } => {
            let disks = domain(name).await?.disks().await?;
            if cli.json {
                let v: Vec<_> = disks
                    .iter()
                    .map(|(t, s)| json!({"target": t, "source": s}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Target", "Source"],
                    disks.into_iter().map(|(t, s)| vec![t, s]).collect(),
                );
            }
        }
        Cmd::Domiflist { domain: name } => {
            let nics = domain(name).await?.nics().await?;
            if cli.json {
                let v: Vec<_> = nics
                    .iter()
                    .map(|(tap, net, subnet, mac, ip, port)| {
                        json!({"interface": tap, "type": "ethernet", "network": net, "subnet": subnet,
                               "model": "virtio", "mac": mac, "ip": ip, "port": port})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_table(
                    &["Interface", "Type", "Source", "Model", "MAC", "IP", "Port"],
                    nics.into_iter()
                        .map(|(tap, net, subnet, mac, ip, port)| {
                            vec![
                                tap,
                                "ethernet".into(),
                                format!("{net}/{subnet}"),
                                "virtio".into(),
                                mac,
                                ip,
                                port.to_string(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Cmd::Net(cmd) => net::run(cmd, &conn, &host, &cli.bus_name, cli.json).await?,
        Cmd::Router(cmd) => router::run(cmd, &conn, &host, &cli.bus_name, cli.json).await?,
        Cmd::Volume(cmd) => volume::run(cmd, &host, cli.json).await?,
        Cmd::Console {
            domain: name,
            devname,
        } => {
            let port = match devname.as_str() {
                "serial0" | "console" => 0,
                "serial1" => 1,
                other => anyhow::bail!("unknown device {other:?} (serial0 or serial1)"),
            };
            let fd = domain(name.clone()).await?.open_console(port).await?;
            return console::attach(&name, std::os::fd::OwnedFd::from(fd)).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read_spec(file: &str) -> anyhow::Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("read {file}: {e}"))
    }
}

async fn report_new(
    conn: &zbus::Connection,
    bus_name: &str,
    path: zbus::zvariant::OwnedObjectPath,
    verb: &str,
    json: bool,
) -> anyhow::Result<()> {
    let d = DomainProxy::builder(conn)
        .destination(bus_name.to_string())?
        .path(path.clone())?
        .build()
        .await?;
    let name = d.name().await?;
    if json {
        println!(
            "{}",
            json!({"name": name, "path": path.as_str(), "result": verb})
        );
    } else {
        println!("Domain '{name}' {verb}\n");
    }
    Ok(())
}

fn done(json: bool, name: &str, what: &str) {
    if json {
        println!("{}", json!({"name": name, "result": what}));
    } else {
        println!("Domain '{name}' {what}\n");
    }
}

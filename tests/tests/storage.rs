//! The storage role: vpcd runs a block storage node in-process; volumes through D-Bus and
//! vpcctl (vol-create, vol-list, vol-info, vol-resize, vol-delete, vol-export), served over NBD
//! on every host holding a replica, kept across a SIGKILL of vpcd, and replicated over three
//! vpcds.

use std::time::Duration;

use vpcd_tests::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn fails(d: &Daemon, args: &[&str]) -> String {
    let out = d.vpcctl(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn info(d: &Daemon, name: &str) -> serde_json::Value {
    serde_json::from_str(&d.vpcctl_ok(&["--json", "vol-info", name])).unwrap()
}

/// Storage-role flags of node `id` of `ports` (all nodes' RPC ports).
fn storage_flags(id: usize, ports: &[u16]) -> Vec<String> {
    let mut f = vec![
        "--role".to_string(),
        "compute".into(),
        "--role".into(),
        "storage".into(),
        "--storage-node-id".into(),
        id.to_string(),
        "--storage-listen".into(),
        format!("127.0.0.1:{}", ports[id - 1]),
    ];
    for (i, p) in ports.iter().enumerate() {
        f.push("--storage-member".into());
        f.push(format!("{}=127.0.0.1:{p}", i + 1));
    }
    f
}

async fn storage_daemon(id: usize, ports: &[u16]) -> Daemon {
    let flags = storage_flags(id, ports);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    qmp_daemon(&flags).await
}

#[tokio::test]
async fn volumes_through_vpcctl_on_a_single_storage_host() {
    let ports = [free_port()];
    let mut d = storage_daemon(1, &ports).await;
    d.vpcctl_ok(&["vol-create", "data", "16M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d, "data")["health"] == "ok",
        "the volume's group to have a leader",
    );
    let v = info(&d, "data");
    assert_eq!(v["size"], 16 << 20, "{v}");
    assert_eq!(v["leader"], 1, "{v}");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 1, "{v}");
    let uri = d.vpcctl_ok(&["vol-export", "data"]).trim().to_string();
    assert!(uri.starts_with("nbd+unix:///data?socket="), "{uri}");
    // The socket reaches every volume: root and the kvm group (QEMU under libvirt) only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.state.path().join("sbs/nbd.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    let (good, out) = run(&["nbdinfo", "--size", &uri]);
    assert!(good && out.trim() == "16777216", "{out}");
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 1M", &uri]);
    assert!(good, "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "vol-list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(d.vpcctl_ok(&["vol-list"]).contains("data"));

    // Bad input: typed errors, nothing changed.
    let e = fails(&d, &["vol-create", "data", "1M"]);
    assert!(e.contains("AlreadyExists"), "{e}");
    let e = fails(&d, &["vol-create", "a/b", "1M"]);
    assert!(
        e.contains("InvalidArgument") && e.contains("volume name"),
        "{e}"
    );
    let e = fails(&d, &["vol-resize", "data", "1M"]);
    assert!(
        e.contains("InvalidArgument") && e.contains("only grow"),
        "{e}"
    );
    let e = fails(&d, &["vol-info", "nope"]);
    assert!(e.contains("NotFound"), "{e}");
    let e = fails(&d, &["vol-create", "big", "1.5G"]);
    assert!(e.contains("size"), "{e}");
    assert_eq!(info(&d, "data")["size"], 16 << 20);

    // Grown; then vpcd is SIGKILLed and restarted: the volume and its data are still there.
    d.vpcctl_ok(&["vol-resize", "data", "32M"]);
    assert_eq!(info(&d, "data")["size"], 32 << 20);
    d.restart().await;
    wait_until(
        Duration::from_secs(20),
        || info(&d, "data")["health"] == "ok",
        "the volume after a restart",
    );
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "read -P 0x33 1M 1M", &uri]);
    assert!(good && !out.contains("verification failed"), "{out}");
    assert_eq!(info(&d, "data")["size"], 32 << 20);

    d.vpcctl_ok(&["vol-delete", "data"]);
    let e = fails(&d, &["vol-info", "data"]);
    assert!(e.contains("NotFound"), "{e}");
    assert!(!d.state.path().join("sbs/data").exists());
}

#[tokio::test]
async fn a_host_without_the_storage_role_says_so() {
    let d = qmp_daemon(&[]).await;
    let e = fails(&d, &["vol-list"]);
    assert!(
        e.contains("InvalidState") && e.contains("storage role"),
        "{e}"
    );
}

#[tokio::test]
async fn three_storage_hosts_replicate_a_volume_created_on_one() {
    let ports = [free_port(), free_port(), free_port()];
    let d1 = storage_daemon(1, &ports).await;
    let d2 = storage_daemon(2, &ports).await;
    let d3 = storage_daemon(3, &ports).await;
    d2.vpcctl_ok(&["vol-create", "shared", "16M"]);
    for d in [&d1, &d2, &d3] {
        wait_until(
            Duration::from_secs(20),
            || {
                let out = d.vpcctl(&["--json", "vol-info", "shared"]);
                out.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["health"]
                        == "ok"
            },
            "every host to have the volume with a leader",
        );
        assert_eq!(info(d, "shared")["replicas"].as_array().unwrap().len(), 3);
    }
    let uri = |d: &Daemon| d.vpcctl_ok(&["vol-export", "shared"]).trim().to_string();
    let (good, out) = run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x44 0 4M",
        &uri(&d3),
    ]);
    assert!(good, "{out}");
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "read -P 0x44 0 4M", &uri(&d1)]);
    assert!(good && !out.contains("verification failed"), "{out}");
    d1.vpcctl_ok(&["vol-delete", "shared"]);
    for d in [&d1, &d2, &d3] {
        let e = fails(d, &["vol-info", "shared"]);
        assert!(e.contains("NotFound"), "{e}");
    }
    // A replica count of its own; more than there are nodes is refused.
    d1.vpcctl_ok(&["vol-create", "pair", "4M", "--replicas", "2"]);
    let holders: Vec<_> = [&d1, &d2, &d3]
        .iter()
        .filter(|d| d.vpcctl(&["vol-info", "pair"]).status.success())
        .map(|d| info(d, "pair")["replicas"].as_array().unwrap().len())
        .collect();
    assert_eq!(
        holders,
        [2, 2],
        "two hosts hold it, each knowing two replicas"
    );
    let e = fails(&d1, &["vol-create", "many", "4M", "--replicas", "4"]);
    assert!(
        e.contains("InvalidArgument") && e.contains("3 nodes"),
        "{e}"
    );
}

/// A guest boots with a volume as its disk, through QMP and through libvirt: it reads what the
/// host wrote through NBD and writes what the host then reads back.
#[tokio::test]
async fn guests_use_a_volume_as_their_disk_through_qmp_and_libvirt() {
    let ports = [free_port()];
    let flags = storage_flags(1, &ports);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let opts = DaemonOpts {
        backend: "auto",
        extra: flags.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let d = Daemon::start_with(opts, Bus::open()).await;
    d.vpcctl_ok(&["vol-create", "data", "16M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d, "data")["health"] == "ok",
        "the volume's group to have a leader",
    );
    let uri = d.vpcctl_ok(&["vol-export", "data"]).trim().to_string();
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", &uri]);
    assert!(good, "{out}");
    // A VM naming a volume this host does not hold is refused and leaves nothing.
    let bad = kernel_spec(&unique("novol"), "") + "[[disks]]\nvolume = \"nope\"\n";
    let path = d.state.path().join("bad.toml");
    std::fs::write(&path, &bad).unwrap();
    let e = fails(&d, &["define", path.to_str().unwrap(), "--backend", "qmp"]);
    assert!(e.contains("volume nope"), "{e}");

    for (i, backend) in ["qmp", "libvirt"].iter().enumerate() {
        let name = unique(&format!("vol{i}"));
        let spec = kernel_spec(&name, "") + "[[disks]]\nvolume = \"data\"\n";
        d.create(&spec, backend);
        d.wait_console(&name, BOOT_MARKER, 1);
        let mut shell = d.guest_shell(&name).await;
        let first = shell.ok("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1");
        assert!(first.contains("5a 5a 5a 5a"), "{backend}: {first}");
        let mark = format!("VPCDVOL{i}");
        shell.ok(&format!(
            "printf {mark} | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null",
            256 + i
        ));
        drop(shell);
        let (good, out) = run(&[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            &format!("read -v {} 8", (256 + i) * 512),
            &uri,
        ]);
        assert!(good && out.contains(&mark), "{backend}: {out}");
        d.vpcctl_ok(&["destroy", &name]);
        d.vpcctl_ok(&["undefine", &name]);
    }
}

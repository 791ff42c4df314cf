//! The storage role: vpcd runs a block storage node in-process; volumes through D-Bus and
//! vpcctl (vol-create, vol-list, vol-info, vol-resize, vol-delete, vol-export), served over NBD
//! on every host holding a replica, kept across a SIGKILL of vpcd, and replicated over three
//! vpcds.

use std::time::Duration;

use vpcd_tests::*;

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

/// busctl against the daemon's bus.
fn busctl(d: &Daemon, args: &[&str]) -> String {
    let mut a = vec!["--address", &d.bus.address];
    a.extend_from_slice(args);
    sh("busctl", &a)
}

/// A CA, a server certificate (localhost, 127.0.0.1) and a client certificate made with the
/// openssl CLI, in libnbd's and QEMU's client layout (`client/ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`); the server's files in `server/`.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    std::fs::create_dir_all(dir.path().join("server")).unwrap();
    std::fs::create_dir_all(dir.path().join("client")).unwrap();
    let key = |out: &str| {
        sh(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                out,
            ],
        );
    };
    key(&p("ca.key"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &p("ca.key"),
            "-days",
            "3650",
            "-subj",
            "/CN=vpcd test CA",
            "-out",
            &p("ca.pem"),
        ],
    );
    let issue = |name: &str, cn: &str, ext: &str| {
        key(&p(&format!("{name}-key.pem")));
        std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
        sh(
            "openssl",
            &[
                "req",
                "-new",
                "-key",
                &p(&format!("{name}-key.pem")),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &p(&format!("{name}.csr")),
            ],
        );
        sh(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &p(&format!("{name}.csr")),
                "-CA",
                &p("ca.pem"),
                "-CAkey",
                &p("ca.key"),
                "-CAcreateserial",
                "-days",
                "3650",
                "-extfile",
                &p(&format!("{name}.ext")),
                "-out",
                &p(&format!("{name}-cert.pem")),
            ],
        );
    };
    issue(
        "server/server",
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    );
    issue("client/client", "client", "extendedKeyUsage=clientAuth\n");
    std::fs::copy(p("ca.pem"), p("client/ca-cert.pem")).unwrap();
    dir
}

/// The volumes `d` lists (those of the whole cluster) that storage node `node` holds a
/// replica of.
fn held_by(d: &Daemon, node: u64) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "vol-list"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|v| {
            v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["node"] == node)
        })
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

/// `qemu-io -f raw -c cmd uri`: whether it worked, and what it said.
fn qemu_io(cmd: &str, uri: &str) -> (bool, String) {
    run(&["qemu-io", "-f", "raw", "-c", cmd, uri])
}

/// Host1 `LookupVolume` of `name`, as busctl prints the answer (`o "/org/vpcd/..."`).
fn lookup_volume(d: &Daemon, name: &str) -> String {
    let args = [
        "call",
        "org.vpcd.Host1",
        "/org/vpcd/Host1",
        "org.vpcd.Host1",
        "LookupVolume",
        "s",
        name,
    ];
    busctl(d, &args)
}

/// A property of volume `name`'s object, as busctl prints it (`t 16777216`).
fn volume_property(d: &Daemon, name: &str, property: &str) -> String {
    let path = format!("/org/vpcd/Host1/volume/{name}");
    let args = [
        "get-property",
        "org.vpcd.Host1",
        &path,
        "org.vpcd.Volume1",
        property,
    ];
    busctl(d, &args).trim().to_string()
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

/// Creates volume `name` of `size` through `d`, and waits for its group to have a leader.
fn create_led(d: &Daemon, name: &str, size: &str) {
    d.vpcctl_ok(&["vol-create", name, size]);
    wait_until(
        Duration::from_secs(20),
        || info(d, name)["health"] == "ok",
        "the volume's group to have a leader",
    );
}

/// A host without the storage role using the volumes of storage nodes `ports` as a client
/// (node id `id`, in no node list).
async fn client_daemon(id: usize, ports: &[u16]) -> Daemon {
    let mut extra = vec!["--storage-node-id".to_string(), id.to_string()];
    for (i, p) in ports.iter().enumerate() {
        extra.push("--storage-member".into());
        extra.push(format!("{}=127.0.0.1:{p}", i + 1));
    }
    let opts = DaemonOpts {
        backend: "auto",
        extra,
        ..Default::default()
    };
    Daemon::start_with(opts, Bus::open()).await
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

/// A host without the storage role that names the storage nodes is a client of the cluster:
/// it creates, lists and exports volumes, serves them on its own NBD socket through the node
/// that holds them (it holds no replica), and a guest of it boots with one as its disk under
/// libvirt, its use recorded under the client's id, so the volume is not deleted under it.
#[tokio::test]
async fn a_host_without_the_storage_role_uses_the_clusters_volumes_as_a_client() {
    let ports = [free_port()];
    let s = storage_daemon(1, &ports).await;
    let c = client_daemon(9, &ports).await;
    create_led(&c, "data", "16M");
    let v = info(&c, "data");
    assert_eq!(v["leader"], 1, "{v}");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 1, "{v}");
    assert!(
        !c.state.path().join("sbs/data").exists(),
        "a replica on the client"
    );
    assert!(
        s.state.path().join("sbs/data").exists(),
        "no replica on the storage host"
    );
    assert!(c.vpcctl_ok(&["vol-list"]).contains("data"));
    let uri = c.vpcctl_ok(&["vol-export", "data"]).trim().to_string();
    let socket = c.state.path().join("sbs/nbd.sock");
    assert!(uri.contains(socket.to_str().unwrap()), "{uri}");
    let (good, out) = qemu_io("write -P 0x6c 0 64k", &uri);
    assert!(good, "{out}");
    let there = s.vpcctl_ok(&["vol-export", "data"]).trim().to_string();
    let (good, out) = qemu_io("read -P 0x6c 0 64k", &there);
    assert!(good && !out.contains("verification failed"), "{out}");

    let name = unique("client");
    let spec = kernel_spec(&name, "") + "[[disks]]\nvolume = \"data\"\n";
    c.create(&spec, "libvirt");
    c.wait_console(&name, BOOT_MARKER, 1);
    let user = serde_json::json!([{"node": 9, "domain": name, "disk": "vda", "readonly": false}]);
    assert_eq!(info(&s, "data")["attachments"], user);
    let e = fails(&s, &["vol-delete", "data"]);
    assert!(e.contains("InvalidState") && e.contains(&name), "{e}");
    let mut shell = c.guest_shell(&name).await;
    let first = shell.ok("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1");
    assert!(first.contains("6c 6c 6c 6c"), "{first}");
    shell.ok("printf VPCDCLIENT | dd of=/dev/vda bs=512 seek=300 conv=notrunc,fsync 2>/dev/null");
    drop(shell);
    let (good, out) = qemu_io(&format!("read -v {} 10", 300 * 512), &there);
    assert!(good && out.contains("VPCDCLIENT"), "{out}");
    c.vpcctl_ok(&["destroy", &name]);
    c.vpcctl_ok(&["undefine", &name]);
    c.vpcctl_ok(&["vol-delete", "data"]);
    let e = fails(&s, &["vol-info", "data"]);
    assert!(e.contains("NotFound"), "{e}");
}

/// A guest on a host without the storage role keeps its volume disk through the loss of the
/// volume's leader: its writes wait for the new leader (the client's node finds it), every
/// one is kept, and the storage host back from the SIGKILL catches up and serves the same
/// bytes.
#[tokio::test]
async fn a_clients_guest_keeps_its_volume_through_the_loss_of_the_leader() {
    let ports = [free_port(), free_port(), free_port()];
    let mut hosts = [
        storage_daemon(1, &ports).await,
        storage_daemon(2, &ports).await,
        storage_daemon(3, &ports).await,
    ];
    let c = client_daemon(9, &ports).await;
    create_led(&c, "fo", "16M");
    let leader = info(&c, "fo")["leader"].as_u64().unwrap();
    let name = unique("failover");
    let spec = kernel_spec(&name, "") + "[[disks]]\nvolume = \"fo\"\n";
    c.create(&spec, "libvirt");
    c.wait_console(&name, BOOT_MARKER, 1);
    let mut shell = c.guest_shell(&name).await;
    // 1 MiB of random data at 1 MiB, and its checksum, before and after the leader goes.
    let write = |shell: &mut GuestShell, seek: u32| {
        shell.ok(&format!(
            "dd if=/dev/urandom of=/tmp/w{seek} bs=64k count=16 2>/dev/null && dd if=/tmp/w{seek} \
             of=/dev/vda bs=64k seek={seek} oflag=direct conv=notrunc,fsync 2>/dev/null && \
             md5sum < /tmp/w{seek}"
        ))
    };
    let before = write(&mut shell, 16);
    hosts[leader as usize - 1].kill9();
    let after = write(&mut shell, 48);
    let survivor = &hosts[leader as usize % 3];
    let now = info(survivor, "fo")["leader"].as_u64();
    assert!(
        now.is_some_and(|n| n != leader),
        "leader {now:?} after {leader} died"
    );
    for (seek, sum) in [(16, &before), (48, &after)] {
        let read = shell.ok(&format!(
            "dd if=/dev/vda bs=64k skip={seek} count=16 iflag=direct 2>/dev/null | md5sum"
        ));
        assert_eq!(
            read.trim(),
            sum.trim(),
            "read back at {seek} x 64 KiB in the guest"
        );
    }
    drop(shell);
    // Back, the killed host catches up: reads through it are linearizable, so it serves the
    // guest's last write only once it has it.
    let back = &mut hosts[leader as usize - 1];
    back.restart().await;
    let there = back.vpcctl_ok(&["vol-export", "fo"]).trim().to_string();
    let here = c.vpcctl_ok(&["vol-export", "fo"]).trim().to_string();
    let dump = |uri: &str| {
        let file = c.state.path().join("fo.img");
        let (good, out) = run(&[
            "qemu-img",
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            file.to_str().unwrap(),
        ]);
        assert!(good, "{out}");
        std::fs::read(&file).unwrap()
    };
    assert!(
        dump(&there) == dump(&here),
        "the host back holds other bytes"
    );
    c.vpcctl_ok(&["destroy", &name]);
    c.vpcctl_ok(&["undefine", &name]);
    c.vpcctl_ok(&["vol-delete", "fo"]);
}

#[tokio::test]
async fn three_storage_hosts_replicate_a_volume_created_on_one() {
    let ports = [free_port(), free_port(), free_port()];
    let d1 = storage_daemon(1, &ports).await;
    let mut d2 = storage_daemon(2, &ports).await;
    let mut d3 = storage_daemon(3, &ports).await;
    d2.vpcctl_ok(&["vol-create", "shared", "16M"]);
    // Looked up through another host at once, its object is there once the answer is.
    let path = lookup_volume(&d1, "shared");
    assert!(path.contains("/org/vpcd/Host1/volume/shared"), "{path}");
    assert_eq!(volume_property(&d1, "shared", "Size"), "t 16777216");
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
    // The volume's D-Bus object shows up on the hosts it was not created through too.
    for d in [&d1, &d3] {
        wait_until(
            Duration::from_secs(10),
            || busctl(d, &["tree", "org.vpcd.Host1"]).contains("/org/vpcd/Host1/volume/shared"),
            "the volume's object on a host it was not created through",
        );
    }
    // Grown through one host: its object says so at once, the others' after their next look
    // at the cluster.
    d3.vpcctl_ok(&["vol-resize", "shared", "32M"]);
    assert_eq!(volume_property(&d3, "shared", "Size"), "t 33554432");
    for d in [&d1, &d2] {
        wait_until(
            Duration::from_secs(10),
            || volume_property(d, "shared", "Size") == "t 33554432",
            "the grown size on the other hosts' objects",
        );
    }
    let uri = |d: &Daemon| d.vpcctl_ok(&["vol-export", "shared"]).trim().to_string();
    let (good, out) = qemu_io("write -P 0x44 0 4M", &uri(&d3));
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
    // Two hosts hold it; all three know it, with its two replicas (the third serves it
    // through them), and list it.
    let replicas: Vec<_> = [&d1, &d2, &d3]
        .iter()
        .map(|d| info(d, "pair")["replicas"].as_array().unwrap().len())
        .collect();
    assert_eq!(replicas, [2, 2, 2]);
    for d in [&d1, &d2, &d3] {
        assert!(d.vpcctl_ok(&["vol-list"]).contains("pair"));
    }
    let e = fails(&d1, &["vol-create", "many", "4M", "--replicas", "4"]);
    assert!(
        e.contains("InvalidArgument") && e.contains("3 nodes"),
        "{e}"
    );
    // A host holding a replica dies: the others say the volume is degraded, naming it.
    d1.vpcctl_ok(&["vol-create", "tri", "4M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d1, "tri")["health"] == "ok",
        "the new volume to have a leader",
    );
    // One host's domain has it as a disk: another host's domain cannot have it (not even
    // read-only), no host deletes it, and every host says who has it.
    let define = |d: &Daemon, name: &str, extra: &str| {
        let spec = kernel_spec(name, "") + "[[disks]]\nvolume = \"tri\"\n" + extra;
        let path = d.state.path().join(format!("{name}.toml"));
        std::fs::write(&path, spec).unwrap();
        d.vpcctl(&["define", path.to_str().unwrap(), "--backend", "qmp"])
    };
    let failed = |out: std::process::Output| {
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let (web, db) = (unique("web"), unique("db"));
    assert!(define(&d1, &web, "").status.success());
    let user = format!("attached to domain {web} (disk vda) on node 1");
    let e = failed(define(&d2, &db, "readonly = true\n"));
    assert!(e.contains("InvalidState") && e.contains(&user), "{e}");
    assert!(fails(&d2, &["dominfo", &db]).contains("NotFound"));
    let e = fails(&d3, &["vol-delete", "tri"]);
    assert!(e.contains("InvalidState") && e.contains(&user), "{e}");
    for d in [&d1, &d2, &d3] {
        wait_until(
            Duration::from_secs(10),
            || {
                info(d, "tri")["attachments"]
                    == serde_json::json!([{"node": 1, "domain": web, "disk": "vda", "readonly": false}])
            },
            "every host to show the volume's user",
        );
    }
    assert!(d2
        .vpcctl_ok(&["vol-list"])
        .contains(&format!("{web}/vda@1")));
    // Undefined there, the volume is another host's domain's (once the release is through:
    // the undefine waits 5 s for it at most, and a release left over is done within 2 s).
    d1.vpcctl_ok(&["undefine", &web]);
    wait_until(
        Duration::from_secs(15),
        || define(&d2, &db, "").status.success(),
        "the volume to be free for another host's domain",
    );
    // The host of that domain is gone for good: its use is released through another host, a
    // domain elsewhere may have the volume then; a host's own domain keeps its volume.
    let e = fails(&d2, &["vol-release", "tri", &db]);
    assert!(e.contains("InvalidState") && e.contains("detach"), "{e}");
    d1.vpcctl_ok(&["vol-release", "tri", &db, "--node", "2"]);
    assert!(define(&d1, &web, "").status.success());
    d1.vpcctl_ok(&["undefine", &web]);
    // An attachment naming a domain this host does not have (a crash between attaching and
    // recording the domain leaves one) is released by the host within a few seconds.
    let addr = format!("127.0.0.1:{}", ports[0]);
    let blockdrv = vpcd_tests::bin("blockdrv");
    // A use of tri by `domain` on node 1 recorded behind vpcd's back, and host 1 releasing it.
    let stale = |domain: &str, disk: &str| {
        let attach = [
            blockdrv.to_str().unwrap(),
            "volume",
            "attach",
            "--addr",
            &addr,
        ];
        let (good, out) = run(&[&attach[..], &["tri", "1", domain, disk]].concat());
        assert!(good, "{out}");
        let line = format!("domain={domain}");
        wait_until(
            Duration::from_secs(15),
            || {
                d1.log()
                    .lines()
                    .any(|l| l.contains("releasing a stale attachment") && l.contains(&line))
            },
            "host 1 to release the stale attachment",
        );
    };
    stale("ghost", "vdz");
    wait_until(
        Duration::from_secs(15),
        || info(&d3, "tri")["attachments"] == serde_json::json!([]),
        "the attachment to be gone",
    );
    // So is one naming a running domain that does not have the volume (nothing plugged it:
    // a disk is in the domain's record before it is plugged, and while it is unplugged).
    let runner = unique("runner");
    d1.create(&kernel_spec(&runner, ""), "qmp");
    stale(&runner, "vdy");
    d1.vpcctl_ok(&["destroy", &runner]);
    d1.vpcctl_ok(&["undefine", &runner]);
    d2.vpcctl_ok(&["undefine", &db]);
    // A domain keeps the volume it was given: once that is deleted (its use released through
    // another host) and another made under the name, the domain does not start with it.
    let old = unique("old");
    assert!(define(&d1, &old, "").status.success());
    d2.vpcctl_ok(&["vol-release", "tri", &old, "--node", "1"]);
    // (Once the undefine's release of db is through: a leftover goes within 2 s.)
    wait_until(
        Duration::from_secs(15),
        || d2.vpcctl(&["vol-delete", "tri"]).status.success(),
        "the volume to be deleted",
    );
    d2.vpcctl_ok(&["vol-create", "tri", "4M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d1, "tri")["health"] == "ok",
        "the new volume to have a leader",
    );
    let e = fails(&d1, &["start", &old]);
    assert!(
        e.contains("InvalidState") && e.contains("deleted and another made"),
        "{e}"
    );
    assert_eq!(info(&d1, "tri")["attachments"], serde_json::json!([]));
    d1.vpcctl_ok(&["undefine", &old]);
    d3.kill9();
    for d in [&d1, &d2] {
        wait_until(
            Duration::from_secs(20),
            || info(d, "tri")["health"] == "degraded: node 3 unreachable",
            "the volume to be degraded",
        );
    }
    // A second host gone too: whether a domain has the volume cannot be told, so a delete is
    // refused unless forced; the forced one frees its space, and the hosts that were down drop
    // their replicas when they are back.
    d2.kill9();
    assert!(held_by(&d1, 1).contains(&"tri".to_string()));
    let e = fails(&d1, &["vol-delete", "tri"]);
    assert!(
        e.contains("Unavailable") && e.contains("could not be told"),
        "{e}"
    );
    assert!(
        held_by(&d1, 1).contains(&"tri".to_string()),
        "refused, but deleted"
    );
    d1.vpcctl_ok(&["vol-delete", "--force", "tri"]);
    assert!(
        !held_by(&d1, 1).contains(&"tri".to_string()),
        "forced, but not deleted"
    );
    d2.restart().await;
    d3.restart().await;
    for (d, id) in [(&d2, 2), (&d3, 3)] {
        wait_until(
            Duration::from_secs(20),
            || !held_by(d, id).contains(&"tri".to_string()),
            "a host back from down to drop its replica of the deleted volume",
        );
    }
    assert!(
        held_by(&d2, 2).contains(&"pair".to_string())
            || held_by(&d3, 3).contains(&"pair".to_string())
    );
}

/// A guest boots with a volume as its disk, through QMP and through libvirt: it reads what the
/// host wrote through NBD and, after vpcd was SIGKILLed and restarted, writes what the host
/// then reads back.
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
    let mut d = Daemon::start_with(opts, Bus::open()).await;
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
        // One domain's writable disk at a time: a second domain with it is refused, and
        // leaves nothing.
        let second = unique("second");
        let spec2 = kernel_spec(&second, "") + "[[disks]]\nvolume = \"data\"\n";
        std::fs::write(&path, &spec2).unwrap();
        let e = fails(
            &d,
            &["define", path.to_str().unwrap(), "--backend", backend],
        );
        assert!(
            e.contains("InvalidState") && e.contains(&name) && e.contains("vda"),
            "{e}"
        );
        let e = fails(&d, &["dominfo", &second]);
        assert!(e.contains("NotFound"), "{e}");
        let mut shell = d.guest_shell(&name).await;
        let first = shell.ok("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1");
        assert!(first.contains("5a 5a 5a 5a"), "{backend}: {first}");
        // vpcd (and with it this host's storage node) SIGKILLed and back: QEMU reconnects to
        // the NBD socket and the guest's writes go on.
        d.kill9();
        d.restart().await;
        let mark = format!("VPCDVOL{i}");
        shell.ok(&format!(
            "printf {mark} | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null",
            256 + i
        ));
        drop(shell);
        let (good, out) = qemu_io(&format!("read -v {} 8", (256 + i) * 512), &uri);
        assert!(good && out.contains(&mark), "{backend}: {out}");
        d.vpcctl_ok(&["destroy", &name]);
        d.vpcctl_ok(&["undefine", &name]);
    }
}

/// `device_del` of device `argv[2]` through the QMP socket `argv[1]` (free while vpcd is down).
const QMP_DEVICE_DEL: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
cmd("qmp_capabilities")
print(json.dumps(cmd("device_del", id=sys.argv[2])))
"#;

/// Waits in the guest (at most 20 s) until `/dev/<dev>` is there (`present`) or gone.
fn guest_waits_for_disk(shell: &mut GuestShell, dev: &str, present: bool) {
    let test = if present { "" } else { "!" };
    let (out, rc) = shell.run(&format!(
        "i=0; while [ $i -lt 100 ] && ! [ {test} -b /dev/{dev} ]; do sleep 0.2; i=$((i+1)); done; [ {test} -b /dev/{dev} ]"
    ));
    assert_eq!(rc, 0, "/dev/{dev} present={present}: {out}");
}

/// Volumes and blank disks hot-plugged into running guests and unplugged again, through QMP
/// and through libvirt; kept in the definition across a restart of the guest; bad requests
/// refused with nothing changed.
#[tokio::test]
async fn disks_are_hot_plugged_into_running_guests_and_unplugged_again() {
    let ports = [free_port()];
    let opts = DaemonOpts {
        backend: "auto",
        extra: storage_flags(1, &ports),
        ..Default::default()
    };
    let mut d = Daemon::start_with(opts, Bus::open()).await;
    d.vpcctl_ok(&["vol-create", "hot", "16M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d, "hot")["health"] == "ok",
        "the volume's group to have a leader",
    );
    let uri = d.vpcctl_ok(&["vol-export", "hot"]).trim().to_string();
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 64k", &uri]);
    assert!(good, "{out}");

    for (i, backend) in ["qmp", "libvirt"].iter().enumerate() {
        let name = unique(&format!("hp{i}"));
        d.create(&kernel_spec(&name, ""), backend);
        d.wait_console(&name, BOOT_MARKER, 1);
        let disks = |d: &Daemon| -> serde_json::Value {
            serde_json::from_str(&d.vpcctl_ok(&["--json", "domblklist", &name])).unwrap()
        };
        // Refused, and nothing changes.
        let e = fails(&d, &["attach-disk", &name, "--volume", "nope"]);
        assert!(e.contains("NotFound") && e.contains("nope"), "{e}");
        let e = fails(
            &d,
            &["attach-disk", &name, "--volume", "hot", "--target", "sdq"],
        );
        assert!(e.contains("InvalidArgument") && e.contains("sdq"), "{e}");
        let e = fails(&d, &["detach-disk", &name, "vdc"]);
        assert!(e.contains("NotFound") && e.contains("vdc"), "{e}");
        let e = fails(&d, &["attach-disk", "no-such-vm", "--volume", "hot"]);
        assert!(e.contains("NotFound"), "{e}");
        assert_eq!(disks(&d), serde_json::json!([]));

        // A volume, live: the guest reads what the host wrote and writes what it reads back.
        let out = d.vpcctl_ok(&["attach-disk", &name, "--volume", "hot"]);
        assert!(out.contains("vda"), "{out}");
        // Not deleted under the domain that has it.
        let e = fails(&d, &["vol-delete", "hot"]);
        assert!(
            e.contains("InvalidState") && e.contains(&name) && e.contains("vda"),
            "{e}"
        );
        let e = fails(
            &d,
            &["attach-disk", &name, "--volume", "hot", "--target", "vda"],
        );
        assert!(e.contains("AlreadyExists"), "{e}");
        let mut shell = d.guest_shell(&name).await;
        guest_waits_for_disk(&mut shell, "vda", true);
        let first = shell.ok("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1");
        assert!(first.contains("6b 6b 6b 6b"), "{backend}: {first}");
        let mark = format!("VPCDHOT{i}");
        shell.ok(&format!(
            "printf {mark} | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null",
            300 + i
        ));
        let (good, out) = qemu_io(&format!("read -v {} 8", (300 + i) * 512), &uri);
        assert!(good && out.contains(&mark), "{backend}: {out}");
        // A new blank disk too, on the next free target.
        let out = d.vpcctl_ok(&["attach-disk", &name, "--size-mib", "8"]);
        assert!(out.contains("vdb"), "{out}");
        guest_waits_for_disk(&mut shell, "vdb", true);
        assert_eq!(shell.ok("cat /sys/block/vdb/size").trim(), "16384");
        let listed = disks(&d);
        assert_eq!(listed[0]["target"], "vda");
        assert!(
            listed[0]["source"]
                .as_str()
                .unwrap()
                .contains("nbd+unix:///hot"),
            "{listed}"
        );
        if *backend == "libvirt" {
            // An ordinary libvirt domain: virsh sees both, live and in the definition.
            let live = sh("virsh", &["-c", "qemu:///system", "domblklist", &name]);
            assert!(live.contains("vda") && live.contains("vdb"), "{live}");
            let def = sh(
                "virsh",
                &["-c", "qemu:///system", "dumpxml", "--inactive", &name],
            );
            assert!(def.contains("protocol='nbd' name='hot'"), "{def}");
        }

        // vdb taken out of the running guest behind vpcd's back while vpcd is down: the
        // restarted vpcd plugs it in again (the store says it is attached).
        d.kill9();
        if *backend == "libvirt" {
            sh(
                "virsh",
                &[
                    "-c",
                    "qemu:///system",
                    "detach-disk",
                    &name,
                    "vdb",
                    "--live",
                ],
            );
        } else {
            let sock = d.vm_dir(&name).join("qmp.sock");
            let out = sh(
                "/usr/bin/python3",
                &["-c", QMP_DEVICE_DEL, sock.to_str().unwrap(), "vdb"],
            );
            assert!(out.contains("return"), "{out}");
        }
        guest_waits_for_disk(&mut shell, "vdb", false);
        d.restart().await;
        guest_waits_for_disk(&mut shell, "vdb", true);
        assert_eq!(shell.ok("cat /sys/block/vdb/size").trim(), "16384");

        // Unplugged: gone from the guest and from the definition.
        d.vpcctl_ok(&["detach-disk", &name, "vda"]);
        guest_waits_for_disk(&mut shell, "vda", false);
        let listed = disks(&d);
        assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
        assert_eq!(listed[0]["target"], "vdb");
        drop(shell);

        // The definition keeps what is attached: after a restart (and one more attached while
        // shut off) the guest has the blank disk and the volume, nothing else. (The guest
        // names its disks in the order it finds them: sizes tell them apart.)
        d.vpcctl_ok(&["destroy", &name]);
        d.vpcctl_ok(&["attach-disk", &name, "--volume", "hot", "--target", "vdc"]);
        d.vpcctl_ok(&["start", &name]);
        d.wait_console(&name, BOOT_MARKER, 2);
        let mut shell = d.guest_shell(&name).await;
        guest_waits_for_disk(&mut shell, "vdb", true);
        let sizes =
            shell.ok("for b in /sys/block/vd*; do cat $b/size; done | sort -n | tr '\\n' ' '");
        assert_eq!(sizes.trim(), "16384 32768", "{backend}");
        drop(shell);
        d.vpcctl_ok(&["destroy", &name]);
        d.vpcctl_ok(&["detach-disk", &name, "vdc"]);
        d.vpcctl_ok(&["undefine", &name]);
    }
    // No domain has it any more.
    d.vpcctl_ok(&["vol-delete", "hot"]);
}

/// Volumes as D-Bus objects (properties, Resize, Delete), and NBD over TCP with forced TLS and
/// client certificates next to the plain local unix socket.
#[tokio::test]
async fn volume_objects_and_nbd_over_tls_on_tcp() {
    let pki = pki();
    let f = |p: &str| pki.path().join(p).to_string_lossy().into_owned();
    let (ports, nbd_port) = ([free_port()], free_port());
    let mut flags = storage_flags(1, &ports);
    flags.extend([
        "--storage-nbd-listen".to_string(),
        format!("127.0.0.1:{nbd_port}"),
        "--storage-tls-cert".into(),
        f("server/server-cert.pem"),
        "--storage-tls-key".into(),
        f("server/server-key.pem"),
        "--storage-tls-ca".into(),
        f("ca.pem"),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d = qmp_daemon(&flags).await;
    d.vpcctl_ok(&["vol-create", "tls", "16M"]);
    wait_until(
        Duration::from_secs(20),
        || info(&d, "tls")["health"] == "ok",
        "the volume's group to have a leader",
    );

    // The object: properties, and Resize through it.
    let path = "/org/vpcd/Host1/volume/tls";
    let prop = |name: &str| {
        busctl(
            &d,
            &[
                "get-property",
                "org.vpcd.Host1",
                path,
                "org.vpcd.Volume1",
                name,
            ],
        )
    };
    assert_eq!(prop("Size").trim(), "t 16777216");
    // The properties are the volume as the host last looked (every 2 s, and after a change
    // through it), not asked for on each read.
    wait_until(
        Duration::from_secs(10),
        || prop("Health").trim() == "s \"ok\"",
        "the object to say the volume has a leader",
    );
    assert!(prop("TcpUri").contains(&format!("nbds://127.0.0.1:{nbd_port}/tls")));
    busctl(
        &d,
        &[
            "call",
            "org.vpcd.Host1",
            path,
            "org.vpcd.Volume1",
            "Resize",
            "t",
            "33554432",
        ],
    );
    assert_eq!(prop("Size").trim(), "t 33554432");
    let looked_up = lookup_volume(&d, "tls");
    assert!(looked_up.contains(path), "{looked_up}");

    // TCP with TLS and the client's certificate: served; written there, read through the
    // plain unix socket.
    let tcp = d
        .vpcctl_ok(&["vol-export", "tls", "--tcp"])
        .trim()
        .to_string();
    assert_eq!(tcp, format!("nbds://127.0.0.1:{nbd_port}/tls"));
    let with_certs = format!(
        "nbds://localhost:{nbd_port}/tls?tls-certificates={}",
        f("client")
    );
    let (good, out) = run(&["nbdinfo", "--size", &with_certs]);
    assert!(good && out.trim() == "33554432", "{out}");
    let obj = format!(
        "--object=tls-creds-x509,id=tls0,dir={},endpoint=client",
        f("client")
    );
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={nbd_port},export=tls,tls-creds=tls0"
    );
    let (good, out) = run(&[
        "qemu-io",
        &obj,
        "--image-opts",
        "-c",
        "write -P 0x3c 0 64k",
        &opts,
    ]);
    assert!(good && !out.contains("error"), "{out}");
    let unix = d.vpcctl_ok(&["vol-export", "tls"]).trim().to_string();
    let (good, out) = run(&["qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 64k", &unix]);
    assert!(good && !out.contains("verification failed"), "{out}");
    // Plain TCP is refused (TLS required); so is TLS without a client certificate.
    let (good, out) = run(&[
        "nbdinfo",
        "--size",
        &format!("nbd://localhost:{nbd_port}/tls"),
    ]);
    assert!(!good && out.contains("TLS"), "{out}");
    let anonymous = pki.path().join("anonymous");
    std::fs::create_dir_all(&anonymous).unwrap();
    std::fs::copy(f("ca.pem"), anonymous.join("ca-cert.pem")).unwrap();
    let (good, out) = run(&[
        "nbdinfo",
        "--size",
        &format!(
            "nbds://localhost:{nbd_port}/tls?tls-certificates={}",
            anonymous.display()
        ),
    ]);
    assert!(!good, "a client without a certificate got in: {out}");

    // Delete through the object: it goes, and so does the volume.
    busctl(
        &d,
        &["call", "org.vpcd.Host1", path, "org.vpcd.Volume1", "Delete"],
    );
    assert!(!busctl(&d, &["tree", "org.vpcd.Host1"]).contains(path));
    let e = fails(&d, &["vol-info", "tls"]);
    assert!(e.contains("NotFound"), "{e}");
}

/// Storage nodes join and leave through vpcctl: a fourth host added takes replicas, the first
/// one removed hands its replicas over, and the data stays readable through the others.
#[tokio::test]
async fn storage_nodes_join_and_leave_through_vpcctl() {
    let ports = [free_port(), free_port(), free_port(), free_port()];
    // Hosts 1-3 know each other; host 4 knows all four (it joins later).
    let three = &ports[..3];
    let d1 = storage_daemon(1, three).await;
    let d2 = storage_daemon(2, three).await;
    let _d3 = storage_daemon(3, three).await;
    for v in ["ja", "jb"] {
        d1.vpcctl_ok(&["vol-create", v, "8M"]);
    }
    wait_until(
        Duration::from_secs(20),
        || ["ja", "jb"].iter().all(|v| info(&d1, v)["health"] == "ok"),
        "leaders",
    );
    let (good, out) = qemu_io(
        "write -P 0x5e 0 1M",
        d1.vpcctl_ok(&["vol-export", "ja"]).trim(),
    );
    assert!(good, "{out}");
    let d4 = storage_daemon(4, &ports).await;
    let e = fails(&d1, &["storage-node-add", "4", "not-an-address"]);
    assert!(e.contains("InvalidArgument"), "{e}");
    let out = d1.vpcctl_ok(&[
        "--json",
        "storage-node-add",
        "4",
        &format!("127.0.0.1:{}", ports[3]),
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        r["moves"].as_array().unwrap().len(),
        1,
        "6 replicas over 4 nodes: {r}"
    );
    let nodes = d2.vpcctl_ok(&["--json", "storage-node-list"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&nodes)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        4,
        "{nodes}"
    );
    // Every host lists both volumes; host 4 holds a replica of one.
    let held4 = held_by(&d4, 4);
    assert_eq!(held4.len(), 1, "{held4:?}");
    for d in [&d1, &d2, &d4] {
        let out = d.vpcctl(&["vol-list"]);
        let (list, warned) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{warned}");
        assert!(list.contains("ja") && list.contains("jb"), "{list}");
        assert!(warned.is_empty(), "every node answered: {warned}");
    }
    // The volume host 4 holds no replica of is served there all the same (through the hosts
    // that hold it): its info, and reads and writes through host 4's NBD socket.
    let away = if held4[0] == "ja" { "jb" } else { "ja" };
    let i = info(&d4, away);
    assert_eq!(i["health"], "ok", "{i}");
    assert_eq!(i["size"], 8 << 20, "{i}");
    assert_eq!(i["replicas"].as_array().unwrap().len(), 3, "{i}");
    let e = fails(&d4, &["vol-info", "nothing"]);
    assert!(e.contains("NotFound"), "{e}");
    let (good, out) = qemu_io(
        "write -P 0x7a 2M 1M",
        d4.vpcctl_ok(&["vol-export", away]).trim(),
    );
    assert!(good, "{out}");
    let (good, out) = qemu_io(
        "read -P 0x7a 2M 1M",
        d2.vpcctl_ok(&["vol-export", away]).trim(),
    );
    assert!(good && !out.contains("verification failed"), "{out}");
    // And as a guest's disk there: it reads what was written, and its writes reach the hosts
    // that hold the volume.
    let name = unique("awayvol");
    let spec = kernel_spec(&name, "") + &format!("[[disks]]\nvolume = \"{away}\"\n");
    d4.create(&spec, "qmp");
    d4.wait_console(&name, BOOT_MARKER, 1);
    let mut shell = d4.guest_shell(&name).await;
    let seen = shell.ok("dd if=/dev/vda bs=1M skip=2 count=1 2>/dev/null | od -An -tx1 | head -1");
    assert!(seen.contains("7a 7a 7a 7a"), "{seen}");
    shell.ok("printf VPCDAWAY | dd of=/dev/vda bs=512 seek=8 conv=notrunc,fsync 2>/dev/null");
    drop(shell);
    let (good, out) = qemu_io("read -v 4096 8", d2.vpcctl_ok(&["vol-export", away]).trim());
    assert!(good && out.contains("VPCDAWAY"), "{out}");
    d4.vpcctl_ok(&["destroy", &name]);
    d4.vpcctl_ok(&["undefine", &name]);

    // Host 1 leaves: its replicas go to the others, it holds nothing.
    let out = d2.vpcctl_ok(&["--json", "storage-node-remove", "1"]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!r["moves"].as_array().unwrap().is_empty(), "{r}");
    assert!(held_by(&d2, 1).is_empty(), "{:?}", held_by(&d2, 1));
    let e = fails(&d2, &["storage-node-remove", "1"]);
    assert!(e.contains("NotFound"), "{e}");
    // The data reads back through a host that holds it now.
    let holder = [(&d2, 2), (&d4, 4)]
        .into_iter()
        .find(|(d, id)| held_by(d, *id).contains(&"ja".to_string()))
        .expect("a host holding ja")
        .0;
    let (good, out) = qemu_io(
        "read -P 0x5e 0 1M",
        holder.vpcctl_ok(&["vol-export", "ja"]).trim(),
    );
    assert!(good && !out.contains("verification failed"), "{out}");

    // With every host that holds it down, a host that holds none says so, not that there is
    // no such volume.
    drop((d2, _d3, d4));
    let e = fails(&d1, &["vol-info", "ja"]);
    assert!(
        e.contains("Unavailable") && e.contains("Connection refused"),
        "{e}"
    );
    // Its list is empty, and says why: which nodes did not answer.
    let out = d1.vpcctl(&["--json", "vol-list"]);
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{warned}");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]), "{warned}");
    for id in 2..=4 {
        let line = format!(
            "storage node {id} (127.0.0.1:{}) did not answer",
            ports[id - 1]
        );
        assert!(warned.contains(&line), "{line}: {warned}");
    }
}

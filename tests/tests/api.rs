//! The D-Bus API and the CLI at their edges: typed errors for bad input with nothing
//! half-created, the bus policy, introspection, configuration errors, libvirt unavailable.

use std::process::Command;

use vpcd_tests::*;

/// vpcctl failed with one line on stderr that contains every piece of `expect`.
fn assert_fails(out: &std::process::Output, expect: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for e in expect {
        assert!(err.contains(e), "{err:?} lacks {e:?}");
    }
}

fn vms_dir_is_empty(d: &Daemon) -> bool {
    std::fs::read_dir(d.state.path().join("vms"))
        .unwrap()
        .next()
        .is_none()
}

#[tokio::test]
async fn bad_specs_give_typed_errors_and_create_nothing() {
    let d = Daemon::start().await;
    let vmdk = d.state.path().join("other.vmdk");
    sh(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", vmdk.to_str().unwrap(), "1M"],
    );
    let ok = unique("ok");
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            kernel_spec("bad name", ""),
            vec!["invalid name", "InvalidArgument"],
        ),
        (
            kernel_spec(&unique("k"), "memroy_mib = 5"),
            vec!["memroy_mib", "InvalidArgument"],
        ),
        (
            kernel_spec(&unique("m"), "memory_mib = 99999999"),
            vec!["memory_mib 99999999", "InvalidArgument"],
        ),
        (
            kernel_spec(&unique("c"), "vcpus = 0"),
            vec!["vcpus 0", "InvalidArgument"],
        ),
        (
            format!(
                "name = \"{}\"\n[boot]\nkernel = \"/nonexistent/vmlinux\"\n",
                unique("i")
            ),
            vec!["/nonexistent/vmlinux", "InvalidArgument"],
        ),
        (
            format!(
                "name = \"{}\"\n[[disks]]\nimage = \"{}\"\n",
                unique("f"),
                vmdk.display()
            ),
            vec!["unsupported image format", "InvalidArgument"],
        ),
        (
            format!("name = \"{}\"\n[[disks]]\nsize_mib = 0\n", unique("z")),
            vec!["disks[0].size_mib 0", "InvalidArgument"],
        ),
        (
            "this is not toml".to_string(),
            vec!["parse VM spec", "InvalidArgument"],
        ),
    ];
    for (spec, expect) in &cases {
        for backend in ["libvirt", "qmp"] {
            assert_fails(&d.vpcctl_spec("define", spec, backend), expect);
        }
    }
    assert!(vms_dir_is_empty(&d), "a failed define left files");

    let spec = kernel_spec(&ok, "");
    assert!(d.vpcctl_spec("define", &spec, "qmp").status.success());
    assert_fails(
        &d.vpcctl_spec("define", &spec, "libvirt"),
        &[&ok, "already exists", "AlreadyExists"],
    );
    assert_fails(
        &d.vpcctl(&["start", "nosuchvm"]),
        &["nosuchvm", "not found", "NotFound"],
    );
    assert_fails(&d.vpcctl(&["console", &ok]), &["not running"]);
    assert_fails(
        &d.vpcctl(&["define", "/nonexistent.toml"]),
        &["/nonexistent.toml"],
    );
    assert_fails(
        &d.vpcctl_spec("define", &kernel_spec(&unique("b"), ""), "xen"),
        &["unknown backend", "xen"],
    );

    d.vpcctl_ok(&["start", &ok]);
    assert_fails(&d.vpcctl(&["start", &ok]), &[&ok, "InvalidState"]);
    assert_fails(&d.vpcctl(&["undefine", &ok]), &[&ok, "InvalidState"]);
    d.vpcctl_ok(&["destroy", &ok]);
    d.vpcctl_ok(&["destroy", &ok]); // idempotent
    d.vpcctl_ok(&["undefine", &ok]);
    assert!(vms_dir_is_empty(&d));
    let json: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["list", "--all", "--json"])).unwrap();
    assert_eq!(json, serde_json::json!([]));
}

#[tokio::test]
async fn every_vpcctl_verb_has_help() {
    let d = Daemon::start().await;
    // Every verb `vpcctl --help` lists, so a new one cannot be missed.
    let top = d.vpcctl_ok(&["--help"]);
    let verbs: Vec<&str> = top
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("Options:").next())
        .expect("a Commands section")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|v| *v != "help")
        .collect();
    // The verbs the issues ask for are among them.
    for want in [
        "list",
        "define",
        "create",
        "start",
        "shutdown",
        "destroy",
        "reboot",
        "undefine",
        "dominfo",
        "domstate",
        "domiflist",
        "domblklist",
        "console",
        "router-create",
        "router-list",
        "router-info",
        "router-delete",
        "router-add-subnet",
        "router-remove-subnet",
        "router-set-gateway",
        "fip-create",
        "fip-attach",
        "fip-detach",
        "fip-delete",
        "fip-list",
        "bgp-sessions",
        "evpn-routes",
        "vol-create",
        "vol-list",
        "vol-info",
        "vol-resize",
        "vol-delete",
        "vol-export",
        "attach-disk",
        "detach-disk",
    ] {
        assert!(verbs.contains(&want), "{want} is not a verb: {verbs:?}");
    }
    for verb in verbs {
        let help = d.vpcctl_ok(&[verb, "--help"]);
        assert!(help.contains("Usage: vpcctl"), "{verb}: {help}");
    }
}

#[tokio::test]
async fn define_never_takes_over_a_domain_vpcd_does_not_own() {
    let d = Daemon::start().await;
    let name = unique("foreign");
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    );
    let file = d.state.path().join("foreign.xml");
    std::fs::write(&file, xml).unwrap();
    sh("virsh", &["define", file.to_str().unwrap()]);
    let out = d.vpcctl_spec("define", &kernel_spec(&name, ""), "libvirt");
    assert_fails(&out, &[&name, "AlreadyExists"]);
    let still = sh("virsh", &["dumpxml", &name]);
    assert!(
        !still.contains("vpcd"),
        "the foreign domain was changed: {still}"
    );
    assert!(vms_dir_is_empty(&d));
    sh("virsh", &["undefine", &name]);
}

#[tokio::test]
async fn create_that_cannot_start_leaves_nothing_defined() {
    let d = Daemon::start().await;
    let name = unique("nostart");
    // A kernel file that is not a kernel: define works, QEMU refuses to start.
    let junk = d.state.path().join("junk-kernel");
    std::fs::write(&junk, b"not a kernel").unwrap();
    let spec = format!(
        "name = \"{name}\"\n[boot]\nkernel = \"{}\"\n",
        junk.display()
    );
    let out = d.vpcctl_spec("create", &spec, "qmp");
    assert_fails(&out, &[&name]);
    assert!(!d.vpcctl_ok(&["list", "--all"]).contains(&name));
    assert!(vms_dir_is_empty(&d));
}

#[tokio::test]
async fn busctl_introspect_shows_the_interfaces() {
    let d = Daemon::start().await;
    let name = unique("intro");
    assert!(d
        .vpcctl_spec("define", &kernel_spec(&name, ""), "qmp")
        .status
        .success());
    let host = sh(
        "busctl",
        &[
            "--address",
            &d.bus.address,
            "introspect",
            "org.vpcd.Host1",
            "/org/vpcd/Host1",
        ],
    );
    for iface in [
        "org.vpcd.Host1",
        "org.freedesktop.DBus.ObjectManager",
        ".DefineDomain",
        ".Accel",
    ] {
        assert!(host.contains(iface), "{iface} missing in {host}");
    }
    let path = d.host().await.lookup_domain(&name).await.unwrap();
    let dom = sh(
        "busctl",
        &[
            "--address",
            &d.bus.address,
            "introspect",
            "org.vpcd.Host1",
            path.as_str(),
        ],
    );
    for member in [
        "org.vpcd.Domain1",
        ".Shutdown",
        ".OpenConsole",
        ".LifecycleEvent",
        ".State",
    ] {
        assert!(dom.contains(member), "{member} missing in {dom}");
    }
    // The ObjectManager lists the domain with its properties.
    let managed = sh(
        "busctl",
        &[
            "--address",
            &d.bus.address,
            "--json=short",
            "call",
            "org.vpcd.Host1",
            "/org/vpcd/Host1",
            "org.freedesktop.DBus.ObjectManager",
            "GetManagedObjects",
        ],
    );
    assert!(
        managed.contains(path.as_str()) && managed.contains("shut off"),
        "{managed}"
    );
}

#[tokio::test]
async fn only_root_may_change_state_under_the_shipped_policy() {
    let policy = format!(
        r#"<policy context="default">
             <allow user="*"/>
             <deny own="*"/>
             <deny send_type="method_call"/>
             <allow send_type="signal"/>
             <allow send_requested_reply="true" send_type="method_return"/>
             <allow send_requested_reply="true" send_type="error"/>
             <allow receive_type="method_call"/><allow receive_type="method_return"/>
             <allow receive_type="error"/><allow receive_type="signal"/>
             <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
             <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
           </policy>
           <include>{}/../dist/dbus/org.vpcd.Host1.conf</include>"#,
        env!("CARGO_MANIFEST_DIR")
    );
    let bus = Bus::with_policy(&policy);
    std::fs::set_permissions(
        bus.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let d = Daemon::start_with(DaemonOpts::default(), bus).await;
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "busctl",
                "--address",
                &d.bus.address,
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let call = [
        "call",
        "org.vpcd.Host1",
        "/org/vpcd/Host1",
        "org.vpcd.Host1",
    ];
    let list = as_nobody(&[&call[..], &["ListDomains"]].concat());
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let get = as_nobody(&[
        "get-property",
        "org.vpcd.Host1",
        "/org/vpcd/Host1",
        "org.vpcd.Host1",
        "Accel",
    ]);
    assert!(String::from_utf8_lossy(&get.stdout).contains("tcg"));
    let define = as_nobody(&[&call[..], &["DefineDomain", "ss", "name = \"x\"", ""]].concat());
    assert!(!define.status.success());
    let err = String::from_utf8_lossy(&define.stderr);
    assert!(
        err.contains("Access denied") || err.contains("AccessDenied"),
        "{err}"
    );
    // Root reaches vpcd (which rejects the spec: the call got through the policy).
    let out = Command::new("busctl")
        .args(["--address", &d.bus.address])
        .args(call)
        .args(["DefineDomain", "ss", "name = \"x\"", ""])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("boot.kernel")
            || String::from_utf8_lossy(&out.stderr).contains("no disk"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn unknown_config_key_stops_vpcd_with_a_message_naming_it() {
    let d = Daemon::start().await;
    let conf = d.state.path().join("bad.toml");
    std::fs::write(&conf, "log = \"info\"\nbakend = \"qmp\"\n").unwrap();
    let out = d.command().arg("--config").arg(&conf).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bakend"), "{err}");
    let out = d
        .command()
        .env("VPCD_SHUTDOWN_TIMOUT_SECS", "5")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("shutdown_timout_secs"));
}

#[tokio::test]
async fn libvirt_not_answering_is_a_clear_error() {
    let unreachable = "qemu+unix:///system?socket=/nonexistent/libvirt-sock".to_string();
    // Forced libvirt: vpcd refuses to start and says why.
    let mut d = Daemon::start().await;
    d.kill9(); // one vpcd per state directory: the store is locked while it runs
    let forced = DaemonOpts {
        backend: "libvirt",
        libvirt_uri: unreachable.clone(),
        ..Default::default()
    };
    let out = d.command_for(&forced).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not answering") && err.contains("nonexistent"),
        "{err}"
    );
    drop(d);
    // Auto: vpcd falls back to QMP, and asking for libvirt is a typed error.
    let opts = DaemonOpts {
        libvirt_uri: unreachable,
        ..Default::default()
    };
    let d = Daemon::start_with(opts, Bus::open()).await;
    assert_eq!(d.host().await.default_backend().await.unwrap(), "qmp");
    let out = d.vpcctl_spec("define", &kernel_spec(&unique("nolv"), ""), "libvirt");
    assert_fails(&out, &["libvirt backend not available", "Unavailable"]);
    assert!(vms_dir_is_empty(&d));
}

#[tokio::test]
async fn cloud_init_seed_carries_the_fields_and_reads_back() {
    let d = Daemon::start().await;
    let name = unique("ci");
    let extra = "[cloud_init]\nhostname = \"web-1\"\nuser_data = \"#cloud-config\\npackages: [nginx]\\n\"\nssh_authorized_keys = [\"ssh-ed25519 AAAAC3Nza test@vpcd\"]\n";
    let spec = format!("{}{extra}", kernel_spec(&name, ""));
    let out = d.vpcctl_spec("define", &spec, "libvirt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iso = d.vm_dir(&name).join("seed.iso");
    let (label, files) = hypervisor::cloudinit::read_seed(&iso).unwrap();
    assert_eq!(label, "cidata");
    let uuid = d.domain(&name).await.uuid().await.unwrap();
    assert!(
        files
            .meta_data
            .contains(&format!("instance-id: \"{uuid}\"")),
        "{}",
        files.meta_data
    );
    assert!(files.meta_data.contains("local-hostname: \"web-1\""));
    assert!(files.meta_data.contains("ssh-ed25519 AAAAC3Nza test@vpcd"));
    assert_eq!(files.user_data, "#cloud-config\npackages: [nginx]\n");
    assert!(files.network_config.contains("dhcp4: true"));
    // The seed is attached as a CD-ROM.
    let xml = sh("virsh", &["dumpxml", &name]);
    assert!(
        xml.contains("device='cdrom'") && xml.contains("seed.iso"),
        "{xml}"
    );
}

/// An undefine that fails midway (here the domain's files cannot be removed) is carried on by
/// the next undefine, after a restart of vpcd too; the name stays taken until then.
#[tokio::test]
async fn an_undefine_that_failed_midway_is_carried_on_by_the_next() {
    /// Takes the immutable attribute off again, also when the test fails.
    struct Pinned(std::path::PathBuf);
    impl Drop for Pinned {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        }
    }
    let mut d = Daemon::start().await;
    let name = unique("halfundef");
    let out = d.vpcctl_spec("define", &kernel_spec(&name, ""), "qmp");
    assert!(out.status.success(), "{out:?}");
    let pin = d.state.path().join("vms").join(&name).join("pinned");
    std::fs::write(&pin, b"x").unwrap();
    let pinned = Pinned(pin.clone());
    sh("chattr", &["+i", pin.to_str().unwrap()]);
    let out = d.vpcctl(&["undefine", &name]);
    assert_fails(&out, &[&name]);
    let out = d.vpcctl_spec("define", &kernel_spec(&name, ""), "qmp");
    assert_fails(&out, &["AlreadyExists"]);
    // A restart tries again and fails again: the domain is still there to undefine.
    d.restart().await;
    drop(pinned);
    d.vpcctl_ok(&["undefine", &name]);
    assert!(!pin.exists(), "its files are still there");
    let out = d.vpcctl_spec("define", &kernel_spec(&name, ""), "qmp");
    assert!(out.status.success(), "{out:?}");
    d.vpcctl_ok(&["undefine", &name]);
}

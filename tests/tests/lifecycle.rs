//! VM lifecycle through both backends, with a real guest: boot marker, command channel,
//! reboot, ACPI shutdown, destroy, undefine; libvirt domains visible to virsh.

use vpcd_tests::*;

/// Create, run a command in the guest, reboot, shut down, start again, destroy, undefine.
async fn full_lifecycle(backend: &'static str) {
    let d = Daemon::start().await;
    let name = unique(&format!("life-{backend}"));
    d.create(&kernel_spec(&name, ""), backend);
    d.wait_console(&name, BOOT_MARKER, 1);
    assert_eq!(d.domstate(&name), "running");
    let list = d.vpcctl_ok(&["list"]);
    assert!(list.contains(&name) && list.contains("running"), "{list}");
    let info = d.vpcctl_ok(&["dominfo", &name]);
    assert!(
        info.contains(&format!("Backend:        {backend}")),
        "{info}"
    );

    let mut shell = d.guest_shell(&name).await;
    let uname = shell.ok("uname -r");
    assert!(uname.trim().starts_with("6.1"), "{uname}");
    let (out, rc) = shell.run("false");
    assert_eq!(rc, 1, "{out}");
    drop(shell);

    d.vpcctl_ok(&["reboot", &name]);
    d.wait_console(&name, BOOT_MARKER, 2);
    assert_eq!(d.domstate(&name), "running");

    d.vpcctl_ok(&["shutdown", &name]);
    assert_eq!(d.domstate(&name), "shut off");
    let all = d.vpcctl_ok(&["list", "--all"]);
    assert!(all.contains(&name) && all.contains("shut off"), "{all}");
    assert!(!d.vpcctl_ok(&["list"]).contains(&name));

    d.vpcctl_ok(&["start", &name]);
    d.wait_console(&name, BOOT_MARKER, 3);
    d.vpcctl_ok(&["destroy", &name]);
    assert_eq!(d.domstate(&name), "shut off");

    d.vpcctl_ok(&["undefine", &name]);
    assert!(!d.vm_dir(&name).exists(), "undefine left the VM's files");
    let out = d.vpcctl(&["domstate", &name]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[tokio::test]
async fn libvirt_vm_full_lifecycle() {
    full_lifecycle("libvirt").await;
}

#[tokio::test]
async fn qmp_vm_full_lifecycle() {
    full_lifecycle("qmp").await;
}

#[tokio::test]
async fn libvirt_domain_is_an_ordinary_virsh_domain() {
    let d = Daemon::start().await;
    let name = unique("virsh");
    d.create(
        &kernel_spec(&name, "vcpus = 2\nmemory_mib = 200"),
        "libvirt",
    );
    d.wait_console(&name, BOOT_MARKER, 1);
    let list = sh("virsh", &["list"]);
    assert!(
        list.lines()
            .any(|l| l.contains(&name) && l.contains("running")),
        "{list}"
    );
    let info = sh("virsh", &["dominfo", &name]);
    assert!(info.contains("CPU(s):         2"), "{info}");
    assert!(info.contains("204800 KiB"), "{info}");
    let xml = sh("virsh", &["dumpxml", &name]);
    assert!(xml.contains("<domain type='qemu'"), "TCG here: {xml}");
    assert!(xml.contains(hypervisor::libvirt::METADATA_NS), "{xml}");
    // virsh console works on the console that vpcd also logs: what the guest writes to ttyS0
    // shows up there. virsh wants a terminal; script(1) gives it one.
    let mut console = std::process::Command::new("script")
        .args([
            "-qfec",
            &format!("virsh console {name} --force"),
            "/dev/null",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = console.stdout.take().unwrap();
    let seen = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&all).contains("VIRSH-CONSOLE-SEES-THIS") {
                break;
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let mut shell = d.guest_shell(&name).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    while !seen.is_finished() && std::time::Instant::now() < deadline {
        shell.ok("echo VIRSH-CONSOLE-SEES-THIS > /dev/ttyS0");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let _ = console.kill();
    let _ = console.wait();
    let out = seen.join().unwrap();
    assert!(out.contains("Connected to domain"), "{out}");
    assert!(out.contains("VIRSH-CONSOLE-SEES-THIS"), "{out}");
    drop(shell);
    // virsh shutdown behind vpcd's back: vpcd follows.
    sh("virsh", &["shutdown", &name]);
    wait_until(
        PATIENCE,
        || d.domstate(&name) == "shut off",
        "shut off after virsh shutdown",
    );
}

#[tokio::test]
async fn disk_boot_uses_a_private_overlay_of_the_base_image() {
    let d = Daemon::start().await;
    let base = images().disk;
    let before = sh("sha256sum", &[base.to_str().unwrap()]);
    for backend in ["qmp", "libvirt"] {
        let name = unique(&format!("disk-{backend}"));
        d.create(&disk_spec(&name), backend);
        d.wait_console(&name, BOOT_MARKER, 1);
        let mut shell = d.guest_shell(&name).await;
        shell.ok("echo hello > /tmp/x && sync");
        drop(shell);
        let overlay = d.vm_dir(&name).join("disk0.qcow2");
        let info = sh(
            "qemu-img",
            &["info", "-U", "--output=json", overlay.to_str().unwrap()],
        );
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            v["backing-filename"].as_str(),
            Some(base.to_str().unwrap()),
            "{info}"
        );
        let blk = d.vpcctl_ok(&["domblklist", &name]);
        assert!(blk.contains("vda") && blk.contains("disk0.qcow2"), "{blk}");
        d.vpcctl_ok(&["destroy", &name]);
        d.vpcctl_ok(&["undefine", &name]);
    }
    assert_eq!(
        sh("sha256sum", &[base.to_str().unwrap()]),
        before,
        "base image changed"
    );
}

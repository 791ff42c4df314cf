//! Crash safety and changes behind vpcd's back: SIGKILL of vpcd with VMs running, `virsh
//! destroy`, a power-off inside the guest; each becomes a signal and the true state.

use futures::StreamExt;
use vpcd_tests::*;

async fn survives_sigkill(backend: &'static str) {
    let mut d = Daemon::start().await;
    let running = unique(&format!("kill-{backend}"));
    let stopped = unique(&format!("kill-off-{backend}"));
    d.create(&kernel_spec(&running, ""), backend);
    let out = d.vpcctl_spec("define", &kernel_spec(&stopped, ""), backend);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.wait_console(&running, BOOT_MARKER, 1);

    d.kill9();
    // With vpcd gone the VM keeps running.
    let mut shell_target_alive = false;
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(&running) {
                shell_target_alive = true;
            }
        }
    }
    assert!(shell_target_alive, "the VM's QEMU died with vpcd");

    d.spawn().await.unwrap();
    assert_eq!(d.domstate(&running), "running");
    assert_eq!(d.domstate(&stopped), "shut off");
    let list = d.vpcctl_ok(&["list", "--all"]);
    assert!(list.contains(&running) && list.contains(&stopped), "{list}");
    // Re-attached for real: the guest answers and lifecycle operations work.
    let mut shell = d.guest_shell(&running).await;
    shell.ok("true");
    drop(shell);
    d.vpcctl_ok(&["shutdown", &running]);
    assert_eq!(d.domstate(&running), "shut off");
    d.vpcctl_ok(&["start", &stopped]);
    d.wait_console(&stopped, BOOT_MARKER, 1);
}

#[tokio::test]
async fn libvirt_vm_keeps_running_across_vpcd_sigkill() {
    survives_sigkill("libvirt").await;
}

#[tokio::test]
async fn qmp_vm_keeps_running_across_vpcd_sigkill() {
    survives_sigkill("qmp").await;
}

/// Waits for a LifecycleEvent with `state` on the domain; returns its reason.
async fn next_event(stream: &mut vpcctl::proxy::LifecycleEventStream, state: &str) -> String {
    let found = tokio::time::timeout(PATIENCE, async {
        while let Some(sig) = stream.next().await {
            let args = sig.args().unwrap();
            if args.state == state {
                return args.reason.clone();
            }
        }
        panic!("signal stream ended");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no LifecycleEvent with state {state:?}"))
}

#[tokio::test]
async fn virsh_destroy_behind_vpcds_back_is_signalled() {
    let d = Daemon::start().await;
    let name = unique("behind");
    d.create(&kernel_spec(&name, ""), "libvirt");
    d.wait_console(&name, BOOT_MARKER, 1);
    let dom = d.domain(&name).await;
    let mut events = dom.receive_lifecycle_event().await.unwrap();
    let mut props = dom.receive_state_changed().await;
    sh("virsh", &["destroy", &name]);
    let reason = next_event(&mut events, "shut off").await;
    assert_eq!(reason, "destroyed");
    let changed = tokio::time::timeout(PATIENCE, props.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changed.get().await.unwrap(), "shut off");
    assert_eq!(d.domstate(&name), "shut off");
}

async fn guest_poweroff_is_signalled(backend: &'static str) {
    let d = Daemon::start().await;
    let name = unique(&format!("poweroff-{backend}"));
    d.create(&kernel_spec(&name, ""), backend);
    d.wait_console(&name, BOOT_MARKER, 1);
    let dom = d.domain(&name).await;
    let mut events = dom.receive_lifecycle_event().await.unwrap();
    let mut shell = d.guest_shell(&name).await;
    // The shell dies with the guest, so no status comes back.
    shell.send_line("poweroff -f");
    let reason = next_event(&mut events, "shut off").await;
    assert!(!reason.is_empty());
    assert_eq!(d.domstate(&name), "shut off");
}

#[tokio::test]
async fn libvirt_guest_poweroff_is_signalled() {
    guest_poweroff_is_signalled("libvirt").await;
}

#[tokio::test]
async fn qmp_guest_poweroff_is_signalled() {
    guest_poweroff_is_signalled("qmp").await;
}

/// SIGKILL vpcd while several defines are in flight, at different moments: after restart every
/// VM is either fully there (record, files, libvirt domain) or not at all.
#[tokio::test]
async fn sigkill_during_defines_leaves_nothing_half_created() {
    let mut d = Daemon::start().await;
    for (round, delay_ms) in [20u64, 80, 250].into_iter().enumerate() {
        let names: Vec<String> = (0..4)
            .map(|i| unique(&format!("crash{round}x{i}")))
            .collect();
        let mut children = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let backend = if i % 2 == 0 { "libvirt" } else { "qmp" };
            let spec = kernel_spec(name, "[cloud_init]\nhostname = \"h\"\n");
            let file = d.state.path().join(format!("{name}.toml"));
            std::fs::write(&file, spec).unwrap();
            d.cleanup.lock().unwrap().push(name.clone());
            children.push(
                std::process::Command::new(bin("vpcctl"))
                    .args([
                        "--bus-address",
                        &d.bus.address,
                        "define",
                        "--backend",
                        backend,
                    ])
                    .arg(&file)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        d.kill9();
        for mut c in children {
            let _ = c.wait();
        }
        d.spawn().await.unwrap();
        let listed: serde_json::Value =
            serde_json::from_str(&d.vpcctl_ok(&["list", "--all", "--json"])).unwrap();
        let listed: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        let survived = names.iter().filter(|n| listed.contains(n)).count();
        eprintln!("round {round} (kill after {delay_ms} ms): {survived} of 4 defines survived");
        for (i, name) in names.iter().enumerate() {
            let in_libvirt = std::process::Command::new("virsh")
                .args(["dominfo", name])
                .output()
                .unwrap()
                .status
                .success();
            let dir = d.vm_dir(name);
            if listed.contains(name) {
                assert!(
                    dir.join("seed.iso").exists(),
                    "{name}: listed without its files"
                );
                assert_eq!(in_libvirt, i % 2 == 0, "{name}: libvirt disagrees");
                assert_eq!(d.domstate(name), "shut off");
            } else {
                assert!(
                    !dir.exists(),
                    "{name}: files left without a VM (round {round})"
                );
                assert!(
                    !in_libvirt,
                    "{name}: libvirt domain left without a VM (round {round})"
                );
            }
        }
    }
}

/// A domain that libvirt lost while vpcd was down (undefined behind its back) is defined again
/// from the store at restart, and boots.
#[tokio::test]
async fn libvirt_domain_lost_while_vpcd_was_down_is_redefined() {
    let mut d = Daemon::start().await;
    let name = unique("lost");
    let out = d.vpcctl_spec("define", &kernel_spec(&name, ""), "libvirt");
    assert!(out.status.success());
    d.kill9();
    sh("virsh", &["undefine", &name]);
    d.spawn().await.unwrap();
    assert!(sh("virsh", &["list", "--all"]).contains(&name));
    d.vpcctl_ok(&["start", &name]);
    d.wait_console(&name, BOOT_MARKER, 1);
}

/// A guest that ignores the ACPI power button: shutdown times out with a typed error and the
/// VM keeps running; destroy still stops it.
#[tokio::test]
async fn shutdown_of_a_guest_ignoring_acpi_times_out() {
    let d = Daemon::start().await;
    let name = unique("deaf");
    d.create(&kernel_spec(&name, ""), "qmp");
    d.wait_console(&name, BOOT_MARKER, 1);
    let mut shell = d.guest_shell(&name).await;
    shell.ok("killall acpid");
    drop(shell);
    let out = d.vpcctl(&["shutdown", &name, "--timeout", "2"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out") && err.contains("Timeout") && err.contains(&name),
        "{err}"
    );
    assert_eq!(d.domstate(&name), "running");
    d.vpcctl_ok(&["destroy", &name]);
    assert_eq!(d.domstate(&name), "shut off");
}

//! vhost-user-blk: a real guest (QEMU, its memory shared) uses a volume replicated by three
//! `blockdrv node`s and a file-backed volume (`blockdrv vhost-user`) as virtio disks. What the
//! host writes over NBD the guest reads, what the guest writes the host reads through another
//! node, a discard leaves a hole that NBD's block status reports, and once the guest's QEMU is
//! gone the sockets take the next one.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use vpcd_tests::*;

/// Child processes, killed when the test ends (also when it fails).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

/// A guest (killed when what this returns is dropped) with the vhost-user-blk sockets `disks` as vda, vdb, ...; its console in
/// `dir/console-<tag>.log`, its command shell on `dir/shell-<tag>.sock`.
fn guest(dir: &Path, tag: &str, disks: &[PathBuf]) -> (Procs, GuestShell) {
    let i = images();
    let console = dir.join(format!("console-{tag}.log"));
    let shell = dir.join(format!("shell-{tag}.sock"));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine",
        "pc,accel=tcg,memory-backend=mem",
        "-m",
        "256M",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
    ])
    .arg(&i.vmlinux)
    .arg("-initrd")
    .arg(&i.initramfs)
    .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
    .arg(format!("file:{}", console.display()))
    .arg("-serial")
    .arg(format!("unix:{},server=on,wait=off", shell.display()));
    for (n, d) in disks.iter().enumerate() {
        cmd.arg("-chardev")
            .arg(format!("socket,id=d{n},path={}", d.display()))
            .arg("-device")
            .arg(format!("vhost-user-blk-pci,chardev=d{n},num-queues=1"));
    }
    let child = Procs(vec![cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("qemu-{tag}.log"))).unwrap())
        .spawn()
        .unwrap()]);
    wait_until(
        PATIENCE,
        || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains(BOOT_MARKER))
                || std::fs::read_to_string(dir.join(format!("qemu-{tag}.log")))
                    .is_ok_and(|l| !l.is_empty())
        },
        "the guest to boot",
    );
    let log = std::fs::read_to_string(dir.join(format!("qemu-{tag}.log"))).unwrap();
    assert!(log.is_empty(), "QEMU: {log}");
    let s = std::os::unix::net::UnixStream::connect(&shell).unwrap();
    (child, GuestShell::new(OwnedFd::from(s)))
}

#[test]
fn a_guest_uses_replicated_and_file_volumes_over_vhost_user_blk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let blockdrv = bin("blockdrv");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let members: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1))
        .collect();
    let mut procs = Procs(Vec::new());
    for (i, port) in ports.iter().enumerate() {
        let mut cmd = Command::new(&blockdrv);
        cmd.arg("node")
            .args(["--id", &(i + 1).to_string(), "--dir"])
            .arg(d.join(format!("n{i}")))
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        for m in &members {
            cmd.args(["--member", m]);
        }
        cmd.args(["--volume", "v:64M", "--nbd-unix"])
            .arg(d.join(format!("n{i}.nbd")))
            .arg("--vhost-user-dir")
            .arg(d.join(format!("vh{i}")))
            .args(["--heartbeat-ms", "100", "--election-ms", "500"])
            .stderr(std::fs::File::create(d.join(format!("n{i}.log"))).unwrap());
        procs.0.push(cmd.spawn().unwrap());
    }
    let nbd = |i: usize| {
        format!(
            "nbd+unix:///v?socket={}",
            d.join(format!("n{i}.nbd")).display()
        )
    };
    wait_until(
        PATIENCE,
        || {
            let out = Command::new(&blockdrv)
                .args(["status", "--addr", &format!("127.0.0.1:{}", ports[0])])
                .args(["--volume", "v"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("\"leader\":")
                && !String::from_utf8_lossy(&out.stdout).contains("\"leader\":null")
                && (0..3).all(|i| d.join(format!("vh{i}/v.sock")).exists())
        },
        "the volume's group to have a leader and its vhost-user sockets",
    );
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", &nbd(0)]);

    // A file-backed volume on its own socket.
    let file = d.join("file.img");
    std::fs::write(&file, vec![0u8; 16 << 20]).unwrap();
    run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x77 4096 4096",
        file.to_str().unwrap(),
    ]);
    let file_sock = d.join("file.sock");
    procs.0.push(
        Command::new(&blockdrv)
            .args(["vhost-user", "--socket"])
            .arg(&file_sock)
            .arg("--export")
            .arg(format!("f={}", file.display()))
            .stderr(std::fs::File::create(d.join("file.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_until(PATIENCE, || file_sock.exists(), "the file volume's socket");

    let disks = [d.join("vh1/v.sock"), file_sock.clone()];
    let (qemu, mut shell) = guest(d, "a", &disks);
    // The replicated volume: 64 MiB, its name as the disk's serial, what the host wrote.
    assert_eq!(shell.ok("cat /sys/block/vda/size").trim(), "131072");
    assert_eq!(shell.ok("cat /sys/block/vda/serial").trim(), "v");
    let first = shell.ok("dd if=/dev/vda bs=4096 count=1 2>/dev/null | od -An -tx1 | head -1");
    assert!(first.contains("5a 5a 5a 5a"), "{first}");
    // The guest writes; the host reads it through another node.
    shell.ok("printf VHOSTWRITE | dd of=/dev/vda bs=512 seek=256 conv=notrunc,fsync 2>/dev/null");
    let out = run(&["qemu-io", "-f", "raw", "-c", "read -v 131072 10", &nbd(2)]);
    assert!(out.contains("VHOSTWRITE"), "{out}");
    // Data, then a discard of it: a hole, as NBD's block status tells.
    shell.ok("dd if=/dev/urandom of=/dev/vda bs=1M seek=1 count=1 oflag=direct 2>/dev/null");
    assert_eq!(extent_at(&nbd(0), 1 << 20), "data");
    shell.ok("blkdiscard -o 1048576 -l 1048576 /dev/vda");
    let after = extent_at(&nbd(0), 1 << 20);
    assert!(after.contains("hole"), "{after}");
    // The file volume: what was in the file, and the guest's write lands in it.
    let f = shell.ok("dd if=/dev/vdb bs=4096 skip=1 count=1 2>/dev/null | od -An -tx1 | head -1");
    assert!(f.contains("77 77 77 77"), "{f}");
    shell.ok("printf FILEWRITE | dd of=/dev/vdb bs=512 seek=64 conv=notrunc,fsync 2>/dev/null");
    let content = std::fs::read(&file).unwrap();
    assert_eq!(&content[64 * 512..64 * 512 + 9], b"FILEWRITE");

    // The front end goes; the sockets take the next one, which sees the same data.
    drop(shell);
    drop(qemu);
    let start = Instant::now();
    let (qemu, mut shell) = guest(d, "b", &disks);
    let again = shell.ok("dd if=/dev/vda bs=512 skip=256 count=1 2>/dev/null | head -c 10");
    assert_eq!(again.trim(), "VHOSTWRITE");
    let again = shell.ok("dd if=/dev/vdb bs=512 skip=64 count=1 2>/dev/null | head -c 9");
    assert_eq!(again.trim(), "FILEWRITE");
    eprintln!("second guest up in {:?}", start.elapsed());
    drop(qemu);
    // Deleting the volume stops serving it: every node's socket goes.
    run(&[
        blockdrv.to_str().unwrap(),
        "volume",
        "delete",
        "--addr",
        &format!("127.0.0.1:{}", ports[0]),
        "v",
    ]);
    wait_until(
        PATIENCE,
        || (0..3).all(|i| !d.join(format!("vh{i}/v.sock")).exists()),
        "the vhost-user sockets of the deleted volume to go",
    );
    drop(procs);
}

/// The description (`data`, `hole,zero`, ...) `nbdinfo --map` gives the extent holding `at`.
fn extent_at(uri: &str, at: u64) -> String {
    let map = run(&["nbdinfo", "--map", uri]);
    map.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (off, len) = (
                f.first()?.parse::<u64>().ok()?,
                f.get(1)?.parse::<u64>().ok()?,
            );
            (off <= at && at < off + len).then(|| f[3..].join(" "))
        })
        .unwrap_or_else(|| panic!("no extent at {at}: {map}"))
}

//! Test harness for vpcd's integration tests. Each test gets its own private D-Bus bus, its own
//! vpcd process with its own state directory and bus name, and VM names no other test uses;
//! everything is torn down on drop, also when the test fails.
//!
//! Needs root, libvirtd running on `qemu:///system`, QEMU, and the test guest built by
//! `images/build.sh` into `$VPCTEST_IMAGES` (scripts/test.sh does all of that).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vpcctl::proxy::{DomainProxy, HostProxy};

/// The line the test guest prints on its console once userland is up.
pub const BOOT_MARKER: &str = "VPCD-GUEST-BOOTED";

/// A generous bound for anything that should take seconds: only a hang trips it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Where the workspace's binaries are: next to the test executable's `deps/` directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The test guest's files, from `$VPCTEST_IMAGES` (made by images/build.sh).
#[derive(Debug, Clone)]
pub struct Images {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub disk: PathBuf,
}

pub fn images() -> Images {
    let dir = PathBuf::from(std::env::var("VPCTEST_IMAGES").expect(
        "VPCTEST_IMAGES is not set: run the tests through scripts/test.sh, which builds the guest",
    ));
    let i = Images {
        vmlinux: dir.join("vmlinux"),
        initramfs: dir.join("initramfs.cpio.gz"),
        disk: dir.join("disk.qcow2"),
    };
    for p in [&i.vmlinux, &i.initramfs, &i.disk] {
        assert!(
            p.exists(),
            "{} is missing (images/build.sh makes it)",
            p.display()
        );
    }
    i
}

/// cloud-init's Python package (its metadata readers, used as a real client of the metadata
/// service), from `$VPCTEST_CLOUDINIT` (unpacked by scripts/cloud-init-lib.sh, not installed).
pub fn cloud_init_lib() -> PathBuf {
    let dir = PathBuf::from(std::env::var("VPCTEST_CLOUDINIT").expect(
        "VPCTEST_CLOUDINIT is not set: run the tests through scripts/test.sh, which unpacks cloud-init",
    ));
    assert!(
        dir.join("cloudinit/sources/helpers/openstack.py").exists(),
        "{} holds no cloud-init (scripts/cloud-init-lib.sh unpacks it)",
        dir.display()
    );
    dir
}

/// A name unique to this process and call, so parallel or leftover runs never collide.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub use blockdrv::testing::free_port;

/// A kernel-boot spec for the test guest.
pub fn kernel_spec(name: &str, extra: &str) -> String {
    let i = images();
    format!(
        "name = \"{name}\"\n{extra}\n[boot]\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 panic=-1 quiet\"\n",
        i.vmlinux.display(),
        i.initramfs.display()
    )
}

/// A disk-boot spec: a copy-on-write overlay on the test guest's disk image.
pub fn disk_spec(name: &str) -> String {
    let i = images();
    format!(
        "name = \"{name}\"\nmemory_mib = 256\n[[disks]]\nimage = \"{}\"\n",
        i.disk.display()
    )
}

/// A private `dbus-daemon` with a system-bus-like configuration.
#[derive(Debug)]
pub struct Bus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

impl Bus {
    /// A bus on which everyone may do everything.
    pub fn open() -> Bus {
        Bus::with_policy(
            r#"<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/><allow own="*"/></policy>"#,
        )
    }

    /// A bus with the given `<policy>` elements (and `<include>`s).
    pub fn with_policy(policy: &str) -> Bus {
        let dir = tempfile::Builder::new()
            .prefix("vpcd-bus-")
            .tempdir()
            .unwrap();
        let sock = dir.path().join("bus.sock");
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN\" \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n\
                 <busconfig><type>system</type><listen>unix:path={}</listen><auth>EXTERNAL</auth>{policy}</busconfig>\n",
                sock.display()
            ),
        )
        .unwrap();
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run dbus-daemon");
        wait_until(
            Duration::from_secs(10),
            || sock.exists(),
            "private bus socket",
        );
        Bus {
            address: format!("unix:path={}", sock.display()),
            dir,
            child,
        }
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Options for a vpcd under test.
#[derive(Debug, Clone)]
pub struct DaemonOpts {
    pub backend: &'static str,
    pub accel: &'static str,
    pub libvirt_uri: String,
    /// More vpcd flags (`--netns`, `--underlay-ip`, `--peer`, ...).
    pub extra: Vec<String>,
}

impl Default for DaemonOpts {
    fn default() -> DaemonOpts {
        DaemonOpts {
            backend: "auto",
            accel: "tcg",
            libvirt_uri: "qemu:///system".into(),
            extra: Vec::new(),
        }
    }
}

/// A bpffs directory of this process for a daemon's pins (removed by the daemon's drop).
pub fn bpf_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{}", unique("vpcd-test")))
}

/// A vpcd with the QMP backend and more flags `extra`, on a bus of its own.
pub async fn qmp_daemon(extra: &[&str]) -> Daemon {
    let opts = DaemonOpts {
        backend: "qmp",
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    Daemon::start_with(opts, Bus::open()).await
}

/// A vpcd process on a private bus with its own state directory.
#[derive(Debug)]
pub struct Daemon {
    pub bus: Bus,
    pub state: tempfile::TempDir,
    pub bus_name: String,
    pub opts: DaemonOpts,
    /// Where this daemon pins its eBPF objects.
    pub bpf_dir: PathBuf,
    /// The daemon's instance id (it names the service namespaces it makes).
    pub instance_id: String,
    child: Option<Child>,
    /// Domains any test defined through this daemon, destroyed and undefined on drop.
    pub cleanup: std::sync::Mutex<Vec<String>>,
}

impl Daemon {
    pub async fn start() -> Daemon {
        Daemon::start_with(DaemonOpts::default(), Bus::open()).await
    }

    pub async fn start_with(opts: DaemonOpts, bus: Bus) -> Daemon {
        let state = tempfile::Builder::new()
            .prefix("vpcd-state-")
            .tempdir()
            .unwrap();
        // QEMU under libvirt runs unprivileged and must reach the VM files in here.
        std::fs::set_permissions(
            state.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let mut d = Daemon {
            bus,
            state,
            bus_name: "org.vpcd.Host1".into(),
            opts,
            bpf_dir: bpf_dir(),
            instance_id: String::new(),
            child: None,
            cleanup: Default::default(),
        };
        d.spawn().await.expect("vpcd did not come up");
        d.instance_id = d.host().await.instance_id().await.unwrap();
        d
    }

    /// The command line vpcd runs with.
    pub fn command(&self) -> Command {
        self.command_for(&self.opts)
    }

    /// vpcd's command line with other options (same bus and state directory).
    pub fn command_for(&self, opts: &DaemonOpts) -> Command {
        let mut c = Command::new(bin("vpcd"));
        // Only this harness configures the daemon under test.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("VPCD_") {
                c.env_remove(k);
            }
        }
        c.arg("--bus-address")
            .arg(&self.bus.address)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--backend")
            .arg(opts.backend)
            .arg("--accel")
            .arg(opts.accel)
            .arg("--libvirt-uri")
            .arg(&opts.libvirt_uri)
            .arg("--log")
            .arg("debug")
            .arg("--bpf-dir")
            .arg(&self.bpf_dir)
            .args(&opts.extra)
            .env("VPCD_CONFIG", self.state.path().join("none.toml"));
        c
    }

    /// Starts vpcd and waits until it owns its bus name. Errors carry vpcd's stderr.
    pub async fn spawn(&mut self) -> Result<(), String> {
        std::fs::write(self.state.path().join("none.toml"), "").unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = self
            .command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("run vpcd");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("vpcd exited {status}: {}", self.log()));
            }
            if self.owns_name().await {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("vpcd did not take its name: {}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn owns_name(&self) -> bool {
        let Ok(conn) = vpcctl::proxy::connect(&self.bus.address).await else {
            return false;
        };
        let Ok(dbus) = zbus::fdo::DBusProxy::new(&conn).await else {
            return false;
        };
        let Ok(name) = zbus::names::BusName::try_from(self.bus_name.as_str()) else {
            return false;
        };
        dbus.name_has_owner(name).await.unwrap_or(false)
    }

    pub fn log_path(&self) -> PathBuf {
        self.state.path().join("vpcd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILLs vpcd.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await.expect("vpcd did not come back");
    }

    /// Runs vpcctl against this daemon.
    pub fn vpcctl(&self, args: &[&str]) -> Output {
        Command::new(bin("vpcctl"))
            .arg("--bus-address")
            .arg(&self.bus.address)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vpcctl")
    }

    /// Runs vpcctl and returns its stdout; panics with stderr when it fails.
    pub fn vpcctl_ok(&self, args: &[&str]) -> String {
        let out = self.vpcctl(args);
        assert!(
            out.status.success(),
            "vpcctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        format!(
            "\n--- vpcd log (last lines) ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Writes `spec` to a file and runs `vpcctl VERB FILE [--backend B]`.
    pub fn vpcctl_spec(&self, verb: &str, spec: &str, backend: &str) -> Output {
        let name = spec
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .map(|n| n.trim_end_matches('"').to_string());
        if let Some(n) = name {
            self.cleanup.lock().unwrap().push(n);
        }
        let file = self.state.path().join(format!("spec-{}.toml", unique("s")));
        std::fs::write(&file, spec).unwrap();
        let mut args = vec![verb, file.to_str().unwrap()];
        if !backend.is_empty() {
            args.extend(["--backend", backend]);
        }
        self.vpcctl(&args)
    }

    /// `vpcctl create` that must succeed.
    pub fn create(&self, spec: &str, backend: &str) {
        let out = self.vpcctl_spec("create", spec, backend);
        assert!(
            out.status.success(),
            "create failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }

    pub async fn conn(&self) -> zbus::Connection {
        vpcctl::proxy::connect(&self.bus.address).await.unwrap()
    }

    pub async fn host(&self) -> HostProxy<'static> {
        HostProxy::builder(&self.conn().await)
            .destination(self.bus_name.clone())
            .unwrap()
            .build()
            .await
            .unwrap()
    }

    pub async fn domain(&self, name: &str) -> DomainProxy<'static> {
        let conn = self.conn().await;
        let path = self.host().await.lookup_domain(name).await.unwrap();
        DomainProxy::builder(&conn)
            .destination(self.bus_name.clone())
            .unwrap()
            .path(path)
            .unwrap()
            .build()
            .await
            .unwrap()
    }

    /// The VM's directory under the state dir.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.state.path().join("vms").join(name)
    }

    /// Waits until the console log of `name` holds `marker` `count` times.
    pub fn wait_console(&self, name: &str, marker: &str, count: usize) {
        let log = self.vm_dir(name).join("console.log");
        wait_until(
            PATIENCE,
            || {
                std::fs::read_to_string(&log)
                    .map(|s| s.matches(marker).count() >= count)
                    .unwrap_or(false)
            },
            &format!("{marker} x{count} on {name}'s console"),
        );
    }

    /// The guest's command shell (serial port 1), through vpcd's OpenConsole.
    pub async fn guest_shell(&self, name: &str) -> GuestShell {
        let fd = self.domain(name).await.open_console(1).await.unwrap();
        GuestShell::new(OwnedFd::from(fd))
    }

    /// The service (router, DHCP) namespaces this daemon has now.
    pub fn service_namespaces(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("-svc-") && n.ends_with(&self.instance_id[..8]))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn domstate(&self, name: &str) -> String {
        self.vpcctl_ok(&["domstate", name]).trim().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let names = self.cleanup.lock().unwrap().clone();
        // Through vpcd while it runs, so its store stays right; then directly, for what is left.
        if self.child.is_some() {
            for n in &names {
                let _ = self.vpcctl(&["destroy", n]);
                let _ = self.vpcctl(&["undefine", n]);
            }
        }
        self.kill9();
        for n in &names {
            let _ = Command::new("virsh").args(["-q", "destroy", n]).output();
            let _ = Command::new("virsh")
                .args(["-q", "undefine", n, "--nvram"])
                .output();
        }
        // Pinned eBPF links and maps: unpinning detaches the programs.
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
        // FRR of the management role outlives vpcd by design; not a test's daemon.
        kill_frr(&self.state.path().join("frr"));
        // Service (router, DHCP) namespaces this daemon made: `<prefix>-svc-<tenant>-<id8>`.
        if self.instance_id.len() >= 8 {
            let tail = format!("-{}", &self.instance_id[..8]);
            if let Ok(entries) = std::fs::read_dir("/run/netns") {
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name.contains("-svc-") && name.ends_with(&tail) {
                        let _ = Command::new("ip").args(["netns", "del", &name]).output();
                    }
                }
            }
        }
        // QEMUs of the QMP backend that a failed test left behind.
        let marker = self.state.path().to_string_lossy().into_owned();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
                    continue;
                };
                if String::from_utf8_lossy(&cmd).contains(&marker)
                    && pid != std::process::id() as i32
                {
                    // SAFETY: kill(2) on a QEMU whose command line names our own state dir.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

/// Waits for `cond`, panicking with `what` after `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The test guest's shell on its second serial port. Protocol (images/README.md): write a
/// command line that ends by echoing `__VPCD_RC=<status>__`; read until that marker.
#[derive(Debug)]
pub struct GuestShell {
    reader: BufReader<std::fs::File>,
    writer: std::fs::File,
}

impl GuestShell {
    /// Takes over the channel and syncs with the shell (images/README.md, "Command channel").
    pub fn new(fd: OwnedFd) -> GuestShell {
        let file = std::fs::File::from(fd);
        let writer = file.try_clone().unwrap();
        let mut shell = GuestShell {
            reader: BufReader::new(file),
            writer,
        };
        shell.sync();
        shell
    }

    /// Sends `echo __VPCD_SYNC_<n>__` until the line comes back, discarding what came before.
    fn sync(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let mut reader = self.reader.get_ref().try_clone().unwrap();
        let deadline = Instant::now() + PATIENCE;
        // A reader thread, so a silent guest cannot block the retries. It stops at the first
        // sync line it passes on; bytes after that line stay in the stream for `run`.
        let handle = std::thread::spawn(move || {
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while std::io::Read::read(&mut reader, &mut byte).unwrap_or(0) == 1 {
                if byte[0] != b'\n' {
                    line.push(byte[0]);
                    continue;
                }
                let l = String::from_utf8_lossy(&line).replace('\r', "");
                line.clear();
                if l.starts_with("__VPCD_SYNC_") {
                    let _ = tx.send(l);
                    return;
                }
            }
        });
        for n in 0.. {
            assert!(
                Instant::now() < deadline,
                "guest shell never answered a sync"
            );
            self.send_line(&format!("echo __VPCD_SYNC_{n}__"));
            if rx.recv_timeout(Duration::from_secs(1)).is_ok() {
                break;
            }
        }
        handle.join().unwrap();
        // Answers to earlier, slow syncs may still arrive: one more round trip flushes them.
        let token = unique("sync").replace('-', "_");
        self.send_line(&format!("echo __VPCD_SYNC_{token}__"));
        loop {
            let mut l = String::new();
            assert!(
                self.reader.read_line(&mut l).unwrap() > 0,
                "guest shell closed"
            );
            if l.contains(&format!("__VPCD_SYNC_{token}__")) {
                break;
            }
        }
    }

    /// Runs `cmd` in the guest; returns its output and exit status.
    pub fn run(&mut self, cmd: &str) -> (String, i32) {
        eprintln!("guest$ {cmd}");
        self.send_line(cmd);
        self.send_line("echo \"__VPCD_RC=$?__\"");
        let mut out = String::new();
        loop {
            let mut l = String::new();
            let n = self.reader.read_line(&mut l).expect("read guest shell");
            assert!(n > 0, "guest shell closed while running {cmd:?}: {out}");
            let clean = l.replace('\r', "");
            // The marker may follow output that did not end its line.
            if let Some((before, rc)) = clean
                .trim_end()
                .split_once("__VPCD_RC=")
                .and_then(|(b, r)| Some((b, r.strip_suffix("__")?)))
            {
                out.push_str(before);
                return (out, rc.parse().expect("status is a number"));
            }
            out.push_str(&clean);
        }
    }

    /// Sends a line without waiting for anything back.
    pub fn send_line(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// Runs `cmd` and asserts it succeeded; returns its output.
    pub fn ok(&mut self, cmd: &str) -> String {
        let (out, rc) = self.run(cmd);
        assert_eq!(rc, 0, "guest command {cmd:?} failed: {out}");
        out
    }
}

/// Runs a command and returns stdout, panicking with stderr on failure.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A network namespace made for a test (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Ns {
    pub name: String,
}

impl Ns {
    pub fn new(tag: &str) -> Ns {
        let name = format!("vt{}{tag}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Ns { name }
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .output()
            .unwrap()
    }

    /// Runs a command inside the namespace and returns its stdout; panics if it fails.
    pub fn ok(&self, cmd: &[&str]) -> String {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "{cmd:?} in {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether `ping` to `ip` gets an answer (3 tries, 1 s each).
    pub fn pings(&self, ip: &str) -> bool {
        self.run(&["ping", "-c", "3", "-i", "0.2", "-W", "1", ip])
            .status
            .success()
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens stay in it).
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns(2) of this thread only, on a descriptor we hold.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            f()
        })
        .join()
        .unwrap()
    }

    /// Listens on `addr` inside the namespace and answers one HTTP request with `hello`; the
    /// handle gives the client's address as seen here (None if nobody came within 20 s).
    pub fn http_once(&self, addr: &str) -> std::thread::JoinHandle<Option<std::net::SocketAddr>> {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        let listener = self.within(move || std::net::TcpListener::bind(addr).unwrap());
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match listener.accept() {
                    Ok((mut c, peer)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut buf = [0u8; 1024];
                        let _ = c.read(&mut buf);
                        let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nhello\n");
                        return Some(peer);
                    }
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => return None,
                }
            }
        })
    }

    /// Connects from inside the namespace to `addr` and returns the local address used, or
    /// None if the connection fails within 5 s.
    pub fn tcp_from(&self, addr: &str) -> Option<std::net::SocketAddr> {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        self.within(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
            c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut out = String::new();
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let _ = c.read_to_string(&mut out);
            c.local_addr().ok()
        })
    }

    /// Starts capturing the frames on `eth0` that match the pcap `filter` (tcpdump); stop it
    /// with [`Capture::stop`] to get them, one line each.
    pub fn capture(&self, filter: &str) -> Capture {
        let mut child = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tcpdump", "-l", "-n", "-e", "-i", "eth0",
            ])
            .arg(filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        // It prints "listening on ..." once the capture is in place.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("listening on") {
            line.clear();
        }
        assert!(
            line.contains("listening on"),
            "tcpdump did not start: {line}"
        );
        Capture { child: Some(child) }
    }

    /// Links in the namespace (names).
    pub fn links(&self) -> Vec<String> {
        let out = sh("ip", &["-n", &self.name, "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }
}

/// A running capture (`Ns::capture`).
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
}

impl Capture {
    /// Ends the capture; the frames it saw.
    pub fn stop(mut self) -> Vec<String> {
        let child = self.child.take().expect("running");
        // SIGINT: tcpdump flushes what it has and exits.
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .output();
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // Processes left inside (a failed test's ping) would keep the namespace alive.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Two "hosts" (namespaces) joined by a veth underlay: host 1 is 192.0.2.1, host 2 192.0.2.2.
#[derive(Debug)]
pub struct Underlay {
    pub h1: Ns,
    pub h2: Ns,
}

impl Underlay {
    pub fn new() -> Underlay {
        let h1 = Ns::new("h1");
        let h2 = Ns::new("h2");
        let a = format!("{}u", h1.name);
        let b = format!("{}u", h2.name);
        sh(
            "ip",
            &[
                "link", "add", &a, "netns", &h1.name, "type", "veth", "peer", &b, "netns", &h2.name,
            ],
        );
        for (ns, dev, ip) in [(&h1, &a, "192.0.2.1/24"), (&h2, &b, "192.0.2.2/24")] {
            sh("ip", &["-n", &ns.name, "addr", "add", ip, "dev", dev]);
            sh("ip", &["-n", &ns.name, "link", "set", dev, "up"]);
        }
        Underlay { h1, h2 }
    }

    /// vpcd flags for host `n` (1 or 2).
    pub fn flags(&self, n: u8) -> Vec<String> {
        let (ns, me, peer) = match n {
            1 => (&self.h1, "192.0.2.1", "192.0.2.2"),
            _ => (&self.h2, "192.0.2.2", "192.0.2.1"),
        };
        ["--netns", &ns.path(), "--underlay-ip", me, "--peer", peer]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }
}

impl Default for Underlay {
    fn default() -> Underlay {
        Underlay::new()
    }
}

/// A namespace "VM" with a port on `net/subnet`; returns the namespace.
pub fn ns_port(d: &Daemon, tag: &str, net: &str, subnet: &str, ip: &str, security: bool) -> Ns {
    let ns = Ns::new(tag);
    let path = ns.path();
    let mut args = vec!["port-create", net, subnet, "--netns", &path, "--ip", ip];
    if !security {
        args.push("--no-port-security");
    }
    d.vpcctl_ok(&args);
    ns
}

/// The id of the port with address `ip` (in any network).
pub fn port_id_of(d: &Daemon, ip: &str) -> u32 {
    port_id_in(d, None, ip)
}

/// The id of the port with address `ip` in network `net` (any network if `None`).
pub fn port_id_in(d: &Daemon, net: Option<&str>, ip: &str) -> u32 {
    let ports: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "port-list"])).unwrap();
    ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["ip"] == ip
                && net.is_none_or(|n| {
                    p["subnet"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(&format!("{n}/")))
                })
        })
        .unwrap_or_else(|| panic!("no port with {ip}: {ports}"))["id"]
        .as_u64()
        .unwrap() as u32
}

/// FRR (zebra + bgpd) as an EVPN route reflector inside namespace `ns`, AS `asn`, router id
/// `id`, accepting iBGP sessions from `range` (`bgp listen range`); killed on drop.
#[derive(Debug)]
pub struct FrrReflector {
    pub dir: tempfile::TempDir,
}

impl FrrReflector {
    /// The configuration and daemons are vpcd's own management-role ones (`vpcd::frr`).
    pub fn start(ns: &Ns, asn: u32, id: &str, range: &str) -> FrrReflector {
        let dir = tempfile::Builder::new()
            .prefix("vpcd-frr-")
            .tempdir()
            .unwrap();
        let cfg = vpcd::frr::FrrConfig {
            dir: dir.path().to_path_buf(),
            asn,
            router_id: id.parse().unwrap(),
            listen_ranges: vec![range.to_string()],
            hold_time: 90,
            bin_dir: "/usr/lib/frr".into(),
        };
        std::fs::write(dir.path().join("zebra.conf"), "hostname rr\n").unwrap();
        std::fs::write(dir.path().join("bgpd.conf"), vpcd::frr::bgpd_conf(&cfg)).unwrap();
        sh("chown", &["-R", "frr:frr", dir.path().to_str().unwrap()]);
        let netns = netdrv::Netns::named(&ns.name).unwrap();
        for daemon in ["zebra", "bgpd"] {
            vpcd::frr::start(&cfg, &netns, daemon).unwrap();
        }
        FrrReflector { dir }
    }

    pub fn vtysh(&self, cmd: &str) -> String {
        sh(
            "vtysh",
            &["--vty_socket", self.dir.path().to_str().unwrap(), "-c", cmd],
        )
    }
}

impl Drop for FrrReflector {
    fn drop(&mut self) {
        kill_frr(self.dir.path());
    }
}

/// Kills the FRR daemons whose pid files are in `dir`.
pub fn kill_frr(dir: &std::path::Path) {
    for daemon in ["bgpd", "zebra"] {
        if let Ok(pid) = std::fs::read_to_string(dir.join(format!("{daemon}.pid"))) {
            let _ = Command::new("kill").args(["-9", pid.trim()]).output();
        }
    }
}

/// The MAC of the port with address `ip`.
pub fn port_mac_of(d: &Daemon, ip: &str) -> String {
    let ports: serde_json::Value =
        serde_json::from_str(&d.vpcctl_ok(&["--json", "port-list"])).unwrap();
    ports
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ip"] == ip)
        .unwrap_or_else(|| panic!("no port with {ip}: {ports}"))["mac"]
        .as_str()
        .unwrap()
        .to_string()
}

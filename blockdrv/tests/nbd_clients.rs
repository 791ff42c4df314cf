//! The NBD server against real clients (libnbd's `nbdinfo` and `nbdcopy`, QEMU's `qemu-img` and
//! `qemu-io`) and against a raw client of this file that sends what well-behaved clients do not.
//! Each test runs the `blockdrv` binary on a unix socket (and TCP) in a temporary directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockdrv::nbd::proto::{self, Command as Cmd};
use common::Raw;

mod common;

/// A `blockdrv nbd` process with exports `data` (64 MiB or as given) and `small` (1 MiB).
struct Server {
    dir: tempfile::TempDir,
    child: Child,
    tcp: Option<String>,
}

impl Server {
    fn start(data_size: &str, tcp: bool) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockdrv"));
        cmd.arg("nbd")
            .arg("--unix")
            .arg(&sock)
            .arg("--export")
            .arg(format!(
                "data={}:{data_size}",
                dir.path().join("data.img").display()
            ))
            .arg("--export")
            .arg(format!(
                "small={}:1M",
                dir.path().join("small.img").display()
            ))
            .stderr(Stdio::null());
        let tcp = tcp.then(|| {
            // A free port: bind, note it, let go.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        });
        if let Some(addr) = &tcp {
            cmd.arg("--tcp").arg(addr);
        }
        let child = cmd.spawn().expect("blockdrv binary");
        let s = Server { dir, child, tcp };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(s.socket()).is_err() {
            assert!(Instant::now() < deadline, "blockdrv did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket().display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps.sh installs it)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_file(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut urandom = std::fs::File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        urandom.read_exact(&mut buf).unwrap();
        f.write_all(&buf).unwrap();
    }
}

fn same_files(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = fa.read(&mut ba).unwrap();
        let mut nb = 0;
        while nb < na {
            let n = fb.read(&mut bb[nb..na]).unwrap();
            if n == 0 {
                return false;
            }
            nb += n;
        }
        if na == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if ba[..na] != bb[..na] {
            return false;
        }
    }
}

#[test]
fn nbdinfo_lists_the_exports_and_what_they_can_do() {
    let s = Server::start("64M", true);
    let out = run(&["nbdinfo", "--list", &s.uri("")]);
    let exports = [
        "export=\"data\"",
        "export=\"small\"",
        "export-size: 67108864",
        "can_df: true",
    ];
    for want in common::FEATURES.iter().chain(&exports) {
        assert!(out.contains(want), "{want} missing in:\n{out}");
    }
    // The same over TCP (loopback), and the empty name is the first export.
    let tcp = format!("nbd://{}/small", s.tcp.as_ref().unwrap());
    assert!(run(&["nbdinfo", "--size", &tcp]).trim() == "1048576");
    assert!(run(&["nbdinfo", "--size", &s.uri("")]).trim() == "67108864");
}

#[test]
fn random_data_written_by_nbdcopy_and_qemu_img_reads_back_identical() {
    let s = Server::start("256M", false);
    let src = s.path("src.bin");
    random_file(&src, 256);
    let uri = s.uri("data");
    run(&["nbdcopy", "--connections=4", src.to_str().unwrap(), &uri]);
    let back = s.path("back.bin");
    run(&["nbdcopy", "--connections=4", &uri, back.to_str().unwrap()]);
    assert!(same_files(&src, &back), "nbdcopy round trip differs");

    // qemu-img: another pattern over the whole volume, compared by qemu-img itself.
    let src2 = s.path("src2.bin");
    random_file(&src2, 256);
    run(&[
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src2.to_str().unwrap(),
        &uri,
    ]);
    let out = run(&[
        "qemu-img",
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        src2.to_str().unwrap(),
        &uri,
    ]);
    assert!(out.contains("identical"), "{out}");
}

#[test]
fn qemu_io_patterns_zeroes_and_trim_show_in_block_status() {
    let s = Server::start("64M", false);
    let uri = s.uri("data");
    // Fresh: one hole.
    let map = run(&["nbdinfo", "--map", &uri]);
    assert!(map.contains("hole,zero"), "{map}");
    assert!(!map.contains("data"), "{map}");
    run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 8M",
        "-c",
        "write -f -P 0xcd 8M 64k",
        "-c",
        "aio_write -P 0x11 16M 4k",
        "-c",
        "aio_write -P 0x22 20M 4k",
        "-c",
        "aio_flush",
        "-c",
        "write -z 1M 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0 1M 1M",
        "-c",
        "read -P 0xab 2M 6M",
        "-c",
        "read -P 0xcd 8M 64k",
        "-c",
        "read -P 0x11 16M 4k",
        "-c",
        "read -P 0x22 20M 4k",
        "-c",
        "flush",
        &uri,
    ]);
    let map = run(&["nbdinfo", "--map", &uri]);
    assert!(
        map.lines().next().unwrap().trim_start().starts_with("0 "),
        "{map}"
    );
    assert!(map.contains("data"), "{map}");
    // Trim the first 8 MiB: block status reports the hole.
    run(&["qemu-io", "-f", "raw", "-c", "discard 0 8M", &uri]);
    let map = run(&["nbdinfo", "--map", &uri]);
    let first = map.lines().next().unwrap();
    assert!(
        first.split_whitespace().collect::<Vec<_>>()[..2] == ["0", "8388608"]
            && first.contains("hole,zero"),
        "{map}"
    );
    run(&["qemu-io", "-f", "raw", "-c", "read -P 0 0 8M", &uri]);
}

/// WRITE_ZEROES with NO_HOLE keeps the range's blocks allocated; without it (the client lets
/// the server unmap) they are freed. (Block status cannot tell: ext4 reports zeroed blocks as
/// a hole; the file's allocation can.)
#[test]
fn write_zeroes_keeps_the_blocks_with_no_hole_and_frees_them_without() {
    use std::os::unix::fs::MetadataExt;
    let s = Server::start("16M", false);
    let uri = s.uri("data");
    let img = s.path("data.img");
    let allocated = || std::fs::metadata(&img).unwrap().blocks() * 512;
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 8M", &uri]);
    let full = allocated();
    assert!(full >= 8 << 20, "{full} bytes allocated");
    // qemu-io's `write -z` asks for NO_HOLE; `-u` lets the server unmap.
    let out = run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -z 1M 1M",
        "-c",
        "read -P 0 1M 1M",
        &uri,
    ]);
    assert!(!out.contains("verification failed"), "{out}");
    assert_eq!(allocated(), full, "zeroes with NO_HOLE freed blocks");
    let out = run(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -z -u 3M 1M",
        "-c",
        "read -P 0 3M 1M",
        &uri,
    ]);
    assert!(!out.contains("verification failed"), "{out}");
    assert_eq!(
        allocated(),
        full - (1 << 20),
        "zeroes that may unmap kept the blocks"
    );
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let s = Server::start("64M", false);
    let mut r = Raw::connected(&s.socket(), "small");
    let size = 1u64 << 20;
    // Out of range: reads EINVAL, writes ENOSPC; an overflowing offset too.
    r.send(Cmd::Read, 0, 1, size - 100, 200);
    assert_eq!(r.reply(200).0, proto::EINVAL);
    assert_eq!(r.write(2, size - 1, &[1, 2], 0), proto::ENOSPC);
    r.send(Cmd::Read, 0, 3, u64::MAX - 10, 100);
    assert_eq!(r.reply(100).0, proto::EINVAL);
    // Too long a read, an unknown command, unknown flags, block status without a context.
    r.send(Cmd::Read, 0, 4, 0, 64 << 20);
    assert_eq!(r.reply(0).0, proto::EINVAL);
    r.send(Cmd::Other(99), 0, 5, 0, 0);
    assert_eq!(r.reply(0).0, proto::EINVAL);
    r.send(Cmd::Read, 1 << 12, 6, 0, 512);
    assert_eq!(r.reply(512).0, proto::EINVAL);
    r.send(Cmd::BlockStatus, 0, 7, 0, 4096);
    assert_eq!(r.reply(0).0, proto::EINVAL);
    // Still serving: a write and its read-back.
    assert_eq!(r.write(8, 4096, &[0x5a; 512], proto::CMD_FLAG_FUA), 0);
    r.send(Cmd::Read, 0, 9, 4096, 512);
    let (e, c, d) = r.reply(512);
    assert_eq!((e, c), (0, 9));
    assert_eq!(d, vec![0x5a; 512]);
    r.send(Cmd::Disc, 0, 10, 0, 0);
    assert!(r.closed());
    // A write over the maximum request (32 MiB): its data cannot be skipped, so it is refused
    // (EOVERFLOW) and the connection ends; the server goes on.
    let mut r = Raw::connected(&s.socket(), "data");
    r.send(Cmd::Write, 0, 11, 0, (32 << 20) + 4096);
    let (e, c, _) = r.reply(0);
    assert_eq!((e, c), (proto::EOVERFLOW, 11));
    assert!(r.closed());
    let mut r = Raw::connected(&s.socket(), "data");
    assert_eq!(r.write(12, 0, &[0x5b; 512], 0), 0);
}

#[test]
fn flags_a_command_gives_no_meaning_and_contexts_of_another_export_are_refused() {
    let s = Server::start("64M", false);
    // NO_HOLE or FAST_ZERO but on WRITE_ZEROES, DF but on READ, REQ_ONE but on BLOCK_STATUS:
    // EINVAL, and the connection goes on (a write's data is read past).
    let mut r = Raw::connected(&s.socket(), "data");
    assert_eq!(
        r.write(1, 0, &[0x21; 512], proto::CMD_FLAG_FAST_ZERO),
        proto::EINVAL
    );
    assert_eq!(
        r.write(2, 0, &[0x22; 512], proto::CMD_FLAG_DF),
        proto::EINVAL
    );
    for (cookie, command, flag) in [
        (3, Cmd::Read, proto::CMD_FLAG_NO_HOLE),
        (4, Cmd::Trim, proto::CMD_FLAG_REQ_ONE),
        (5, Cmd::Flush, proto::CMD_FLAG_FAST_ZERO),
    ] {
        r.send(command, flag, cookie, 0, 512);
        assert_eq!(r.reply(0), (proto::EINVAL, cookie, vec![]), "{command:?}");
    }
    assert_eq!(r.write(6, 0, &[0x23; 512], proto::CMD_FLAG_FUA), 0);
    // base:allocation selected for `small`, then GO to `data`: no context there (BLOCK_STATUS
    // is EINVAL); selected for `data` itself, it answers.
    for (meta_for, kind) in [
        ("small", proto::REPLY_TYPE_ERROR),
        ("data", proto::REPLY_TYPE_BLOCK_STATUS),
    ] {
        let mut r = Raw::hello(&s.socket());
        r.option(proto::OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.option_reply().0, proto::REP_ACK);
        r.option(proto::OPT_SET_META_CONTEXT, &common::meta_data(meta_for));
        assert_eq!(r.option_reply().0, proto::REP_META_CONTEXT);
        assert_eq!(r.option_reply().0, proto::REP_ACK);
        assert_eq!(r.go("data"), proto::REP_ACK);
        r.send(Cmd::BlockStatus, 0, 7, 0, 4096);
        let (got, cookie, _) = r.chunk();
        assert_eq!((got, cookie), (kind, 7), "contexts set for {meta_for}");
    }
}

#[test]
fn many_requests_in_flight_on_one_connection_all_get_their_replies() {
    let s = Server::start("64M", false);
    let mut r = Raw::connected(&s.socket(), "data");
    let n = 48u64;
    // Writes first, all sent before any reply is read.
    for i in 0..n {
        r.send(Cmd::Write, 0, i, i * 65536, 65536);
        r.s.write_all(&vec![i as u8; 65536]).unwrap();
    }
    let mut seen: Vec<u64> = (0..n)
        .map(|_| r.reply(0))
        .map(|(e, c, _)| {
            assert_eq!(e, 0);
            c
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    for i in 0..n {
        r.send(Cmd::Read, 0, 1000 + i, i * 65536, 65536);
    }
    for _ in 0..n {
        let (e, c, d) = r.reply(65536);
        assert_eq!(e, 0);
        let i = c - 1000;
        assert!(d.iter().all(|b| *b == i as u8), "read {i}");
    }
}

#[test]
fn malformed_handshakes_close_the_connection_and_the_server_goes_on() {
    let s = Server::start("64M", false);
    // Flags without fixed newstyle.
    let mut c = UnixStream::connect(s.socket()).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&0u32.to_be_bytes()).unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    // A bad option magic.
    let mut r = Raw::hello(&s.socket());
    r.s.write_all(&[0xee; 16]).unwrap();
    assert!(r.closed());
    // An unknown export: GO says so and the connection stays; EXPORT_NAME closes it.
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.go("nope"), proto::REP_ERR_UNKNOWN);
    assert_eq!(r.go("small"), proto::REP_ACK);
    let mut r = Raw::hello(&s.socket());
    r.option(proto::OPT_EXPORT_NAME, b"nope");
    assert!(r.closed());
    // Unknown options and malformed INFO data are errors, not the end.
    let mut r = Raw::hello(&s.socket());
    r.option(77, &[]);
    assert_eq!(r.option_reply().0, proto::REP_ERR_UNSUP);
    r.option(proto::OPT_INFO, &[0, 0, 0, 9, b'x']);
    assert_eq!(r.option_reply().0, proto::REP_ERR_INVALID);
    r.option(proto::OPT_SET_META_CONTEXT, &[0; 8]);
    assert_eq!(
        r.option_reply().0,
        proto::REP_ERR_INVALID,
        "needs structured"
    );
    r.option(proto::OPT_ABORT, &[]);
    assert_eq!(r.option_reply().0, proto::REP_ACK);
    assert!(r.closed());
    // A bad request magic in transmission closes that connection only.
    let mut r = Raw::connected(&s.socket(), "small");
    r.s.write_all(&[0x11; proto::REQUEST_LEN]).unwrap();
    assert!(r.closed());
    assert_eq!(
        run(&["nbdinfo", "--size", &s.uri("small")]).trim(),
        "1048576"
    );
}

#[test]
fn a_client_gone_mid_request_loses_nothing_acknowledged() {
    let s = Server::start("64M", false);
    let mut r = Raw::connected(&s.socket(), "data");
    assert_eq!(r.write(1, 0, &[0x77; 4096], proto::CMD_FLAG_FUA), 0);
    // A write whose data never fully arrives, then the client is gone.
    r.send(Cmd::Write, 0, 2, 4096, 65536);
    r.s.write_all(&[0x88; 1000]).unwrap();
    drop(r);
    let mut r = Raw::connected(&s.socket(), "data");
    r.send(Cmd::Read, 0, 3, 0, 4096);
    assert_eq!(r.reply(4096).2, vec![0x77; 4096]);
    // And the file holds it (acknowledged with FUA).
    let mut f = std::fs::File::open(s.path("data.img")).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, vec![0x77; 4096]);
}

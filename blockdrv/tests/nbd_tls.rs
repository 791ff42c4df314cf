//! The NBD server with TLS (`--tls-cert`, `--tls-key`, `--tls-ca`) against real clients:
//! libnbd's `nbdinfo` and `nbdcopy` (GnuTLS), QEMU's `qemu-io` and `qemu-img` (GnuTLS through
//! `tls-creds-x509`), and a raw client of this file (rustls) that walks the option haggling
//! before and after `NBD_OPT_STARTTLS` byte by byte. Certificates are made per test with rcgen:
//! a CA, the server's certificate (localhost, 127.0.0.1), a client certificate from the same
//! CA and one from another CA, laid out as libnbd and QEMU expect (`ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem` in a directory).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockdrv::nbd::proto::{self, Command as Cmd};
use common::Raw;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

mod common;

/// A certificate authority of a test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p);
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf certificate and its key, both PEM: for a server (with these names) or a client.
    fn issue(
        &self,
        cn: &str,
        names: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        // What QEMU's sanity checks want of a leaf: both usages, and the purpose.
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![purpose];
        validity(&mut p);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

fn validity(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(2000, 1, 1);
    p.not_after = rcgen::date_time_ymd(2100, 1, 1);
}

/// The certificates of a test, as files: the server's, and client directories in libnbd's and
/// QEMU's layout.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: Ca::new("vpcd test CA"),
        };
        let (cert, key) = pki.ca.issue(
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        pki.write("server/ca-cert.pem", &pki.ca.pem());
        pki.write("server/server-cert.pem", &cert);
        pki.write("server/server-key.pem", &key);
        // A client with a certificate of the server's CA.
        let (cert, key) = pki
            .ca
            .issue("client", &[], ExtendedKeyUsagePurpose::ClientAuth);
        pki.write("client/ca-cert.pem", &pki.ca.pem());
        pki.write("client/client-cert.pem", &cert);
        pki.write("client/client-key.pem", &key);
        // A client that trusts the server but has no certificate.
        pki.write("anonymous/ca-cert.pem", &pki.ca.pem());
        // A client whose certificate another CA signed.
        let other = Ca::new("another CA");
        let (cert, key) = other.issue("stranger", &[], ExtendedKeyUsagePurpose::ClientAuth);
        pki.write("stranger/ca-cert.pem", &pki.ca.pem());
        pki.write("stranger/client-cert.pem", &cert);
        pki.write("stranger/client-key.pem", &key);
        pki
    }

    fn write(&self, name: &str, data: &str) {
        let p = self.path(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client's certificate directory (`client`, `anonymous`, `stranger`).
    fn client(&self, who: &str) -> String {
        self.path(who).display().to_string()
    }

    /// rustls client configuration trusting the CA, with the `client` certificate or none.
    fn rustls_client(&self, with_certificate: bool) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("client/ca-cert.pem")).unwrap())
            .unwrap();
        let b = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = if with_certificate {
            let cert = CertificateDer::from_pem_file(self.path("client/client-cert.pem")).unwrap();
            let key = PrivateKeyDer::from_pem_file(self.path("client/client-key.pem")).unwrap();
            b.with_client_auth_cert(vec![cert], key).unwrap()
        } else {
            b.with_no_client_auth()
        };
        Arc::new(config)
    }
}

/// A `blockdrv nbd` process with exports `data` (64 MiB) and `small` (1 MiB), on a unix socket
/// and TCP, with TLS from `pki` (and client certificates required if `ca`), or without TLS.
struct Server {
    dir: tempfile::TempDir,
    child: Child,
    tcp: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    Off,
    /// Server certificate only.
    On,
    /// And client certificates from the CA.
    ClientCertificates,
}

impl Server {
    fn start(pki: &Pki, tls: Tls) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let tcp = {
            // A free port: bind, note it, let go.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockdrv"));
        cmd.arg("nbd")
            .arg("--unix")
            .arg(&sock)
            .arg("--tcp")
            .arg(&tcp)
            .arg("--export")
            .arg(format!(
                "data={}:64M",
                dir.path().join("data.img").display()
            ))
            .arg("--export")
            .arg(format!(
                "small={}:1M",
                dir.path().join("small.img").display()
            ))
            .args(["--log", "debug"])
            .stderr(log);
        if tls != Tls::Off {
            cmd.arg("--tls-cert")
                .arg(pki.path("server/server-cert.pem"))
                .arg("--tls-key")
                .arg(pki.path("server/server-key.pem"));
        }
        if tls == Tls::ClientCertificates {
            cmd.arg("--tls-ca").arg(pki.path("server/ca-cert.pem"));
        }
        let child = cmd.spawn().expect("blockdrv binary");
        let mut s = Server { dir, child, tcp };
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(s.socket()).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("blockdrv exited ({status}):\n{}", s.log());
            }
            assert!(Instant::now() < deadline, "blockdrv did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    /// A libnbd URI of `export` over the unix socket; with TLS and the certificates of
    /// `certs` (a [`Pki::client`] directory) if given.
    fn uri(&self, export: &str, certs: Option<&str>) -> String {
        let sock = self.socket().display().to_string();
        match certs {
            None => format!("nbd+unix:///{export}?socket={sock}"),
            Some(dir) => format!("nbds+unix:///{export}?socket={sock}&tls-certificates={dir}"),
        }
    }

    /// The same over TCP, by name (libnbd checks the name against the certificate).
    fn tcp_uri(&self, export: &str, certs: &str) -> String {
        let port = self.tcp.rsplit_once(':').unwrap().1;
        format!("nbds://localhost:{port}/{export}?tls-certificates={certs}")
    }

    /// QEMU's `--object` and image options for `export` over TLS with the certificates of
    /// `certs`. QEMU wants a name to check the server's certificate against, which a unix
    /// socket does not give: `tls-hostname`.
    fn qemu(&self, export: &str, certs: &str) -> [String; 2] {
        [
            format!("tls-creds-x509,id=tls0,dir={certs},endpoint=client"),
            format!(
                "driver=nbd,server.type=unix,server.path={},export={export},\
                 tls-creds=tls0,tls-hostname=localhost",
                self.socket().display()
            ),
        ]
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
    }

    /// Panics (with the server's log) unless the server process still runs.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("blockdrv exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn output(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/install-deps.sh installs it)"))
}

fn run(s: &Server, cmd: &[&str]) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd`, which must fail; its stderr.
fn fails(cmd: &[&str]) -> String {
    let out = output(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded:\n{}{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
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

/// The first `len` bytes of a file.
fn head(path: &Path, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b
}

#[test]
fn nbdinfo_lists_the_exports_over_tls_on_unix_and_tcp() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::On);
    // No client certificate needed without --tls-ca.
    let certs = pki.client("anonymous");
    let out = run(&s, &["nbdinfo", "--list", &s.uri("", Some(&certs))]);
    assert!(out.contains("with TLS"), "{out}");
    for want in [
        "export=\"data\"",
        "export=\"small\"",
        "export-size: 67108864",
        "base:allocation",
        "can_multi_conn: true",
    ] {
        assert!(out.contains(want), "{want} missing in:\n{out}");
    }
    // TCP by name: libnbd checks "localhost" against the certificate.
    let size = run(&s, &["nbdinfo", "--size", &s.tcp_uri("small", &certs)]);
    assert_eq!(size.trim(), "1048576");
    // A client certificate is fine too, though not asked for.
    let size = run(
        &s,
        &[
            "nbdinfo",
            "--size",
            &s.uri("small", Some(&pki.client("client"))),
        ],
    );
    assert_eq!(size.trim(), "1048576");
    s.assert_running();
}

#[test]
fn qemu_and_nbdcopy_write_and_read_back_over_tls_with_client_certificates() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::ClientCertificates);
    let certs = pki.client("client");
    let [object, image] = s.qemu("data", &certs);
    run(
        &s,
        &[
            "qemu-io",
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0xa5 0 4M",
            "-c",
            "write -f -P 0x5a 4M 64k",
            "-c",
            "aio_write -P 0x11 8M 4k",
            "-c",
            "aio_write -P 0x22 12M 4k",
            "-c",
            "aio_flush",
            "-c",
            "write -z 1M 1M",
            "-c",
            "read -P 0xa5 0 1M",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0xa5 2M 2M",
            "-c",
            "read -P 0x5a 4M 64k",
            "-c",
            "read -P 0x11 8M 4k",
            "-c",
            "read -P 0x22 12M 4k",
            "-c",
            "flush",
        ],
    );
    // The server has it in its file.
    assert_eq!(head(&s.path("data.img"), 1 << 20), vec![0xa5; 1 << 20]);

    // Random data through qemu-img, both ways, then through nbdcopy (4 connections).
    let src = s.path("src.bin");
    random_file(&src, 32);
    let src_s = src.to_str().unwrap();
    run(
        &s,
        &[
            "qemu-img",
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            src_s,
            "--target-image-opts",
            &image,
        ],
    );
    let back = s.path("back.bin");
    run(
        &s,
        &[
            "qemu-img",
            "convert",
            "--object",
            &object,
            "--image-opts",
            &image,
            "-O",
            "raw",
            back.to_str().unwrap(),
        ],
    );
    let want = std::fs::read(&src).unwrap();
    assert!(
        head(&back, want.len()) == want,
        "qemu-img read back differs"
    );
    assert!(head(&s.path("data.img"), want.len()) == want);
    random_file(&src, 32);
    let uri = s.uri("data", Some(&certs));
    run(&s, &["nbdcopy", "--connections=4", src_s, &uri]);
    let back2 = s.path("back2.bin");
    run(
        &s,
        &["nbdcopy", "--connections=4", &uri, back2.to_str().unwrap()],
    );
    let want = std::fs::read(&src).unwrap();
    assert!(
        head(&back2, want.len()) == want,
        "nbdcopy read back differs"
    );
    s.assert_running();
}

#[test]
fn plain_clients_are_told_tls_is_required_and_the_server_goes_on() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::On);
    // (nbdinfo --list reports the refused LIST without the reason.)
    fails(&["nbdinfo", "--list", &s.uri("", None)]);
    let err = fails(&["nbdinfo", "--size", &s.uri("small", None)]);
    assert!(err.contains("server requires TLS"), "{err}");
    let uri = s.uri("data", None);
    let err = fails(&["qemu-io", "-f", "raw", "-c", "read 0 4k", &uri]);
    assert!(err.contains("TLS negotiation required"), "{err}");
    assert!(
        err.contains("this server requires TLS"),
        "our message: {err}"
    );
    // Still serving TLS clients.
    let size = run(
        &s,
        &[
            "nbdinfo",
            "--size",
            &s.uri("small", Some(&pki.client("anonymous"))),
        ],
    );
    assert_eq!(size.trim(), "1048576");
    s.assert_running();
}

#[test]
fn with_a_ca_clients_without_a_certificate_or_with_another_cas_are_refused() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::ClientCertificates);
    for who in ["anonymous", "stranger"] {
        let err = fails(&["nbdinfo", "--size", &s.uri("small", Some(&pki.client(who)))]);
        assert!(!err.is_empty(), "{who}");
    }
    // QEMU without a client certificate.
    let [object, image] = s.qemu("small", &pki.client("anonymous"));
    fails(&[
        "qemu-io",
        "--object",
        &object,
        "--image-opts",
        &image,
        "-c",
        "read 0 4k",
    ]);
    let log = s.log();
    assert!(log.contains("TLS handshake"), "{log}");
    // The rightful client gets in, over TCP too.
    let certs = pki.client("client");
    let size = run(&s, &["nbdinfo", "--size", &s.uri("small", Some(&certs))]);
    assert_eq!(size.trim(), "1048576");
    let size = run(&s, &["nbdinfo", "--size", &s.tcp_uri("small", &certs)]);
    assert_eq!(size.trim(), "1048576");
    s.assert_running();
}

impl Raw {
    /// After STARTTLS was acknowledged: the same connection inside TLS (localhost's
    /// certificate checked).
    fn tls(
        self,
        config: Arc<rustls::ClientConfig>,
    ) -> Raw<rustls::StreamOwned<rustls::ClientConnection, UnixStream>> {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        Raw {
            s: rustls::StreamOwned::new(conn, self.s),
        }
    }
}

#[test]
fn before_starttls_every_option_is_tls_reqd_and_negotiation_starts_over_inside_tls() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::On);
    let mut r = Raw::hello(&s.socket());
    let meta = common::meta_data("");
    for (option, data) in [
        (proto::OPT_LIST, vec![]),
        (proto::OPT_INFO, common::go_data("small")),
        (proto::OPT_GO, common::go_data("small")),
        (proto::OPT_STRUCTURED_REPLY, vec![]),
        (proto::OPT_LIST_META_CONTEXT, meta.clone()),
        (proto::OPT_SET_META_CONTEXT, meta),
        (77, vec![]),
    ] {
        assert_eq!(
            r.ask(option, &data),
            proto::REP_ERR_TLS_REQD,
            "option {option}"
        );
    }
    assert_eq!(
        r.ask(proto::OPT_STARTTLS, b"x"),
        proto::REP_ERR_INVALID,
        "STARTTLS with data"
    );
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ACK);
    let mut t = r.tls(pki.rustls_client(false));
    // Inside TLS: STARTTLS again is an error, everything else is served.
    assert_eq!(t.ask(proto::OPT_STARTTLS, &[]), proto::REP_ERR_INVALID);
    assert_eq!(t.list(), ["data", "small"]);
    assert_eq!(t.go("nope"), proto::REP_ERR_UNKNOWN);
    assert_eq!(t.go("small"), proto::REP_ACK);
    // Transmission inside TLS: a write and its read-back.
    t.send(Cmd::Write, 0, 1, 4096, 512);
    t.s.write_all(&[0x3c; 512]).unwrap();
    assert_eq!(t.reply(0), (0, 1, vec![]));
    t.send(Cmd::Read, 0, 2, 4096, 512);
    assert_eq!(t.reply(512), (0, 2, vec![0x3c; 512]));
    t.send(Cmd::Disc, 0, 3, 0, 0);
    t.s.flush().unwrap();
    assert!(t.closed());
    assert_eq!(head(&s.path("small.img"), 4608)[4096..], [0x3c; 512]);
    s.assert_running();
}

#[test]
fn export_name_before_tls_closes_and_abort_is_acked() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::On);
    let mut r = Raw::hello(&s.socket());
    r.option(proto::OPT_EXPORT_NAME, b"small");
    assert!(
        r.closed(),
        "EXPORT_NAME has no error reply: the server hangs up"
    );
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_LIST, &[]), proto::REP_ERR_TLS_REQD);
    assert_eq!(r.ask(proto::OPT_ABORT, &[]), proto::REP_ACK);
    assert!(r.closed());
    // ABORT inside TLS too.
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ACK);
    let mut t = r.tls(pki.rustls_client(false));
    assert_eq!(t.ask(proto::OPT_ABORT, &[]), proto::REP_ACK);
    assert!(t.closed());
    s.assert_running();
}

#[test]
fn a_failed_tls_handshake_ends_that_connection_only() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::ClientCertificates);
    // Not TLS at all after the ACK.
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ACK);
    r.s.write_all(&[0x42; 64]).unwrap();
    assert!(r.closed());
    // TLS without the client certificate the server asks for.
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ACK);
    let mut t = r.tls(pki.rustls_client(false));
    // (TLS 1.3: the client is done with its side of the handshake before the server refuses
    // it, so this write may or may not get through.)
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&proto::OPT_LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    let _ = t.s.write_all(&b).and_then(|_| t.s.flush());
    assert!(t.closed());
    // With it.
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ACK);
    let mut t = r.tls(pki.rustls_client(true));
    assert_eq!(t.list(), ["data", "small"]);
    s.assert_running();
}

#[test]
fn starttls_without_tls_configured_is_refused_by_policy_and_the_connection_goes_on() {
    let pki = Pki::new();
    let mut s = Server::start(&pki, Tls::Off);
    let mut r = Raw::hello(&s.socket());
    assert_eq!(r.ask(proto::OPT_STARTTLS, &[]), proto::REP_ERR_POLICY);
    assert_eq!(r.list(), ["data", "small"]);
    assert_eq!(r.go("small"), proto::REP_ACK);
    r.send(Cmd::Read, 0, 1, 0, 512);
    assert_eq!(r.reply(512), (0, 1, vec![0; 512]));
    // And a TLS client is told no.
    let err = fails(&[
        "nbdinfo",
        "--size",
        &s.uri("small", Some(&pki.client("client"))),
    ]);
    assert!(!err.is_empty());
    s.assert_running();
}

#[test]
fn a_storage_node_serves_its_volumes_over_tls_only() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    /// Kills the node however the test ends.
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
    let mut node = Kill(
        Command::new(env!("CARGO_BIN_EXE_blockdrv"))
            .args(["node", "--id", "1", "--listen", &listen])
            .arg("--dir")
            .arg(dir.path().join("node"))
            .arg("--member")
            .arg(format!("1={listen}"))
            .args(["--volume", "vol:16M", "--nbd-unix"])
            .arg(&sock)
            .arg("--tls-cert")
            .arg(pki.path("server/server-cert.pem"))
            .arg("--tls-key")
            .arg(pki.path("server/server-key.pem"))
            .arg("--tls-ca")
            .arg(pki.path("server/ca-cert.pem"))
            .stderr(log)
            .spawn()
            .expect("blockdrv binary"),
    );
    let node_log = || std::fs::read_to_string(dir.path().join("node.log")).unwrap_or_default();
    let sock_s = sock.display().to_string();
    let certs = pki.client("client");
    let tls_uri = format!("nbds+unix:///vol?socket={sock_s}&tls-certificates={certs}");
    // Until the volume's group has a leader and the export is there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = node.0.try_wait() {
            panic!("blockdrv node exited ({status}):\n{}", node_log());
        }
        let out = output(&["nbdinfo", "--size", &tls_uri]);
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16777216");
            break;
        }
        assert!(Instant::now() < deadline, "no export:\n{}", node_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let image = format!(
        "driver=nbd,server.type=unix,server.path={sock_s},export=vol,\
         tls-creds=tls0,tls-hostname=localhost"
    );
    let object = format!("tls-creds-x509,id=tls0,dir={certs},endpoint=client");
    let out = output(&[
        "qemu-io",
        "--object",
        &object,
        "--image-opts",
        &image,
        "-c",
        "write -P 0x6b 64k 256k",
        "-c",
        "read -P 0x6b 64k 256k",
        "-c",
        "read -P 0 0 64k",
    ]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node_log()
    );
    let plain = format!("nbd+unix:///vol?socket={sock_s}");
    let err = fails(&["nbdinfo", "--size", &plain]);
    assert!(err.contains("server requires TLS"), "{err}");
    let anonymous = format!(
        "nbds+unix:///vol?socket={sock_s}&tls-certificates={}",
        pki.client("anonymous")
    );
    fails(&["nbdinfo", "--size", &anonymous]);
    assert!(node.0.try_wait().unwrap().is_none(), "{}", node_log());
}

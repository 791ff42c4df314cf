//! TLS for the NBD server: X.509 certificates from PEM files, turned into the rustls
//! configuration the server upgrades a connection with after `NBD_OPT_STARTTLS`. The protocol
//! side (which options are refused before TLS, when to upgrade) is in `proto.rs`; the upgrade
//! itself in `server.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Where the server's TLS credentials are: its certificate (chain) and key, and optionally a CA
/// whose certificates clients must present (without one, clients are not asked for any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM: the server's certificate, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: the CA certificates a client certificate must chain to.
    pub ca: Option<PathBuf>,
}

/// What was wrong with the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("read {}: {reason}", path.display())]
    Read {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("parse {}: {what}", path.display())]
    Parse { path: PathBuf, what: String },
    #[error("no certificate in {}", .0.display())]
    NoCertificate(PathBuf),
    #[error("CA certificate in {}: {reason}", path.display())]
    Ca {
        path: PathBuf,
        reason: rustls::Error,
    },
    #[error("client verifier from {}: {reason}", path.display())]
    Verifier {
        path: PathBuf,
        reason: rustls::server::VerifierBuilderError,
    },
    #[error("certificate {} with key {}: {reason}", cert.display(), key.display())]
    Config {
        cert: PathBuf,
        key: PathBuf,
        reason: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|reason| TlsError::Read {
        path: path.to_owned(),
        reason,
    })
}

fn parse_error(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Parse {
        path: path.to_owned(),
        what: e.to_string(),
    }
}

/// Every certificate of a PEM file (at least one).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| parse_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Reads the files and builds the server side of TLS (1.2 and 1.3, aws-lc-rs); with
    /// a CA, a client without a certificate signed by it fails the TLS handshake.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| parse_error(&self.key, e))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions");
        let builder = match &self.ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c).map_err(|reason| TlsError::Ca {
                        path: ca.clone(),
                        reason,
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|reason| TlsError::Verifier {
                        path: ca.clone(),
                        reason,
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|reason| TlsError::Config {
                cert: self.cert.clone(),
                key: self.key.clone(),
                reason,
            })?;
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    }

    #[test]
    fn a_certificate_and_its_key_load_with_or_without_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cfg = TlsConfig {
            cert: write(dir.path(), "cert.pem", &cert.pem()),
            key: write(dir.path(), "key.pem", &key.serialize_pem()),
            ca: None,
        };
        cfg.load().unwrap();
        TlsConfig {
            ca: Some(cfg.cert.clone()),
            ..cfg.clone()
        }
        .load()
        .unwrap();
    }

    #[test]
    fn missing_or_wrong_files_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = TlsConfig {
            cert: write(dir.path(), "cert.pem", &cert.pem()),
            key: write(dir.path(), "key.pem", &key.serialize_pem()),
            ca: None,
        };
        let missing = TlsConfig {
            cert: dir.path().join("nope.pem"),
            ..good.clone()
        };
        let e = missing.load().unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        // A key in place of the certificate: no certificate in it.
        let swapped = TlsConfig {
            cert: good.key.clone(),
            ..good.clone()
        };
        assert!(matches!(
            swapped.load().unwrap_err(),
            TlsError::NoCertificate(_)
        ));
        // A key that does not belong to the certificate.
        let mismatched = TlsConfig {
            key: write(dir.path(), "other.pem", &other.serialize_pem()),
            ..good.clone()
        };
        let e = mismatched.load().unwrap_err().to_string();
        assert!(e.contains("other.pem"), "{e}");
        let no_ca = TlsConfig {
            ca: Some(good.key.clone()),
            ..good
        };
        assert!(matches!(
            no_ca.load().unwrap_err(),
            TlsError::NoCertificate(_)
        ));
    }
}

//! The serving certificate: loaded from PEM files, re-read when they change (cert-manager and
//! kubelet replace a mounted Secret's files in place), served through a rustls cert resolver.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The ring crypto provider: builds with a C compiler alone (aws-lc-rs needs cmake).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a certificate chain and its key, checking that they belong together.
fn load(cert: &Path, key: &Path) -> anyhow::Result<(CertifiedKey, Vec<u8>)> {
    let cert_pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no certificate in the file", cert.display());
    }
    let der = PrivateKeyDer::from_pem_slice(&key_pem)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    let ck = CertifiedKey::from_der(chain, der, &provider())
        .with_context(|| format!("{} and {} do not match", cert.display(), key.display()))?;
    let mut fingerprint = cert_pem;
    fingerprint.extend_from_slice(&key_pem);
    Ok((ck, fingerprint))
}

/// The current certificate, swapped when the files change.
#[derive(Debug)]
pub struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Vec<u8>)>,
}

impl Certificate {
    /// Loads the files; an error here stops the start.
    pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<Self>> {
        let (ck, fp) = load(cert, key)?;
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((Arc::new(ck), fp)),
        }))
    }

    /// Re-reads the files: `Ok(true)` when a different certificate was loaded, `Ok(false)` when
    /// the files are unchanged; on an error the current certificate stays in use.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let (ck, fp) = load(&self.cert, &self.key)?;
        let mut cur = self.current.write();
        if cur.1 == fp {
            return Ok(false);
        }
        *cur = (Arc::new(ck), fp);
        Ok(true)
    }

    /// A rustls server config serving this certificate over HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().0.clone())
    }
}

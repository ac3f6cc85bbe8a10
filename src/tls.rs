//! TLS for the exchange listener (rustls): client certificates are mandatory and verified
//! against the exchange CA and its CRL. The CRL is re-read when the file changes (and on
//! SIGHUP) without a restart; rejected handshakes are logged with the certificate's subject.
//! Session resumption is off, so every new connection presents a certificate checked against
//! the current CRL; kept-alive connections are re-checked per request (`is_revoked`).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::certs::CertInfo;
use crate::error::{Error, Result};
use crate::ids::Fingerprint;
use crate::metrics::Metrics;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider (needed by clients such as reqwest).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            Error::config(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::config(format!("bad certificate in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        Error::config(format!(
            "cannot read private key from {}: {e}",
            path.display()
        ))
    })
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| Error::config(format!("cannot read CRL {}: {e}", path.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::config(format!("bad CRL in {}: {e}", path.display())))
}

/// Serial numbers (uppercase hex, as in `CertInfo::serial`) listed in a CRL file.
fn revoked_serials(path: &Path) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    if !path.exists() {
        return Ok(out);
    }
    let pem = std::fs::read(path)
        .map_err(|e| Error::config(format!("cannot read CRL {}: {e}", path.display())))?;
    let crl = openssl::x509::X509Crl::from_pem(&pem)
        .map_err(|e| Error::config(format!("{} is not a CRL: {e}", path.display())))?;
    if let Some(stack) = crl.get_revoked() {
        for r in stack {
            out.insert(r.serial_number().to_bn()?.to_hex_str()?.to_string());
        }
    }
    Ok(out)
}

fn root_store(ca_path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca_path)? {
        roots
            .add(cert)
            .map_err(|e| Error::config(format!("bad CA certificate {}: {e}", ca_path.display())))?;
    }
    Ok(roots)
}

/// The exchange's trust anchors and revocation list, swappable at run time.
pub struct ClientTrust {
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    crl_path: PathBuf,
    verifier: RwLock<Arc<dyn ClientCertVerifier>>,
    revoked: RwLock<HashSet<String>>,
    crl_mtime: Mutex<Option<SystemTime>>,
    metrics: Metrics,
}

impl fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTrust")
            .field("crl_path", &self.crl_path)
            .finish()
    }
}

impl ClientTrust {
    pub fn load(ca_path: &Path, crl_path: &Path, metrics: Metrics) -> Result<Arc<ClientTrust>> {
        let roots = Arc::new(root_store(ca_path)?);
        let hints = roots.subjects();
        let trust = ClientTrust {
            verifier: RwLock::new(build_verifier(&roots, read_crls(crl_path)?)?),
            revoked: RwLock::new(revoked_serials(crl_path)?),
            crl_mtime: Mutex::new(mtime(crl_path)),
            roots,
            hints,
            crl_path: crl_path.to_path_buf(),
            metrics,
        };
        Ok(Arc::new(trust))
    }

    /// Re-reads the CRL if the file changed (or always, with `force`). Returns whether it did.
    /// A broken CRL file keeps the previous list in force and is reported.
    pub fn reload(&self, force: bool) -> Result<bool> {
        let now = mtime(&self.crl_path);
        {
            let mut last = self
                .crl_mtime
                .lock()
                .map_err(|_| Error::internal("CRL lock poisoned"))?;
            if !force && *last == now {
                return Ok(false);
            }
            *last = now;
        }
        let verifier = build_verifier(&self.roots, read_crls(&self.crl_path)?)?;
        let revoked = revoked_serials(&self.crl_path)?;
        let count = revoked.len();
        if let Ok(mut v) = self.verifier.write() {
            *v = verifier;
        }
        if let Ok(mut r) = self.revoked.write() {
            *r = revoked;
        }
        tracing::info!(crl = %self.crl_path.display(), revoked = count, "certificate revocation list loaded");
        Ok(true)
    }

    pub fn is_revoked(&self, serial_hex: &str) -> bool {
        self.revoked
            .read()
            .map(|r| r.contains(serial_hex))
            .unwrap_or(true)
    }

    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.verifier
            .read()
            .map(|v| Arc::clone(&v))
            .map_err(|_| rustls::Error::General("verifier lock poisoned".into()))
    }

    /// The rustls server configuration for the exchange listener.
    pub fn server_config(
        self: &Arc<Self>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<ServerConfig> {
        let certs = read_certs(cert_path)?;
        let key = read_key(key_path)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
            .with_client_cert_verifier(Arc::new(Verifier(Arc::clone(self))))
            .with_single_cert(certs, key)
            .map_err(|e| {
                Error::config(format!(
                    "server certificate {} unusable: {e}",
                    cert_path.display()
                ))
            })?;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn build_verifier(
    roots: &Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider())
        .with_crls(crls)
        .build()
        .map_err(|e| Error::config(format!("cannot build the client certificate verifier: {e}")))
}

/// Delegates to the current webpki verifier and logs what it refuses.
#[derive(Debug)]
struct Verifier(Arc<ClientTrust>);

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hints
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self
            .0
            .current()?
            .verify_client_cert(end_entity, intermediates, now);
        if let Err(e) = &result {
            let reason = match e {
                rustls::Error::InvalidCertificate(c) => format!("{c:?}"),
                other => format!("{other:?}"),
            };
            let reason_label = reason
                .split(['(', ' ', '{'])
                .next()
                .unwrap_or("Other")
                .to_string();
            let (subject, fingerprint) = match CertInfo::from_der(end_entity.as_ref()) {
                Ok(info) => (info.subject, info.fingerprint.to_string()),
                Err(_) => (
                    "(unparseable certificate)".into(),
                    Fingerprint::of_der(end_entity.as_ref()).to_string(),
                ),
            };
            tracing::warn!(%subject, %fingerprint, reason = %reason, "client certificate refused in the TLS handshake");
            self.0.metrics.handshake_rejected(&reason_label);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .current()
            .map(|v| v.supported_verify_schemes())
            .unwrap_or_default()
    }
}

/// What the handshake proved about the client, attached to its connection.
#[derive(Debug, Clone)]
pub struct PeerCert {
    pub fingerprint: Fingerprint,
    pub subject: String,
    pub serial: String,
}

impl PeerCert {
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        CertInfo::from_der(der).ok().map(|i| PeerCert {
            fingerprint: i.fingerprint,
            subject: i.subject,
            serial: i.serial,
        })
    }
}

/// rustls client configuration for mutual TLS calls (the broker to members; tests to the broker):
/// trusts only `ca_path`, presents `cert_path`/`key_path`.
pub fn client_config(
    ca_path: &Path,
    cert_path: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig> {
    let roots = root_store(ca_path)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    match cert_path {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
            .map_err(|e| {
                Error::config(format!(
                    "client certificate {} unusable: {e}",
                    cert.display()
                ))
            }),
        None => Ok(builder.with_no_client_auth()),
    }
}

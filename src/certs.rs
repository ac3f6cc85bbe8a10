//! The exchange's certificate authority (openssl): the dev CA made by `hie certs init`, member
//! certificates, revocation and the CRL. Keys are written 0600.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkcs12::Pkcs12;
use openssl::pkey::{PKey, Private};
use openssl::stack::Stack;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, CrlNumber, ExtendedKeyUsage, KeyUsage,
    SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{
    X509Builder, X509Crl, X509CrlBuilder, X509Name, X509NameBuilder, X509Revoked,
    X509RevokedBuilder, X509,
};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ids::{Fingerprint, OrgId};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const CLIENT_CERT: &str = "client.crt";
pub const CLIENT_KEY: &str = "client.key";
pub const CRL: &str = "crl.pem";

/// What the broker needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub fingerprint: Fingerprint,
    pub subject: String,
    pub issuer: String,
    /// Serial number, uppercase hex.
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CertInfo {
    pub fn from_x509(cert: &X509) -> Result<CertInfo> {
        let der = cert.to_der()?;
        Ok(CertInfo {
            fingerprint: Fingerprint::of_der(&der),
            subject: name_to_string(cert.subject_name()),
            issuer: name_to_string(cert.issuer_name()),
            serial: cert.serial_number().to_bn()?.to_hex_str()?.to_string(),
            not_before: asn1_to_micros(cert.not_before())?,
            not_after: asn1_to_micros(cert.not_after())?,
        })
    }

    pub fn from_der(der: &[u8]) -> Result<CertInfo> {
        let cert = X509::from_der(der)
            .map_err(|e| Error::invalid(format!("not a DER certificate: {e}")))?;
        Self::from_x509(&cert)
    }
}

fn name_to_string(name: &openssl::x509::X509NameRef) -> String {
    name.entries()
        .map(|e| {
            let key = e.object().nid().short_name().unwrap_or("?");
            let value = e.data().to_string().unwrap_or_default();
            format!("{key}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn asn1_to_micros(t: &openssl::asn1::Asn1TimeRef) -> Result<i64> {
    let epoch = Asn1Time::from_unix(0)?;
    let diff = epoch.diff(t)?;
    Ok((diff.days as i64 * 86_400 + diff.secs as i64) * 1_000_000)
}

/// Reads one PEM certificate.
pub fn read_cert(path: &Path) -> Result<X509> {
    let pem = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("cannot read certificate {}: {e}", path.display())))?;
    X509::from_pem(&pem)
        .map_err(|_| Error::invalid(format!("{} is not a PEM certificate", path.display())))
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl Validity {
    /// From one hour ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = chrono::Utc::now().timestamp();
        Validity {
            not_before_unix: now - 3600,
            not_after_unix: now + i64::from(days) * 86_400,
        }
    }
}

/// A freshly issued certificate and its private key.
pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// The exchange CA: its certificate, key and directory.
pub struct Authority {
    pub dir: PathBuf,
    pub cert: X509,
    key: PKey<Private>,
}

/// What `certs init` made.
#[derive(Debug)]
pub struct InitReport {
    pub created: bool,
    pub dir: PathBuf,
}

fn new_key() -> Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn random_serial() -> Result<Asn1Integer> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(bn.to_asn1_integer()?)
}

fn name(common_name: &str, org: &str) -> Result<X509Name> {
    let mut b = X509NameBuilder::new()?;
    b.append_entry_by_nid(Nid::ORGANIZATIONNAME, org)?;
    b.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(b.build())
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::config(format!("cannot write {}: {e}", path.display())))
}

fn mkdir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::config(format!("cannot create {}: {e}", dir.display())))
}

impl Authority {
    /// True when `dir` already holds a CA.
    pub fn exists(dir: &Path) -> bool {
        dir.join(CA_CERT).exists() && dir.join(CA_KEY).exists()
    }

    /// Creates the exchange CA, the broker's server and client certificates and an empty CRL.
    /// Leaves an existing CA alone unless `force`.
    pub fn init(
        dir: &Path,
        exchange_name: &str,
        hostnames: &[String],
        force: bool,
    ) -> Result<InitReport> {
        if Self::exists(dir) && !force {
            return Ok(InitReport {
                created: false,
                dir: dir.to_path_buf(),
            });
        }
        mkdir(dir)?;
        let key = new_key()?;
        let subject = name(&format!("{exchange_name} CA"), exchange_name)?;
        let mut b = X509Builder::new()?;
        b.set_version(2)?;
        b.set_serial_number(random_serial()?.as_ref())?;
        b.set_subject_name(&subject)?;
        b.set_issuer_name(&subject)?;
        b.set_pubkey(&key)?;
        let now = chrono::Utc::now().timestamp();
        b.set_not_before(Asn1Time::from_unix(now - 3600)?.as_ref())?;
        b.set_not_after(Asn1Time::from_unix(now + 3650 * 86_400)?.as_ref())?;
        b.append_extension(BasicConstraints::new().critical().ca().pathlen(0).build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
        b.append_extension(ski)?;
        b.sign(&key, MessageDigest::sha256())?;
        let cert = b.build();
        write_file(&dir.join(CA_KEY), &key.private_key_to_pem_pkcs8()?, true)?;
        write_file(&dir.join(CA_CERT), &cert.to_pem()?, false)?;
        let ca = Authority {
            dir: dir.to_path_buf(),
            cert,
            key,
        };

        let server = ca.issue(
            "hie-broker",
            exchange_name,
            Validity::days(825),
            hostnames,
            true,
            false,
        )?;
        write_file(
            &dir.join(SERVER_KEY),
            &server.key.private_key_to_pem_pkcs8()?,
            true,
        )?;
        write_file(&dir.join(SERVER_CERT), &server.cert.to_pem()?, false)?;
        let client = ca.issue(
            "hie-broker",
            exchange_name,
            Validity::days(825),
            &[],
            false,
            true,
        )?;
        write_file(
            &dir.join(CLIENT_KEY),
            &client.key.private_key_to_pem_pkcs8()?,
            true,
        )?;
        write_file(&dir.join(CLIENT_CERT), &client.cert.to_pem()?, false)?;
        ca.write_crl(Vec::new())?;
        Ok(InitReport {
            created: true,
            dir: dir.to_path_buf(),
        })
    }

    pub fn load(dir: &Path) -> Result<Authority> {
        if !Self::exists(dir) {
            return Err(Error::config(format!(
                "no exchange CA in {} (run `hie certs init --dir {}`)",
                dir.display(),
                dir.display()
            )));
        }
        let cert = read_cert(&dir.join(CA_CERT))?;
        let pem = std::fs::read(dir.join(CA_KEY)).map_err(|e| {
            Error::config(format!("cannot read {}: {e}", dir.join(CA_KEY).display()))
        })?;
        let key = PKey::private_key_from_pem(&pem).map_err(|e| {
            Error::config(format!(
                "{} is not a PEM private key: {e}",
                dir.join(CA_KEY).display()
            ))
        })?;
        Ok(Authority {
            dir: dir.to_path_buf(),
            cert,
            key,
        })
    }

    /// Issues a certificate signed by the CA. `names` become subjectAltNames (DNS or IP).
    pub fn issue(
        &self,
        common_name: &str,
        org: &str,
        validity: Validity,
        names: &[String],
        server_auth: bool,
        client_auth: bool,
    ) -> Result<Issued> {
        let key = new_key()?;
        let mut b = X509Builder::new()?;
        b.set_version(2)?;
        b.set_serial_number(random_serial()?.as_ref())?;
        b.set_subject_name(name(common_name, org)?.as_ref())?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.set_pubkey(&key)?;
        b.set_not_before(Asn1Time::from_unix(validity.not_before_unix)?.as_ref())?;
        b.set_not_after(Asn1Time::from_unix(validity.not_after_unix)?.as_ref())?;
        b.append_extension(BasicConstraints::new().critical().build()?)?;
        b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        let mut eku = ExtendedKeyUsage::new();
        if server_auth {
            eku.server_auth();
        }
        if client_auth {
            eku.client_auth();
        }
        b.append_extension(eku.build()?)?;
        if !names.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for n in names {
                if n.parse::<std::net::IpAddr>().is_ok() {
                    san.ip(n);
                } else {
                    san.dns(n);
                }
            }
            let san = san.build(&b.x509v3_context(Some(&self.cert), None))?;
            b.append_extension(san)?;
        }
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(ski)?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(aki)?;
        b.sign(&self.key, MessageDigest::sha256())?;
        Ok(Issued {
            cert: b.build(),
            key,
        })
    }

    /// Issues a member certificate (clientAuth; with `server_names` also serverAuth for the
    /// member's own FHIR endpoint) and writes `orgs/ORG/{client.crt,client.key,client.p12}`.
    pub fn issue_member(
        &self,
        org: &OrgId,
        validity: Validity,
        server_names: &[String],
        p12_password: &str,
    ) -> Result<PathBuf> {
        let issued = self.issue(
            org.as_str(),
            org.as_str(),
            validity,
            server_names,
            !server_names.is_empty(),
            true,
        )?;
        let dir = self.dir.join("orgs").join(org.as_str());
        mkdir(&dir)?;
        write_file(
            &dir.join(CLIENT_KEY),
            &issued.key.private_key_to_pem_pkcs8()?,
            true,
        )?;
        write_file(&dir.join(CLIENT_CERT), &issued.cert.to_pem()?, false)?;
        let mut chain = Stack::new()?;
        chain.push(self.cert.clone())?;
        let p12 = Pkcs12::builder()
            .name(org.as_str())
            .pkey(&issued.key)
            .cert(&issued.cert)
            .ca(chain)
            .build2(p12_password)?;
        write_file(&dir.join("client.p12"), &p12.to_der()?, true)?;
        Ok(dir)
    }

    /// True when `cert` was signed by this CA.
    pub fn issued(&self, cert: &X509) -> bool {
        let Ok(key) = self.cert.public_key() else {
            return false;
        };
        cert.verify(&key).unwrap_or(false)
    }

    /// Adds `cert` to the CRL. Revoking twice is harmless.
    pub fn revoke(&self, cert: &X509) -> Result<bool> {
        if !self.issued(cert) {
            return Err(Error::invalid(
                "that certificate was not issued by this exchange CA",
            ));
        }
        let mut entries = self.revoked_entries()?;
        let serial = cert.serial_number().to_bn()?;
        for e in &entries {
            if e.serial_number().to_bn()? == serial {
                return Ok(false);
            }
        }
        let mut r = X509RevokedBuilder::new()?;
        r.set_serial_number(cert.serial_number())?;
        r.set_revocation_date(Asn1Time::days_from_now(0)?.as_ref())?;
        entries.push(r.build());
        self.write_crl(entries)?;
        Ok(true)
    }

    fn revoked_entries(&self) -> Result<Vec<X509Revoked>> {
        let path = self.dir.join(CRL);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let pem = std::fs::read(&path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        let crl = X509Crl::from_pem(&pem)
            .map_err(|e| Error::config(format!("{} is not a CRL: {e}", path.display())))?;
        let mut out = Vec::new();
        if let Some(stack) = crl.get_revoked() {
            for r in stack {
                out.push(r.to_owned()?);
            }
        }
        Ok(out)
    }

    /// (Re)writes and signs the CRL; valid for 30 days (re-sign with `hie certs crl`).
    pub fn write_crl(&self, entries: Vec<X509Revoked>) -> Result<()> {
        let mut b = X509CrlBuilder::new()?;
        b.set_issuer_name(self.cert.subject_name())?;
        b.set_last_update(Asn1Time::days_from_now(0)?.as_ref())?;
        b.set_next_update(Asn1Time::days_from_now(30)?.as_ref())?;
        let ctx_builder = X509Builder::new()?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&ctx_builder.x509v3_context(Some(&self.cert), None))?;
        b.append_extension(aki)?;
        let number = BigNum::from_dec_str(&chrono::Utc::now().timestamp_micros().to_string())?;
        b.append_extension(CrlNumber::new(number)?.build()?)?;
        for e in entries {
            b.add_revoked(e)?;
        }
        b.sort()?;
        b.sign(&self.key, MessageDigest::sha256())?;
        let crl = b.build()?;
        write_file(&self.dir.join(CRL), &crl.to_pem()?, false)
    }

    /// Re-signs the CRL with its current entries (extends nextUpdate).
    pub fn refresh_crl(&self) -> Result<usize> {
        let entries = self.revoked_entries()?;
        let n = entries.len();
        self.write_crl(entries)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_revoke() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = Authority::init(
            dir.path(),
            "Test HIE",
            &["localhost".into(), "127.0.0.1".into()],
            false,
        )
        .expect("init");
        assert!(report.created);
        let ca = Authority::load(dir.path()).expect("load");
        let org = OrgId::parse("test-lab").expect("id");
        let out = ca
            .issue_member(&org, Validity::days(30), &["lab.local".into()], "")
            .expect("issue");
        let cert = read_cert(&out.join(CLIENT_CERT)).expect("read");
        assert!(ca.issued(&cert));
        let info = CertInfo::from_x509(&cert).expect("info");
        assert!(info.subject.contains("CN=test-lab"));
        assert_eq!(info.fingerprint.as_str().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(out.join(CLIENT_KEY))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(ca.revoke(&cert).expect("revoke"));
        assert!(!ca.revoke(&cert).expect("revoke again"));
        assert_eq!(ca.refresh_crl().expect("refresh"), 1);
    }
}

//! The member organisation registry: who may connect (by certificate fingerprint), what kind of
//! member they are, whether they are active, where their FHIR endpoint is, and which identifier
//! systems (assigning authorities) they own. Every change is audited in its own transaction.

use crate::audit::{Action, Actor, AuditRecord};
use crate::certs::CertInfo;
use crate::db::{self, DbConn};
use crate::error::{Error, Result};
use crate::ids::{Fingerprint, OrgId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrgType {
    Hospital,
    Clinic,
    Lab,
    Pharmacy,
    Emergency,
    Operator,
}

impl OrgType {
    pub const ALL: [OrgType; 6] = [
        OrgType::Hospital,
        OrgType::Clinic,
        OrgType::Lab,
        OrgType::Pharmacy,
        OrgType::Emergency,
        OrgType::Operator,
    ];

    pub fn code(self) -> &'static str {
        match self {
            OrgType::Hospital => "hospital",
            OrgType::Clinic => "clinic",
            OrgType::Lab => "lab",
            OrgType::Pharmacy => "pharmacy",
            OrgType::Emergency => "emergency",
            OrgType::Operator => "operator",
        }
    }

    pub fn parse(s: &str) -> Result<OrgType> {
        Self::ALL
            .into_iter()
            .find(|t| t.code() == s)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "'{s}' is not an organisation type; use one of {}",
                    Self::ALL.map(|t| t.code()).join(", ")
                ))
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrgStatus {
    Active,
    Suspended,
}

impl OrgStatus {
    pub fn code(self) -> &'static str {
        match self {
            OrgStatus::Active => "active",
            OrgStatus::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Result<OrgStatus> {
        match s {
            "active" => Ok(OrgStatus::Active),
            "suspended" => Ok(OrgStatus::Suspended),
            other => Err(Error::internal(format!(
                "unknown organisation status '{other}' in the database"
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgCertificate {
    pub fingerprint: Fingerprint,
    pub subject: String,
    pub serial: String,
    pub not_after: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organization {
    pub id: OrgId,
    pub name: String,
    pub org_type: OrgType,
    pub status: OrgStatus,
    pub fhir_base: Option<String>,
    pub certificates: Vec<OrgCertificate>,
    pub identifier_systems: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Organization {
    pub fn is_active(&self) -> bool {
        self.status == OrgStatus::Active
    }
}

#[derive(Debug, Clone)]
pub struct NewOrganization {
    pub id: OrgId,
    pub name: String,
    pub org_type: OrgType,
    pub fhir_base: Option<String>,
    pub identifier_systems: Vec<String>,
}

/// Search criteria for the directory; all given criteria must hold.
#[derive(Debug, Clone, Default)]
pub struct OrgQuery {
    pub id: Option<OrgId>,
    pub name_prefix: Option<String>,
    pub org_type: Option<OrgType>,
    pub active: Option<bool>,
}

fn validate(new: &NewOrganization) -> Result<()> {
    if new.name.trim().is_empty() || new.name.len() > 200 {
        return Err(Error::invalid(
            "the organisation name must be 1-200 characters",
        ));
    }
    if let Some(base) = &new.fhir_base {
        validate_fhir_base(base)?;
    }
    for system in &new.identifier_systems {
        validate_identifier_system(system)?;
    }
    Ok(())
}

pub fn validate_fhir_base(base: &str) -> Result<()> {
    let ok = base.starts_with("https://")
        && base.len() > "https://".len()
        && !base.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "FHIR base '{base}' must be an https:// URL: the broker only talks to members over mutual TLS"
        )))
    }
}

fn validate_identifier_system(system: &str) -> Result<()> {
    let ok = (system.starts_with("urn:")
        || system.starts_with("http://")
        || system.starts_with("https://"))
        && !system.contains(char::is_whitespace)
        && !system.contains('|');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "identifier system '{system}' must be a URI (urn:, http:// or https://)"
        )))
    }
}

/// Registers (or, with None, removes) a member's FHIR endpoint: where the broker fetches its
/// documents and forwards queries to. Documents already registered keep their URLs.
pub fn set_fhir_base(
    conn: &mut DbConn,
    id: &OrgId,
    base: Option<&str>,
    actor: &Actor,
) -> Result<Organization> {
    let base = base.map(|b| b.trim_end_matches('/'));
    if let Some(b) = base {
        validate_fhir_base(b)?;
    }
    db::write_tx(conn, |conn| {
        if !db::orgs::set_fhir_base(conn, id, base, crate::time::now_micros())? {
            return Err(Error::not_found(format!("no organisation '{id}'")));
        }
        let record = AuditRecord::new(actor, "admin", Action::Update, "org-endpoint")
            .entity(format!("Organization/{id}"))
            .outcome(crate::audit::Outcome::Success, base.unwrap_or("(none)"));
        db::audit::append(conn, &[record])?;
        db::orgs::get(conn, id)?.ok_or_else(|| Error::internal("organisation vanished"))
    })
}

/// Onboards a member with its first certificate.
pub fn add(
    conn: &mut DbConn,
    new: NewOrganization,
    cert: &CertInfo,
    actor: &Actor,
) -> Result<Organization> {
    validate(&new)?;
    db::write_tx(conn, |conn| {
        if db::orgs::exists(conn, &new.id)? {
            return Err(Error::conflict(format!(
                "organisation '{}' already exists",
                new.id
            )));
        }
        ensure_cert_unused(conn, cert)?;
        for system in &new.identifier_systems {
            if let Some(owner) = db::orgs::system_owner(conn, system)? {
                return Err(Error::conflict(format!(
                    "identifier system '{system}' is already owned by '{owner}'"
                )));
            }
        }
        db::orgs::insert(conn, &new, crate::time::now_micros())?;
        db::orgs::insert_cert(conn, &new.id, cert)?;
        for system in &new.identifier_systems {
            db::orgs::insert_system(conn, &new.id, system)?;
        }
        let record = AuditRecord::new(actor, "admin", Action::Create, "org-add")
            .entity(format!("Organization/{}", new.id))
            .query(format!(
                "type={} cert={}",
                new.org_type.code(),
                cert.fingerprint
            ));
        db::audit::append(conn, &[record])?;
        db::orgs::get(conn, &new.id)?
            .ok_or_else(|| Error::internal("organisation vanished after insert"))
    })
}

fn ensure_cert_unused(conn: &mut DbConn, cert: &CertInfo) -> Result<()> {
    match db::orgs::org_of_fingerprint(conn, &cert.fingerprint)? {
        Some(owner) => Err(Error::conflict(format!(
            "this certificate is already registered to '{owner}'"
        ))),
        None => Ok(()),
    }
}

/// Adds a certificate (rotation: old and new both work until the old one expires or is revoked).
pub fn add_cert(
    conn: &mut DbConn,
    id: &OrgId,
    cert: &CertInfo,
    actor: &Actor,
) -> Result<Organization> {
    db::write_tx(conn, |conn| {
        if !db::orgs::exists(conn, id)? {
            return Err(Error::not_found(format!("no organisation '{id}'")));
        }
        ensure_cert_unused(conn, cert)?;
        db::orgs::insert_cert(conn, id, cert)?;
        let record = AuditRecord::new(actor, "admin", Action::Update, "org-add-cert")
            .entity(format!("Organization/{id}"))
            .query(format!("cert={}", cert.fingerprint));
        db::audit::append(conn, &[record])?;
        db::orgs::get(conn, id)?.ok_or_else(|| Error::internal("organisation vanished"))
    })
}

/// Suspends or re-activates a member. A suspended member's certificates stop working at once.
pub fn set_status(
    conn: &mut DbConn,
    id: &OrgId,
    status: OrgStatus,
    actor: &Actor,
) -> Result<Organization> {
    db::write_tx(conn, |conn| {
        if !db::orgs::set_status(conn, id, status, crate::time::now_micros())? {
            return Err(Error::not_found(format!("no organisation '{id}'")));
        }
        let subtype = match status {
            OrgStatus::Active => "org-activate",
            OrgStatus::Suspended => "org-suspend",
        };
        let record = AuditRecord::new(actor, "admin", Action::Update, subtype)
            .entity(format!("Organization/{id}"));
        db::audit::append(conn, &[record])?;
        db::orgs::get(conn, id)?.ok_or_else(|| Error::internal("organisation vanished"))
    })
}

pub fn get(conn: &mut DbConn, id: &OrgId) -> Result<Option<Organization>> {
    db::orgs::get(conn, id)
}

pub fn search(conn: &mut DbConn, query: &OrgQuery) -> Result<Vec<Organization>> {
    db::orgs::search(conn, query)
}

/// The organisation a client certificate belongs to, if any (whatever its status).
pub fn by_fingerprint(
    conn: &mut DbConn,
    fingerprint: &Fingerprint,
) -> Result<Option<Organization>> {
    match db::orgs::org_of_fingerprint(conn, fingerprint)? {
        Some(id) => db::orgs::get(conn, &id),
        None => Ok(None),
    }
}

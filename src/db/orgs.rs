//! Queries of the member organisation registry.

use diesel::prelude::*;

use super::schema::{org_certificates, org_identifier_systems, organizations};
use super::DbConn;
use crate::certs::CertInfo;
use crate::error::Result;
use crate::ids::{Fingerprint, OrgId};
use crate::orgs::{NewOrganization, OrgCertificate, OrgQuery, OrgStatus, OrgType, Organization};

#[derive(Queryable, Insertable)]
#[diesel(table_name = organizations)]
struct OrgRow {
    id: String,
    name: String,
    org_type: String,
    status: String,
    fhir_base: Option<String>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Queryable, Insertable)]
#[diesel(table_name = org_certificates)]
struct CertRow {
    fingerprint: String,
    org_id: String,
    subject: String,
    serial: String,
    not_after: i64,
    added_at: i64,
}

pub fn exists(conn: &mut DbConn, id: &OrgId) -> Result<bool> {
    let n: i64 = organizations::table
        .filter(organizations::id.eq(id.as_str()))
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}

pub fn system_owner(conn: &mut DbConn, system: &str) -> Result<Option<String>> {
    Ok(org_identifier_systems::table
        .filter(org_identifier_systems::system.eq(system))
        .select(org_identifier_systems::org_id)
        .first(conn)
        .optional()?)
}

pub fn org_of_fingerprint(conn: &mut DbConn, fp: &Fingerprint) -> Result<Option<OrgId>> {
    let id: Option<String> = org_certificates::table
        .filter(org_certificates::fingerprint.eq(fp.as_str()))
        .select(org_certificates::org_id)
        .first(conn)
        .optional()?;
    id.map(|s| OrgId::parse(&s)).transpose()
}

pub fn insert(conn: &mut DbConn, new: &NewOrganization, now: i64) -> Result<()> {
    diesel::insert_into(organizations::table)
        .values(OrgRow {
            id: new.id.to_string(),
            name: new.name.clone(),
            org_type: new.org_type.code().into(),
            status: OrgStatus::Active.code().into(),
            fhir_base: new.fhir_base.clone(),
            created_at: now,
            updated_at: now,
        })
        .execute(conn)?;
    Ok(())
}

pub fn insert_cert(conn: &mut DbConn, id: &OrgId, cert: &CertInfo) -> Result<()> {
    diesel::insert_into(org_certificates::table)
        .values(CertRow {
            fingerprint: cert.fingerprint.to_string(),
            org_id: id.to_string(),
            subject: cert.subject.clone(),
            serial: cert.serial.clone(),
            not_after: cert.not_after,
            added_at: crate::time::now_micros(),
        })
        .execute(conn)?;
    Ok(())
}

pub fn insert_system(conn: &mut DbConn, id: &OrgId, system: &str) -> Result<()> {
    diesel::insert_into(org_identifier_systems::table)
        .values((
            org_identifier_systems::system.eq(system),
            org_identifier_systems::org_id.eq(id.as_str()),
        ))
        .execute(conn)?;
    Ok(())
}

/// Returns false when there is no such organisation.
pub fn set_status(conn: &mut DbConn, id: &OrgId, status: OrgStatus, now: i64) -> Result<bool> {
    let n = diesel::update(organizations::table.filter(organizations::id.eq(id.as_str())))
        .set((
            organizations::status.eq(status.code()),
            organizations::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(n > 0)
}

pub fn set_fhir_base(conn: &mut DbConn, id: &OrgId, base: Option<&str>, now: i64) -> Result<bool> {
    let n = diesel::update(organizations::table.filter(organizations::id.eq(id.as_str())))
        .set((
            organizations::fhir_base.eq(base),
            organizations::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(n > 0)
}

pub fn get(conn: &mut DbConn, id: &OrgId) -> Result<Option<Organization>> {
    let row: Option<OrgRow> = organizations::table
        .find(id.as_str())
        .first(conn)
        .optional()?;
    match row {
        Some(row) => Ok(Some(assemble(conn, row)?)),
        None => Ok(None),
    }
}

pub fn search(conn: &mut DbConn, q: &OrgQuery) -> Result<Vec<Organization>> {
    let mut query = organizations::table.into_boxed();
    if let Some(id) = &q.id {
        query = query.filter(organizations::id.eq(id.to_string()));
    }
    if let Some(prefix) = &q.name_prefix {
        // Case-insensitive prefix match that both backends run the same way.
        let pattern = format!("{}%", prefix.to_lowercase().replace(['%', '_'], ""));
        query = query.filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>("lower(name) LIKE ")
                .bind::<diesel::sql_types::Text, _>(pattern),
        );
    }
    if let Some(t) = q.org_type {
        query = query.filter(organizations::org_type.eq(t.code()));
    }
    if let Some(active) = q.active {
        let status = if active {
            OrgStatus::Active
        } else {
            OrgStatus::Suspended
        };
        query = query.filter(organizations::status.eq(status.code()));
    }
    let rows: Vec<OrgRow> = query.order(organizations::id.asc()).load(conn)?;
    rows.into_iter().map(|r| assemble(conn, r)).collect()
}

fn assemble(conn: &mut DbConn, row: OrgRow) -> Result<Organization> {
    let certs: Vec<CertRow> = org_certificates::table
        .filter(org_certificates::org_id.eq(&row.id))
        .order(org_certificates::added_at.asc())
        .load(conn)?;
    let systems: Vec<String> = org_identifier_systems::table
        .filter(org_identifier_systems::org_id.eq(&row.id))
        .select(org_identifier_systems::system)
        .order(org_identifier_systems::system.asc())
        .load(conn)?;
    Ok(Organization {
        id: OrgId::parse(&row.id)?,
        name: row.name,
        org_type: OrgType::parse(&row.org_type)?,
        status: OrgStatus::parse(&row.status)?,
        fhir_base: row.fhir_base,
        certificates: certs
            .into_iter()
            .map(|c| OrgCertificate {
                fingerprint: Fingerprint::from_hex(&c.fingerprint),
                subject: c.subject,
                serial: c.serial,
                not_after: c.not_after,
            })
            .collect(),
        identifier_systems: systems,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

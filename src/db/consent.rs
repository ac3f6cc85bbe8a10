//! Queries of consent directives.

use diesel::prelude::*;

use super::schema::{consents, source_records};
use super::DbConn;
use crate::error::Result;

#[derive(Debug, Clone, Queryable)]
pub struct ConsentRow {
    pub id: i64,
    pub consent_id: i64,
    pub version: i64,
    pub is_current: i64,
    pub source_id: i64,
    pub org_id: String,
    pub status: String,
    pub rule: String,
    pub hides: String,
    pub resource: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = consents)]
pub struct NewConsent {
    pub consent_id: i64,
    pub version: i64,
    pub is_current: i64,
    pub source_id: i64,
    pub org_id: String,
    pub status: String,
    pub rule: String,
    pub hides: String,
    pub resource: String,
    pub created_at: i64,
}

/// Inserts a version; a first version (consent_id 0) gets its own row id as consent id.
pub fn insert(conn: &mut DbConn, new: &NewConsent) -> Result<i64> {
    let id: i64 = diesel::insert_into(consents::table)
        .values(new)
        .returning(consents::id)
        .get_result(conn)?;
    if new.consent_id == 0 {
        diesel::update(consents::table.find(id))
            .set(consents::consent_id.eq(id))
            .execute(conn)?;
        return Ok(id);
    }
    Ok(new.consent_id)
}

pub fn retire_current(conn: &mut DbConn, consent_id: i64) -> Result<()> {
    diesel::update(
        consents::table
            .filter(consents::consent_id.eq(consent_id))
            .filter(consents::is_current.eq(1)),
    )
    .set(consents::is_current.eq(0))
    .execute(conn)?;
    Ok(())
}

pub fn current(conn: &mut DbConn, consent_id: i64) -> Result<Option<ConsentRow>> {
    Ok(consents::table
        .filter(consents::consent_id.eq(consent_id))
        .filter(consents::is_current.eq(1))
        .first(conn)
        .optional()?)
}

pub fn history(conn: &mut DbConn, consent_id: i64) -> Result<Vec<ConsentRow>> {
    Ok(consents::table
        .filter(consents::consent_id.eq(consent_id))
        .order(consents::version.desc())
        .load(conn)?)
}

/// Current versions of the directives recorded for these source records.
pub fn current_of_sources(conn: &mut DbConn, source_ids: &[i64]) -> Result<Vec<ConsentRow>> {
    Ok(consents::table
        .filter(consents::source_id.eq_any(source_ids))
        .filter(consents::is_current.eq(1))
        .order(consents::consent_id.asc())
        .load(conn)?)
}

/// (enterprise id, rule JSON) of every active directive of these people. Two index lookups:
/// their records by enterprise id, then the current directives of those records.
pub fn active_rules_of(conn: &mut DbConn, enterprise_ids: &[i64]) -> Result<Vec<(i64, String)>> {
    let records: Vec<(i64, i64)> = source_records::table
        .filter(source_records::enterprise_id.eq_any(enterprise_ids))
        .select((source_records::id, source_records::enterprise_id))
        .load(conn)?;
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = records.iter().map(|r| r.0).collect();
    let rules: Vec<(i64, String)> = consents::table
        .filter(consents::source_id.eq_any(ids))
        .filter(consents::is_current.eq(1))
        .filter(consents::status.eq("active"))
        .select((consents::source_id, consents::rule))
        .load(conn)?;
    Ok(rules
        .into_iter()
        .filter_map(|(sid, rule)| records.iter().find(|r| r.0 == sid).map(|r| (r.1, rule)))
        .collect())
}

/// Copies what a person's active directives hide (`*`, `,a,b,` or empty) onto each of their
/// records. Called after every consent change and every link change of the person.
pub fn refresh_hides(conn: &mut DbConn, enterprise_id: i64) -> Result<()> {
    let ids: Vec<i64> = source_records::table
        .filter(source_records::enterprise_id.eq(enterprise_id))
        .select(source_records::id)
        .load(conn)?;
    let hides: Vec<String> = consents::table
        .filter(consents::source_id.eq_any(&ids))
        .filter(consents::is_current.eq(1))
        .filter(consents::status.eq("active"))
        .select(consents::hides)
        .load(conn)?;
    let value = if hides.iter().any(|h| h == "*") {
        "*".to_string()
    } else {
        let mut orgs: Vec<&str> = hides
            .iter()
            .flat_map(|h| h.split(','))
            .filter(|o| !o.is_empty())
            .collect();
        orgs.sort_unstable();
        orgs.dedup();
        if orgs.is_empty() {
            String::new()
        } else {
            format!(",{},", orgs.join(","))
        }
    };
    set_hides(conn, enterprise_id, &value)
}

/// Of `enterprise_ids`, the people one of whose records holds a current active directive:
/// the only ones whose records consent hides anything of (`refresh_hides`).
pub fn with_directives(conn: &mut DbConn, enterprise_ids: &[i64]) -> Result<Vec<i64>> {
    Ok(consents::table
        .inner_join(source_records::table)
        .filter(consents::is_current.eq(1))
        .filter(consents::status.eq("active"))
        .filter(source_records::enterprise_id.eq_any(enterprise_ids))
        .select(source_records::enterprise_id)
        .distinct()
        .load(conn)?)
}

/// Sets what consent hides on every record of a person.
pub fn set_hides(conn: &mut DbConn, enterprise_id: i64, value: &str) -> Result<()> {
    diesel::update(
        source_records::table
            .filter(source_records::enterprise_id.eq(enterprise_id))
            .filter(source_records::consent_hides.ne(value)),
    )
    .set(source_records::consent_hides.eq(value))
    .execute(conn)?;
    Ok(())
}

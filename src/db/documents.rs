//! Queries of the document registry.

use diesel::prelude::*;

use super::schema::{document_lists, documents, source_records};
use super::DbConn;
use crate::error::Result;

#[derive(Debug, Clone, Queryable)]
pub struct DocumentRow {
    pub id: i64,
    pub master_id: String,
    pub org_id: String,
    pub source_id: i64,
    pub list_id: Option<i64>,
    pub status: String,
    pub doc_date: Option<i64>,
    pub content_type: String,
    pub url: String,
    pub size: i64,
    pub hash: String,
    pub digest: String,
    pub resource: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = documents)]
pub struct NewDocument {
    pub master_id: String,
    pub org_id: String,
    pub source_id: i64,
    pub list_id: Option<i64>,
    pub status: String,
    pub doc_date: Option<i64>,
    pub content_type: String,
    pub url: String,
    pub size: i64,
    pub hash: String,
    pub digest: String,
    pub resource: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable)]
pub struct ListRow {
    pub id: i64,
    pub master_id: String,
    pub kind: String,
    pub org_id: String,
    pub source_id: i64,
    pub status: String,
    pub list_date: Option<i64>,
    pub digest: String,
    pub resource: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = document_lists)]
pub struct NewList {
    pub master_id: String,
    pub kind: String,
    pub org_id: String,
    pub source_id: i64,
    pub status: String,
    pub list_date: Option<i64>,
    pub digest: String,
    pub resource: String,
    pub created_at: i64,
}

pub fn insert_document(conn: &mut DbConn, doc: &NewDocument) -> Result<i64> {
    Ok(diesel::insert_into(documents::table)
        .values(doc)
        .returning(documents::id)
        .get_result(conn)?)
}

/// The stored resource once the id is known (it names itself and its retrieve URL).
pub fn set_document_resource(conn: &mut DbConn, id: i64, resource: &str) -> Result<()> {
    diesel::update(documents::table.find(id))
        .set(documents::resource.eq(resource))
        .execute(conn)?;
    Ok(())
}

pub fn get_document(conn: &mut DbConn, id: i64) -> Result<Option<DocumentRow>> {
    Ok(documents::table.find(id).first(conn).optional()?)
}

pub fn document_by_master_id(conn: &mut DbConn, master_id: &str) -> Result<Option<DocumentRow>> {
    Ok(documents::table
        .filter(documents::master_id.eq(master_id))
        .first(conn)
        .optional()?)
}

pub fn set_document_status(conn: &mut DbConn, id: i64, status: &str, now: i64) -> Result<()> {
    diesel::update(documents::table.find(id))
        .set((documents::status.eq(status), documents::updated_at.eq(now)))
        .execute(conn)?;
    Ok(())
}

/// Documents registered for any of these source records, newest first.
pub fn documents_of_sources(conn: &mut DbConn, source_ids: &[i64]) -> Result<Vec<DocumentRow>> {
    Ok(documents::table
        .filter(documents::source_id.eq_any(source_ids))
        .order((documents::doc_date.desc(), documents::id.desc()))
        .load(conn)?)
}

pub fn insert_list(conn: &mut DbConn, list: &NewList) -> Result<i64> {
    Ok(diesel::insert_into(document_lists::table)
        .values(list)
        .returning(document_lists::id)
        .get_result(conn)?)
}

pub fn set_list_resource(conn: &mut DbConn, id: i64, resource: &str) -> Result<()> {
    diesel::update(document_lists::table.find(id))
        .set(document_lists::resource.eq(resource))
        .execute(conn)?;
    Ok(())
}

pub fn list_by_master_id(conn: &mut DbConn, master_id: &str) -> Result<Option<ListRow>> {
    Ok(document_lists::table
        .filter(document_lists::master_id.eq(master_id))
        .first(conn)
        .optional()?)
}

pub fn list_by_id(conn: &mut DbConn, id: i64) -> Result<Option<ListRow>> {
    Ok(document_lists::table.find(id).first(conn).optional()?)
}

pub fn lists_of_sources(conn: &mut DbConn, source_ids: &[i64]) -> Result<Vec<ListRow>> {
    Ok(document_lists::table
        .filter(document_lists::source_id.eq_any(source_ids))
        .order((document_lists::list_date.desc(), document_lists::id.desc()))
        .load(conn)?)
}

/// Every source record that belongs to an identity now (active) or whose identifiers still
/// resolve there (replaced): their documents are the person's documents.
pub fn sources_of_identity(conn: &mut DbConn, enterprise_id: i64) -> Result<Vec<i64>> {
    Ok(source_records::table
        .filter(source_records::enterprise_id.eq(enterprise_id))
        .filter(source_records::status.eq_any(["active", "replaced"]))
        .select(source_records::id)
        .load(conn)?)
}

//! The member directory, mCSD-style: Organization and Endpoint.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{exchange_system, ok, searchset, self_url, Params};
use crate::api::context::RequestContext;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord};
use crate::error::{Error, Result};
use crate::ids::OrgId;
use crate::orgs::{self, OrgQuery, OrgStatus, OrgType, Organization};

pub fn render_organization(state: &AppState, org: &Organization) -> Value {
    let hl7_type = match org.org_type {
        OrgType::Operator => ("other", "Other"),
        _ => ("prov", "Healthcare Provider"),
    };
    let mut resource = json!({
        "resourceType": "Organization",
        "id": org.id.as_str(),
        "meta": { "lastUpdated": crate::time::to_instant(org.updated_at) },
        "identifier": [{ "system": exchange_system(state, "org"), "value": org.id.as_str() }],
        "active": org.is_active(),
        "type": [{
            "coding": [
                { "system": exchange_system(state, "member-type"), "code": org.org_type.code() },
                { "system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": hl7_type.0, "display": hl7_type.1 }
            ]
        }],
        "name": org.name,
    });
    if org.fhir_base.is_some() {
        resource["endpoint"] = json!([{ "reference": format!("Endpoint/{}", org.id) }]);
    }
    resource
}

pub fn render_endpoint(org: &Organization) -> Option<Value> {
    let address = org.fhir_base.as_ref()?;
    Some(json!({
        "resourceType": "Endpoint",
        "id": org.id.as_str(),
        "status": if org.is_active() { "active" } else { "suspended" },
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
            "display": "HL7 FHIR"
        },
        "name": format!("{} FHIR R4 endpoint", org.name),
        "managingOrganization": { "reference": format!("Organization/{}", org.id) },
        "payloadType": [{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type",
            "code": "any",
            "display": "Any"
        }]}],
        "payloadMimeType": ["application/fhir+json"],
        "address": address,
    }))
}

async fn audit(
    state: &AppState,
    ctx: &RequestContext,
    action: Action,
    subtype: &str,
    entity: String,
    query: &str,
) -> Result<()> {
    let record = AuditRecord::new(&ctx.actor(), "rest", action, subtype)
        .entity(entity)
        .query(query);
    state.auditor.record(record).await.map(|_| ())
}

fn org_query(params: &Params) -> Result<OrgQuery> {
    Ok(OrgQuery {
        id: params.one("_id")?.map(OrgId::parse).transpose()?,
        name_prefix: params.one("name")?.map(str::to_string),
        org_type: params
            .one("type")?
            .map(|t| OrgType::parse(t.rsplit('|').next().unwrap_or(t)))
            .transpose()?,
        active: match params.one("active")? {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err(Error::invalid("active must be true or false")),
        },
    })
}

fn paged<T>(mut items: Vec<T>, count: i64) -> (usize, Vec<T>) {
    let total = items.len();
    items.truncate(usize::try_from(count).unwrap_or(usize::MAX));
    (total, items)
}

pub async fn search_organizations(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["_id", "name", "type", "active"])?;
    let query = org_query(&params)?;
    let count = params.count(100, 1000)?;
    let found = state.db.run(move |c| orgs::search(c, &query)).await?;
    audit(
        &state,
        &ctx,
        Action::Execute,
        "search-type",
        "Organization".into(),
        req.query_string(),
    )
    .await?;
    let (total, found) = paged(found, count);
    let base = state.config.fhir_base();
    let entries = found
        .iter()
        .map(|o| {
            (
                format!("{base}/Organization/{}", o.id),
                render_organization(&state, o),
            )
        })
        .collect();
    Ok(ok(&searchset(
        &self_url(&state, &req),
        Some(total),
        entries,
        None,
    )))
}

async fn load_org(state: &AppState, id: &str, what: &str) -> Result<Organization> {
    let not_found = || Error::not_found(format!("{what}/{id} is not known to this exchange"));
    let id = OrgId::parse(id).map_err(|_| not_found())?;
    state
        .db
        .run(move |c| orgs::get(c, &id))
        .await?
        .ok_or_else(not_found)
}

pub async fn read_organization(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let org = load_org(&state, &path, "Organization").await?;
    audit(
        &state,
        &ctx,
        Action::Read,
        "read",
        format!("Organization/{}", org.id),
        "",
    )
    .await?;
    Ok(ok(&render_organization(&state, &org)))
}

pub async fn search_endpoints(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["_id", "organization", "status"])?;
    let by_org = params
        .one("organization")?
        .map(|r| r.trim_start_matches("Organization/").to_string());
    let id = params
        .one("_id")?
        .or(by_org.as_deref())
        .map(OrgId::parse)
        .transpose()?;
    let status = match params.one("status")? {
        None => None,
        Some("active") => Some(OrgStatus::Active),
        Some("suspended") => Some(OrgStatus::Suspended),
        Some(other) => {
            return Err(Error::invalid(format!(
                "status '{other}': use active or suspended"
            )))
        }
    };
    let count = params.count(100, 1000)?;
    let query = OrgQuery {
        id,
        active: status.map(|s| s == OrgStatus::Active),
        ..OrgQuery::default()
    };
    let found = state.db.run(move |c| orgs::search(c, &query)).await?;
    audit(
        &state,
        &ctx,
        Action::Execute,
        "search-type",
        "Endpoint".into(),
        req.query_string(),
    )
    .await?;
    let endpoints: Vec<(String, Value)> = found
        .iter()
        .filter_map(|o| {
            render_endpoint(o)
                .map(|e| (format!("{}/Endpoint/{}", state.config.fhir_base(), o.id), e))
        })
        .collect();
    let (total, entries) = paged(endpoints, count);
    Ok(ok(&searchset(
        &self_url(&state, &req),
        Some(total),
        entries,
        None,
    )))
}

pub async fn read_endpoint(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let org = load_org(&state, &path, "Endpoint").await?;
    let endpoint = render_endpoint(&org).ok_or_else(|| {
        Error::not_found(format!("Endpoint/{} is not known to this exchange", org.id))
    })?;
    audit(
        &state,
        &ctx,
        Action::Read,
        "read",
        format!("Endpoint/{}", org.id),
        "",
    )
    .await?;
    Ok(ok(&endpoint))
}

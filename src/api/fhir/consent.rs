//! Patients' consent directives: `POST /fhir/Consent` records one, `PUT /fhir/Consent/{id}`
//! (with `If-Match`) records a new version of it, `GET` reads the current version, its history,
//! or a patient's directives. Recorded by a member acting on the patient's request (PATRQT) for
//! a patient it holds, or by an exchange operator. Never overwritten: every version is kept.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{base, ok, Params};
use crate::api::context::RequestContext;
use crate::api::outcome::fhir;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord};
use crate::db::consent::{self as store, ConsentRow, NewConsent};
use crate::db::DbConn;
use crate::error::{Error, ErrorKind, Result};
use crate::mpi::{self, person_ref, source_ref};
use crate::orgs::{OrgType, Organization};
use crate::policy::consent::{self as policy, ConsentPatient, Directive};
use crate::policy::PurposeOfUse;

const LOINC_CONSENT: &str = "59284-0";

fn consent_ref(id: i64) -> String {
    format!("consent-{id}")
}

fn parse_consent_ref(s: &str) -> Option<i64> {
    s.strip_prefix("consent-")?
        .parse()
        .ok()
        .filter(|n: &i64| *n > 0)
}

fn may_record(ctx: &RequestContext) -> Result<()> {
    let operator = ctx.org.org_type == OrgType::Operator;
    if operator || ctx.purpose == PurposeOfUse::Patrqt {
        Ok(())
    } else {
        Err(Error::forbidden(
            "consent directives are recorded on the patient's request: send X-Purpose-Of-Use: PATRQT (or ask an exchange operator)",
        ))
    }
}

/// The source record a directive is kept with: for a member, its own record of the person
/// (it must hold one); for an operator, the person's first record.
fn source_for(conn: &mut DbConn, org: &Organization, eid: i64) -> Result<Option<i64>> {
    let members = crate::db::mpi::members(conn, eid)?;
    if org.org_type == OrgType::Operator {
        return Ok(members.first().map(|m| m.id));
    }
    Ok(members
        .iter()
        .find(|m| m.org_id == org.id.as_str())
        .map(|m| m.id))
}

fn resolve_patient(
    conn: &mut DbConn,
    settings: &mpi::MpiSettings,
    patient: &ConsentPatient,
    fhir_base: &str,
) -> Result<Option<i64>> {
    match patient {
        ConsentPatient::Identifier(s, v) => mpi::resolve_identifier(conn, settings, s, v),
        ConsentPatient::Reference(r) => {
            let local = r
                .strip_prefix(fhir_base)
                .map(|x| x.trim_start_matches('/'))
                .unwrap_or(r);
            let id = local.strip_prefix("Patient/").unwrap_or(local);
            if let Some(e) = mpi::parse_person_ref(id) {
                return mpi::current_identity(conn, e);
            }
            match mpi::parse_source_ref(id) {
                Some(s) => match crate::db::mpi::get_source(conn, s)? {
                    Some(row) if row.status != "deleted" => {
                        mpi::current_identity(conn, row.enterprise_id)
                    }
                    _ => Ok(None),
                },
                None => Ok(None),
            }
        }
    }
}

/// The directive as the exchange keeps it: the submission with the patient resolved and the
/// elements FHIR requires filled in when absent.
fn stored(resource: &Value, d: &Directive, source_id: i64) -> Value {
    let mut r = resource.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    r["patient"] = json!({ "reference": format!("Patient/{}", source_ref(source_id)) });
    if r.get("scope").is_none() {
        r["scope"] =
            json!({ "coding": [{ "system": policy::SCOPE_SYSTEM, "code": "patient-privacy" }] });
    }
    if r.get("category").is_none() {
        r["category"] = json!([{ "coding": [{ "system": "http://loinc.org", "code": LOINC_CONSENT, "display": "Patient consent" }] }]);
    }
    if r.get("policy").is_none() && r.get("policyRule").is_none() {
        let code = if d.rule.permit { "OPTIN" } else { "OPTOUT" };
        r["policyRule"] = json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": code }] });
    }
    if r.get("dateTime").is_none() {
        r["dateTime"] = json!(crate::time::to_instant(crate::time::now_micros()));
    }
    r
}

fn render(row: &ConsentRow) -> Value {
    let mut r: Value = serde_json::from_str(&row.resource)
        .unwrap_or_else(|_| json!({ "resourceType": "Consent" }));
    r["resourceType"] = json!("Consent");
    r["id"] = json!(consent_ref(row.consent_id));
    r["meta"] = json!({
        "versionId": row.version.to_string(),
        "lastUpdated": crate::time::to_instant(row.created_at),
        "source": format!("Organization/{}", row.org_id),
    });
    r
}

fn versioned(status: StatusCode, row: &ConsentRow, base: &str) -> HttpResponse {
    let mut resp = fhir(status, &render(row));
    let location = format!(
        "{base}/Consent/{}/_history/{}",
        consent_ref(row.consent_id),
        row.version
    );
    if let Ok(v) = location.parse() {
        resp.headers_mut()
            .insert(actix_web::http::header::LOCATION, v);
    }
    if let Ok(v) = format!("W/\"{}\"", row.version).parse() {
        resp.headers_mut().insert(actix_web::http::header::ETAG, v);
    }
    resp
}

/// Writes one version: a new directive (`consent_id` None) or the next version of one.
async fn write(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
    consent_id: Option<i64>,
) -> Result<HttpResponse> {
    may_record(&ctx)?;
    let resource = super::patient::parse_json(&body)?;
    let directive = policy::parse(&resource, &|_| true)?;
    let if_match: Option<i64> = match req.headers().get(actix_web::http::header::IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|v| {
                    v.trim()
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .to_string()
                })
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::invalid("If-Match must be W/\"<versionId>\""))?,
        ),
    };
    if consent_id.is_some() && if_match.is_none() {
        return Err(Error::invalid(
            "If-Match: W/\"<versionId>\" is required to change a consent directive, so that no version is overwritten unseen",
        ));
    }
    let fhir_base = base(&state, &req);
    let settings = state.mpi.clone();
    let org = ctx.org.clone();
    let actor = ctx.actor();
    let row = state
        .db
        .write(move |c| {
            for (i, a) in directive.rule.actors.iter().enumerate() {
                let known = crate::ids::OrgId::parse(a)
                    .ok()
                    .map(|o| crate::db::orgs::exists(c, &o))
                    .transpose()?
                    .unwrap_or(false);
                if !known {
                    return Err(Error::invalid(format!("Organization/{a} is not a member of this exchange"))
                        .at(format!("Consent.provision.actor[{i}].reference")));
                }
            }
            let unknown = || {
                Error::new(
                    ErrorKind::Unprocessable,
                    "Consent.patient is not a patient this organisation holds a record of; feed the patient first, or use the Patient the MPI returned",
                )
                .at("Consent.patient")
            };
            let eid = resolve_patient(c, &settings, &directive.patient, &fhir_base)?.ok_or_else(unknown)?;
            let source_id = source_for(c, &org, eid)?.ok_or_else(unknown)?;
            let (id, version) = match consent_id {
                None => (0, 1),
                Some(id) => {
                    let current = store::current(c, id)?
                        .ok_or_else(|| Error::not_found(format!("Consent/{} does not exist", consent_ref(id))))?;
                    if Some(current.version) != if_match {
                        return Err(Error::conflict(format!(
                            "Consent/{} is at version {}, not {}: read it again and decide on the current version",
                            consent_ref(id),
                            current.version,
                            if_match.unwrap_or_default()
                        )));
                    }
                    let same_person = crate::registry::person_of_source(c, current.source_id)? == Some(eid);
                    if !same_person {
                        return Err(Error::invalid("a new version must be about the same patient; record a new Consent instead")
                            .at("Consent.patient"));
                    }
                    store::retire_current(c, id)?;
                    (id, current.version + 1)
                }
            };
            let now = crate::time::now_micros();
            let consent_id = store::insert(
                c,
                &NewConsent {
                    consent_id: id,
                    version,
                    is_current: 1,
                    source_id,
                    org_id: org.id.to_string(),
                    status: directive.status.clone(),
                    rule: serde_json::to_string(&directive.rule).map_err(|e| Error::internal(e.to_string()))?,
                    hides: if directive.status == "active" { directive.rule.hides() } else { String::new() },
                    resource: stored(&resource, &directive, source_id).to_string(),
                    created_at: now,
                },
            )?;
            let record = AuditRecord::new(&actor, "rest", if version == 1 { Action::Create } else { Action::Update }, "consent")
                .entity(format!("Consent/{}", consent_ref(consent_id)))
                .patient(format!("Patient/{}", person_ref(eid)))
                .outcome(
                    crate::audit::Outcome::Success,
                    format!(
                        "version {version}: {} {}{}{}",
                        directive.status,
                        if directive.rule.permit { "permit" } else { "deny" },
                        if directive.rule.actors.is_empty() { String::new() } else { format!(" to {}", directive.rule.actors.join(", ")) },
                        if directive.rule.labels.is_empty() { String::new() } else { format!(" of {}", directive.rule.labels.join(", ")) },
                    ),
                );
            crate::db::audit::append(c, &[record])?;
            crate::db::consent::refresh_hides(c, eid)?;
            store::current(c, consent_id)?.ok_or_else(|| Error::internal("consent vanished"))
        })
        .await?;
    let status = if row.version == 1 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(versioned(status, &row, &base(&state, &req)))
}

/// POST /fhir/Consent
pub async fn create(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    write(ctx, state, req, body, None).await
}

/// PUT /fhir/Consent/{id} (If-Match required): the next version.
pub async fn update(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let id = parse_consent_ref(&path)
        .ok_or_else(|| Error::not_found(format!("Consent/{path} does not exist")))?;
    write(ctx, state, req, body, Some(id)).await
}

/// Whether the requester may read a person's directives: an operator, or a member holding them.
fn may_read(conn: &mut DbConn, org: &Organization, eid: Option<i64>) -> Result<bool> {
    if org.org_type == OrgType::Operator {
        return Ok(true);
    }
    let Some(eid) = eid else { return Ok(false) };
    Ok(crate::db::mpi::members(conn, eid)?
        .iter()
        .any(|m| m.org_id == org.id.as_str()))
}

/// GET /fhir/Consent/{id} and GET /fhir/Consent/{id}/_history
async fn read_versions(
    ctx: RequestContext,
    state: web::Data<AppState>,
    id: String,
    history: bool,
) -> Result<HttpResponse> {
    let not_found = || Error::not_found(format!("Consent/{id} does not exist"));
    let cid = parse_consent_ref(&id).ok_or_else(not_found)?;
    let org = ctx.org.clone();
    let found = state
        .db
        .run(move |c| {
            let rows = store::history(c, cid)?;
            let Some(first) = rows.first() else {
                return Ok(None);
            };
            let eid = crate::registry::person_of_source(c, first.source_id)?;
            Ok(may_read(c, &org, eid)?.then_some((rows, eid)))
        })
        .await?;
    let (rows, eid) = found.ok_or_else(not_found)?;
    let mut record = AuditRecord::new(
        &ctx.actor(),
        "rest",
        Action::Read,
        if history { "history" } else { "read" },
    )
    .entity(format!("Consent/{id}"));
    if let Some(eid) = eid {
        record = record.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(record).await?;
    if !history {
        let current = rows
            .iter()
            .find(|r| r.is_current == 1)
            .ok_or_else(not_found)?;
        return Ok(ok(&render(current)));
    }
    Ok(ok(&json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": rows.len(),
        "entry": rows.iter().map(|r| json!({
            "fullUrl": format!("Consent/{}", consent_ref(r.consent_id)),
            "resource": render(r),
            "request": { "method": if r.version == 1 { "POST" } else { "PUT" }, "url": format!("Consent/{}", consent_ref(r.consent_id)) },
            "response": { "status": if r.version == 1 { "201" } else { "200" }, "lastModified": crate::time::to_instant(r.created_at) }
        })).collect::<Vec<_>>()
    })))
}

pub async fn read(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    read_versions(ctx, state, path.into_inner(), false).await
}

pub async fn history(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    read_versions(ctx, state, path.into_inner(), true).await
}

/// GET /fhir/Consent?patient=Patient/ent-N|patient.identifier=S|V: current versions.
pub async fn search(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["patient", "patient.identifier"])?;
    let patient = match (params.one("patient")?, params.one("patient.identifier")?) {
        (Some(p), _) => ConsentPatient::Reference(p.to_string()),
        (None, Some(i)) => match i.split_once('|') {
            Some((s, v)) if !s.is_empty() && !v.is_empty() => {
                ConsentPatient::Identifier(s.into(), v.into())
            }
            _ => {
                return Err(Error::invalid("patient.identifier must be system|value")
                    .at("patient.identifier"))
            }
        },
        _ => return Err(Error::invalid("patient or patient.identifier is required")),
    };
    let fhir_base = base(&state, &req);
    let settings = state.mpi.clone();
    let org = ctx.org.clone();
    let fb = fhir_base.clone();
    let (eid, rows) = state
        .db
        .run(move |c| {
            let eid = resolve_patient(c, &settings, &patient, &fb)?;
            if !may_read(c, &org, eid)? {
                return Ok((None, Vec::new()));
            }
            let Some(eid) = eid else {
                return Ok((None, Vec::new()));
            };
            let sources = crate::db::documents::sources_of_identity(c, eid)?;
            Ok((Some(eid), store::current_of_sources(c, &sources)?))
        })
        .await?;
    let mut record = AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "consent-search")
        .entity("Consent")
        .query(req.query_string());
    if let Some(eid) = eid {
        record = record.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(record).await?;
    let entries = rows
        .iter()
        .map(|r| {
            (
                format!("{fhir_base}/Consent/{}", consent_ref(r.consent_id)),
                render(r),
            )
        })
        .collect();
    Ok(ok(&super::searchset(
        &super::self_url(&state, &req),
        Some(rows.len()),
        entries,
        None,
    )))
}

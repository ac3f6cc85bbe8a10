//! GET /fhir/AuditEvent: the audit trail rendered as FHIR AuditEvents in the IHE BALP style.
//! Exchange operators only (the patient's accounting of disclosures comes with consent).

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, NaiveDate, Utc};
use diesel::Connection;
use serde_json::{json, Value};

use super::{exchange_system, ok, searchset, self_url, Params};
use crate::api::context::RequestContext;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord, ChainedRecord};
use crate::db::audit::{self as store, AuditFilter};
use crate::error::{Error, Result};
use crate::orgs::OrgType;
use crate::policy::{PurposeOfUse, PURPOSE_OF_USE_SYSTEM};

fn require_operator(ctx: &RequestContext) -> Result<()> {
    if ctx.org.org_type == OrgType::Operator {
        Ok(())
    } else {
        Err(Error::forbidden(
            "only exchange operators may read the audit trail",
        ))
    }
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({ "system": system, "code": code, "display": display })
}

fn render(state: &AppState, c: &ChainedRecord) -> Value {
    let r = &c.record;
    let (type_code, type_display) = match r.event_type.as_str() {
        "rest" => ("rest", "RESTful Operation"),
        "security" => ("110113", "Security Alert"),
        _ => ("110100", "Application Activity"),
    };
    let type_system = if type_code == "rest" {
        "http://terminology.hl7.org/CodeSystem/audit-event-type"
    } else {
        "http://dicom.nema.org/resources/ontology/DCM"
    };
    let subtype_system = if r.event_type == "rest" {
        "http://hl7.org/fhir/restful-interaction".to_string()
    } else {
        exchange_system(state, "audit-subtype")
    };
    let mut agents = Vec::new();
    if let Some(org) = &r.org_id {
        let mut agent = json!({
            "type": { "coding": [coding("http://dicom.nema.org/resources/ontology/DCM", "110153", "Source Role ID")] },
            "who": { "reference": format!("Organization/{org}"), "identifier": { "system": exchange_system(state, "org"), "value": org } },
            "requestor": r.user_id.is_none(),
        });
        if let Some(addr) = &r.client_addr {
            agent["network"] = json!({ "address": addr, "type": "2" });
        }
        agents.push(agent);
    }
    if let Some(user) = &r.user_id {
        let mut agent = json!({
            "type": { "coding": [coding("http://terminology.hl7.org/CodeSystem/extra-security-role-type", "humanuser", "human user")] },
            "who": { "identifier": { "value": user } },
            "requestor": true,
        });
        if let Some(role) = &r.user_role {
            agent["role"] = json!([{ "text": role }]);
        }
        if let Some(purpose) = &r.purpose {
            agent["purposeOfUse"] =
                json!([{ "coding": [{ "system": PURPOSE_OF_USE_SYSTEM, "code": purpose }] }]);
        }
        agents.push(agent);
    }
    agents.push(json!({
        "type": { "coding": [coding("http://dicom.nema.org/resources/ontology/DCM", "110152", "Destination Role ID")] },
        "who": { "display": "hie-broker" },
        "requestor": false,
    }));
    let mut entities = Vec::new();
    if let Some(patient) = &r.patient {
        entities.push(json!({
            "what": { "reference": patient },
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "1", "Person"),
            "role": coding("http://terminology.hl7.org/CodeSystem/object-role", "1", "Patient"),
        }));
    }
    if r.entity.is_some() || r.query.is_some() {
        let mut entity = json!({
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-entity-type", "2", "System Object"),
        });
        if let Some(what) = &r.entity {
            entity["what"] = json!({ "display": what });
        }
        if let Some(query) = &r.query {
            entity["query"] = json!(base64(query.as_bytes()));
        }
        entities.push(entity);
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": c.seq.to_string(),
        "type": coding(type_system, type_code, type_display),
        "subtype": [{ "system": subtype_system, "code": r.subtype }],
        "action": r.action,
        "recorded": crate::time::to_instant(r.recorded_at),
        "outcome": r.outcome,
        "agent": agents,
        "source": {
            "observer": { "display": "hie-broker" },
            "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")]
        },
        "extension": [{
            "url": exchange_system(state, "audit-chain"),
            "extension": [
                { "url": "seq", "valueInteger": c.seq },
                { "url": "prevHash", "valueString": c.prev_hash },
                { "url": "hash", "valueString": c.hash }
            ]
        }]
    });
    if let Some(desc) = &r.outcome_desc {
        event["outcomeDesc"] = json!(desc);
    }
    if let Some(reason) = &r.break_glass {
        // BALP: break-the-glass is a purpose of the event, with the reason the clinician gave.
        if let Some(e) = event["extension"].as_array_mut() {
            e.push(json!({ "url": exchange_system(state, "break-glass-reason"), "valueString": reason }))
        }
    }
    if let Some(purpose) = &r.purpose {
        let display = PurposeOfUse::parse(purpose)
            .map(PurposeOfUse::display)
            .unwrap_or("");
        let mut codings = vec![coding(PURPOSE_OF_USE_SYSTEM, purpose, display)];
        if r.break_glass.is_some() {
            codings.push(coding(PURPOSE_OF_USE_SYSTEM, "BTG", "break the glass"));
        }
        event["purposeOfEvent"] = json!([{ "coding": codings }]);
    }
    if !entities.is_empty() {
        event["entity"] = json!(entities);
    }
    event
}

fn base64(bytes: &[u8]) -> String {
    openssl::base64::encode_block(bytes)
}

/// A FHIR date or dateTime as the half-open range [start, end) in microseconds.
fn date_range(value: &str) -> Result<(i64, i64)> {
    let bad = || {
        Error::invalid(format!(
            "date '{value}' must be YYYY-MM-DD or a full dateTime with time zone"
        ))
        .at("date")
    };
    if let Ok(d) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        let start = d
            .and_hms_opt(0, 0, 0)
            .ok_or_else(bad)?
            .and_utc()
            .timestamp_micros();
        return Ok((start, start + 86_400_000_000));
    }
    let t = DateTime::parse_from_rfc3339(value)
        .map_err(|_| bad())?
        .with_timezone(&Utc)
        .timestamp_micros();
    Ok((t, t + 1))
}

fn filter(params: &Params) -> Result<AuditFilter> {
    let mut f = AuditFilter::default();
    for raw in params.all("date") {
        let (prefix, value) = match raw.get(..2) {
            Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &raw[2..]),
            _ => ("eq", raw),
        };
        let (start, end) = date_range(value)?;
        match prefix {
            "ge" => f.from_micros = Some(start),
            "gt" => f.from_micros = Some(end),
            "le" => f.to_micros = Some(end),
            "lt" => f.to_micros = Some(start),
            _ => {
                f.from_micros = Some(start);
                f.to_micros = Some(end);
            }
        }
    }
    f.org_or_user = params
        .one("agent")?
        .map(|a| a.trim_start_matches("Organization/").to_string());
    f.patient = params.one("patient")?.map(str::to_string);
    f.entity = params.one("entity")?.map(str::to_string);
    f.purpose = params
        .one("purpose")?
        .map(|p| PurposeOfUse::parse(p).map(|p| p.code().to_string()))
        .transpose()?;
    f.outcome = params.one("outcome")?.map(str::to_string);
    f.action = params.one("action")?.map(str::to_string);
    f.subtype = params
        .one("subtype")?
        .map(|s| s.rsplit('|').next().unwrap_or(s).to_string());
    f.break_glass = params
        .one("break-glass")?
        .map(|b| match b {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(Error::invalid("break-glass must be true or false").at("break-glass")),
        })
        .transpose()?;
    f.before_seq = params
        .one("_before")?
        .map(|b| {
            b.parse::<i64>()
                .map_err(|_| Error::invalid("_before must be a record number"))
        })
        .transpose()?;
    Ok(f)
}

pub async fn search(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(
        req.query_string(),
        &[
            "date",
            "agent",
            "patient",
            "entity",
            "purpose",
            "outcome",
            "action",
            "subtype",
            "break-glass",
            "_before",
        ],
    )?;
    let mut f = filter(&params)?;
    if ctx.org.org_type != OrgType::Operator {
        f = accounting_filter(&state, &ctx, f).await?;
    }
    let count = params.count(50, 1000)?;
    let record = AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "search-type")
        .entity("AuditEvent")
        .query(req.query_string());
    // The search and its own audit record are one transaction: the reader sees the trail up to
    // and including its own access.
    let found = state
        .db
        .write(move |c| {
            c.transaction(|c| {
                store::append(c, &[record])?;
                store::search(c, &f, count + 1)
            })
        })
        .await?;
    let more = found.len() as i64 > count;
    let page: Vec<_> = found.into_iter().take(count as usize).collect();
    let next = match (more, page.last()) {
        (true, Some(last)) => {
            let kept: Vec<String> = req
                .query_string()
                .split('&')
                .filter(|p| !p.is_empty() && !p.starts_with("_before="))
                .map(str::to_string)
                .collect();
            let mut q = kept.join("&");
            if !q.is_empty() {
                q.push('&');
            }
            Some(format!(
                "{}/AuditEvent?{q}_before={}",
                state.config.fhir_base(),
                last.seq
            ))
        }
        _ => None,
    };
    let base = state.config.fhir_base();
    let entries = page
        .iter()
        .map(|c| (format!("{base}/AuditEvent/{}", c.seq), render(&state, c)))
        .collect();
    Ok(ok(&searchset(&self_url(&state, &req), None, entries, next)))
}

/// The interactions that disclose something about a patient: what their accounting lists.
pub const DISCLOSURES: [&str; 9] = [
    "read",
    "search-type",
    "ihe-pix",
    "match",
    "ITI-66",
    "ITI-67",
    "ITI-68",
    "federated-query",
    "locate",
];

/// A member acting on the patient's own request (purpose PATRQT) may read that patient's
/// accounting of disclosures: who saw what, when and why. It must hold a record of the patient.
async fn accounting_filter(
    state: &AppState,
    ctx: &RequestContext,
    f: AuditFilter,
) -> Result<AuditFilter> {
    if ctx.purpose != PurposeOfUse::Patrqt {
        return Err(Error::forbidden(
            "the audit trail is for exchange operators; a member may read a patient's accounting of disclosures with X-Purpose-Of-Use: PATRQT and patient=Patient/ent-N",
        ));
    }
    let Some(patient) = f.patient.clone() else {
        return Err(Error::invalid(
            "patient=Patient/ent-N is required for an accounting of disclosures",
        )
        .at("patient"));
    };
    let id = patient.trim_start_matches("Patient/").to_string();
    let org = ctx.org.id.to_string();
    let eid = state
        .db
        .run(move |c| {
            let eid = match (
                crate::mpi::parse_person_ref(&id),
                crate::mpi::parse_source_ref(&id),
            ) {
                (Some(e), _) => crate::mpi::current_identity(c, e)?,
                (None, Some(s)) => match crate::db::mpi::get_source(c, s)? {
                    Some(r) => crate::mpi::current_identity(c, r.enterprise_id)?,
                    None => None,
                },
                _ => None,
            };
            let Some(eid) = eid else { return Ok(None) };
            let holds = crate::db::mpi::members(c, eid)?
                .iter()
                .any(|m| m.org_id == org);
            Ok(holds.then_some(eid))
        })
        .await?
        .ok_or_else(|| {
            Error::forbidden(
                "an accounting of disclosures is given only to a member that holds a record of the patient",
            )
        })?;
    Ok(AuditFilter {
        patient: Some(format!("Patient/{}", crate::mpi::person_ref(eid))),
        outcome: Some(crate::audit::Outcome::Success.code().to_string()),
        subtypes: DISCLOSURES.iter().map(|s| s.to_string()).collect(),
        ..f
    })
}

pub async fn read(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let not_found = || Error::not_found(format!("AuditEvent/{} does not exist", path.as_str()));
    let seq: i64 = path.parse().map_err(|_| not_found())?;
    let record = AuditRecord::new(&ctx.actor(), "rest", Action::Read, "read")
        .entity(format!("AuditEvent/{seq}"));
    state.auditor.record(record).await?;
    let found = state
        .db
        .run(move |c| {
            store::search(
                c,
                &AuditFilter {
                    before_seq: Some(seq + 1),
                    ..AuditFilter::default()
                },
                1,
            )
        })
        .await?;
    let event = found
        .into_iter()
        .find(|c| c.seq == seq)
        .ok_or_else(not_found)?;
    Ok(ok(&render(&state, &event)))
}

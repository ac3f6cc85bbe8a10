//! The record locator (`$locate`) and the federated query (`/fhir/federated/{Type}`,
//! `/fhir/federated/Patient/$everything`): which members hold a person, and what they hold.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Instant;

use super::documents::person_of;
use super::guard::{mark_break_glass, Asker};
use super::{base, exchange_system, ok, self_url, Params};
use crate::api::context::RequestContext;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord, Outcome};
use crate::error::{Error, Result};
use crate::federation::{Answer, Target, FORWARDED_PARAMS, RESOURCE_TYPES};
use crate::ids::OrgId;
use crate::mpi::person_ref;
use crate::orgs::Organization;
use crate::policy::consent::{labels_of, Access};

/// Who holds records about a person: each member with its own identifiers for them.
struct Holdings {
    eid: Option<i64>,
    /// What consent lets this requester see of the person.
    access: Access,
    /// (organisation, its identifiers of the person as (system, value)).
    holders: Vec<(Organization, Vec<(String, String)>)>,
}

async fn holdings(
    state: &AppState,
    asker: Asker,
    patient: Option<String>,
    identifier: Option<(String, String)>,
    fhir_base: String,
) -> Result<Holdings> {
    let settings = state.mpi.clone();
    state
        .db
        .run(move |c| {
            let nobody = Holdings {
                eid: None,
                access: Access::default(),
                holders: Vec::new(),
            };
            let Some(eid) = person_of(
                c,
                &settings,
                patient.as_deref(),
                identifier.as_ref(),
                &fhir_base,
            )?
            else {
                return Ok(nobody);
            };
            let access = asker.access_one(c, eid)?;
            if !access.visible {
                // Answered exactly like a person the exchange does not know.
                return Ok(nobody);
            }
            let mut by_org: std::collections::BTreeMap<String, Vec<(String, String)>> =
                Default::default();
            for r in crate::db::mpi::members(c, eid)? {
                by_org
                    .entry(r.org_id.clone())
                    .or_default()
                    .push((r.system, r.value));
            }
            // Members whose documents about the person sit under another member's record.
            let sources = crate::db::documents::sources_of_identity(c, eid)?;
            let doc_orgs: BTreeSet<String> =
                crate::db::documents::documents_of_sources(c, &sources)?
                    .into_iter()
                    .map(|d| d.org_id)
                    .collect();
            for org in doc_orgs {
                by_org.entry(org).or_default();
            }
            let mut holders = Vec::new();
            for (org, ids) in by_org {
                if let Some(o) = crate::orgs::get(c, &OrgId::parse(&org)?)? {
                    holders.push((o, ids));
                }
            }
            Ok(Holdings {
                eid: Some(eid),
                access,
                holders,
            })
        })
        .await
}

/// `patient` (a Patient id) and `patient.identifier` (system, value) of a request.
type PatientParams = (Option<String>, Option<(String, String)>);

fn patient_params(params: &Params) -> Result<PatientParams> {
    let identifier = params
        .one("patient.identifier")?
        .or(params.one("identifier")?)
        .map(|raw| match raw.split_once('|') {
            Some((s, v)) if !s.is_empty() && !v.is_empty() => Ok((s.to_string(), v.to_string())),
            _ => {
                Err(Error::invalid("patient.identifier must be system|value")
                    .at("patient.identifier"))
            }
        })
        .transpose()?;
    let patient = params.one("patient")?.map(str::to_string);
    if patient.is_none() && identifier.is_none() {
        return Err(Error::invalid(
            "name the person: patient=Patient/ent-N or patient.identifier=system|value (any identifier linked to them)",
        ));
    }
    Ok((patient, identifier))
}

/// GET /fhir/Patient/$locate?identifier=S|V and GET /fhir/Patient/{id}/$locate: the member
/// organisations (and their FHIR endpoints) that hold records about the person.
pub async fn locate(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    path: Option<web::Path<String>>,
) -> Result<HttpResponse> {
    let params = Params::parse(
        req.query_string(),
        &["identifier", "patient.identifier", "patient"],
    )?;
    let (patient, identifier) = match path {
        Some(id) => (Some(format!("Patient/{}", id.into_inner())), None),
        None => patient_params(&params)?,
    };
    let fhir_base = base(&state, &req);
    let asker = Asker::new(&state, &ctx);
    let h = holdings(&state, asker, patient, identifier, fhir_base.clone()).await?;
    let Some(eid) = h.eid else {
        return Err(Error::not_found(
            "no person with this identifier is known to the exchange",
        ));
    };
    let mut entries = Vec::new();
    for (org, _) in &h.holders {
        let mut o = super::directory::render_organization(&state, org);
        o["extension"] = json!([{ "url": format!("{}/StructureDefinition/holds-records-for", fhir_base), "valueReference": { "reference": format!("Patient/{}", person_ref(eid)) } }]);
        entries.push(json!({ "fullUrl": format!("{fhir_base}/Organization/{}", org.id), "resource": o, "search": { "mode": "match" } }));
        if let Some(e) = super::directory::render_endpoint(org) {
            entries.push(json!({ "fullUrl": format!("{fhir_base}/Endpoint/{}", org.id), "resource": e, "search": { "mode": "include" } }));
        }
    }
    let record = AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "locate")
        .entity("Organization")
        .patient(format!("Patient/{}", person_ref(eid)))
        .query(req.query_string())
        .outcome(
            Outcome::Success,
            format!("{} members hold records", h.holders.len()),
        );
    state.auditor.record(record).await?;
    Ok(ok(&json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": h.holders.len(),
        "link": [{ "relation": "self", "url": self_url(&state, &req) }],
        "entry": entries,
    })))
}

/// GET /fhir/federated/{Type}?patient.identifier=S|V[&category=&code=&date=&status=&_count=]
pub async fn search(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    kind: web::Path<String>,
) -> Result<HttpResponse> {
    let kind = kind.into_inner();
    let Some(kind) = RESOURCE_TYPES.iter().find(|t| **t == kind) else {
        return Err(Error::not_found(format!(
            "'{kind}' cannot be asked for across the exchange; supported: {}, and Patient/$everything",
            RESOURCE_TYPES.join(", ")
        )));
    };
    fan_out(ctx, state, req, vec![kind]).await
}

/// GET /fhir/federated/Patient/$everything?patient.identifier=S|V: every supported type.
pub async fn everything(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    fan_out(ctx, state, req, RESOURCE_TYPES.to_vec()).await
}

fn warning(code: &str, text: &str) -> Value {
    json!({
        "resource": crate::api::outcome::operation_outcome("warning", code, text, None),
        "search": { "mode": "outcome" }
    })
}

async fn fan_out(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    kinds: Vec<&'static str>,
) -> Result<HttpResponse> {
    let mut allowed: Vec<&str> = vec!["patient", "patient.identifier", "identifier"];
    allowed.extend(FORWARDED_PARAMS);
    let params = Params::parse(req.query_string(), &allowed)?;
    let (patient, identifier) = patient_params(&params)?;
    let extra: Vec<(String, String)> = params
        .pairs()
        .iter()
        .filter(|(k, _)| FORWARDED_PARAMS.contains(&k.split(':').next().unwrap_or(k)))
        .cloned()
        .collect();
    let started = Instant::now();
    let deadline = started + state.federation.deadline(ctx.purpose.is_emergency());
    let fhir_base = base(&state, &req);
    let asker = Asker::new(&state, &ctx);
    let h = holdings(&state, asker, patient, identifier, fhir_base).await?;
    let Some(eid) = h.eid else {
        return Err(Error::not_found(
            "no person with this identifier is known to the exchange",
        ));
    };
    let mut warnings = Vec::new();
    let mut targets = Vec::new();
    for (org, ids) in &h.holders {
        if org.id == ctx.org.id {
            continue; // the requester's own records are at home
        }
        match (&org.fhir_base, org.is_active()) {
            (Some(base), true) => targets.extend(ids.iter().map(|(s, v)| Target {
                org_id: org.id.to_string(),
                fhir_base: base.clone(),
                system: s.clone(),
                value: v.clone(),
            })),
            (None, _) => warnings.push(warning(
                "not-supported",
                &format!("member '{}' holds records about this person but has no registered FHIR endpoint", org.id),
            )),
            (_, false) => warnings.push(warning(
                "forbidden",
                &format!("member '{}' holds records about this person but is suspended", org.id),
            )),
        }
    }
    let asks = targets
        .iter()
        .flat_map(|t| kinds.iter().map(move |k| (t, *k)));
    let answers = futures_util::future::join_all(asks.map(|(t, k)| {
        let fed = state.federation.clone();
        let extra = extra.clone();
        async move { (t, k, fed.ask(t, k, &extra, deadline).await) }
    }))
    .await;
    let org_system = exchange_system(&state, "org");
    let mut entries = Vec::new();
    let mut audits: Vec<AuditRecord> = Vec::new();
    for t in &targets {
        let mine: Vec<&(&Target, &str, Answer)> = answers
            .iter()
            .filter(|(x, _, _)| x.org_id == t.org_id && x.value == t.value && x.system == t.system)
            .collect();
        let mut disclosed = 0;
        let mut withheld = 0;
        let mut problems = Vec::new();
        for (_, kind, answer) in mine {
            match answer {
                Answer::Resources { resources, dropped } => {
                    for r in resources {
                        // What members return passes the same consent check on its way out.
                        if !h.access.allows(&labels_of(r)) {
                            withheld += 1;
                            continue;
                        }
                        let mut r = r.clone();
                        let id = r
                            .get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        if !r.get("meta").is_some_and(Value::is_object) {
                            r["meta"] = json!({});
                        }
                        r["meta"]["source"] = json!(t.fhir_base);
                        let mut tags = r["meta"]["tag"].as_array().cloned().unwrap_or_default();
                        tags.push(json!({ "system": org_system, "code": t.org_id, "display": format!("held by member {}", t.org_id) }));
                        r["meta"]["tag"] = json!(tags);
                        entries.push(json!({ "fullUrl": format!("{}/{kind}/{id}", t.fhir_base), "resource": r, "search": { "mode": "match" } }));
                        disclosed += 1;
                    }
                    if *dropped > 0 {
                        let text = format!("member '{}': {dropped} entries were not valid {kind} resources and were left out", t.org_id);
                        warnings.push(warning("processing", &text));
                        problems.push(text);
                    }
                }
                Answer::Failed { code, message } => {
                    warnings.push(warning(code, message));
                    problems.push(message.clone());
                }
            }
        }
        problems.sort();
        problems.dedup();
        let outcome = if problems.is_empty() {
            Outcome::Success
        } else {
            Outcome::MinorFailure
        };
        if withheld > 0 {
            problems.push(format!("{withheld} withheld by the patient's consent"));
        }
        let desc = if problems.is_empty() {
            format!("{disclosed} resources disclosed")
        } else {
            format!("{disclosed} resources disclosed; {}", problems.join("; "))
        };
        audits.push(
            AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "federated-query")
                .entity(format!("Organization/{}", t.org_id))
                .patient(format!("Patient/{}", person_ref(eid)))
                .query(format!(
                    "{}?patient.identifier={}|{}",
                    kinds.join(","),
                    t.system,
                    t.value
                ))
                .outcome(outcome, desc),
        );
    }
    if audits.is_empty() {
        audits.push(
            AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "federated-query")
                .entity("Organization")
                .patient(format!("Patient/{}", person_ref(eid)))
                .query(req.query_string())
                .outcome(
                    Outcome::Success,
                    "no other member holds records about this person",
                ),
        );
    }
    // Every forward and what it disclosed is on the record before the answer leaves.
    futures_util::future::try_join_all(audits.into_iter().map(|r| state.auditor.record(r))).await?;
    let total = entries.len();
    entries.extend(warnings);
    tracing::info!(
        members = targets.len(),
        resources = total,
        ms = started.elapsed().as_millis() as u64,
        "federated query answered"
    );
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": [{ "relation": "self", "url": self_url(&state, &req) }],
        "entry": entries,
    });
    if h.access.overridden {
        mark_break_glass(&mut bundle);
    }
    Ok(ok(&bundle))
}

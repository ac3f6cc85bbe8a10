//! Patient endpoints of the MPI: ITI-104 feed (conditional PUT/DELETE), PDQm ITI-78 search,
//! PIXm ITI-83 `$ihe-pix`, FHIR `$match`, and the operators' review and link operations.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::guard::{mark_break_glass, Asker};
use super::{ok, searchset, self_url, Params};
use crate::api::context::RequestContext;
use crate::api::outcome::fhir;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord};
use crate::db::mpi::{PdqCriteria, SourceRow};
use crate::error::{Error, Result};
use crate::mpi::{self, normalize, person_ref, source_ref, FeedRequest, Person};
use crate::orgs::OrgType;

/// Records sharing one phone number that a PDQm `telecom` search narrows to by id.
const PHONE_IDS_MAX: i64 = 5_000;

/// Under the opt-in model PDQm considers at most this many matching people (consent is applied
/// to each of them before paging); a search that matches more should be narrowed.
const PDQ_POLICY_WINDOW: i64 = 1000;

pub const MATCH_GRADE_URL: &str = "http://hl7.org/fhir/StructureDefinition/match-grade";

fn require_operator(ctx: &RequestContext) -> Result<()> {
    if ctx.org.org_type == OrgType::Operator {
        Ok(())
    } else {
        Err(Error::forbidden(
            "only exchange operators may review and change patient links",
        ))
    }
}

/// `system|value` from a token parameter.
fn token(raw: &str, param: &str) -> Result<(String, String)> {
    match raw.split_once('|') {
        Some((s, v)) if !s.is_empty() && !v.is_empty() => Ok((s.to_string(), v.to_string())),
        _ => Err(Error::invalid(format!(
            "{param} must be system|value, e.g. urn:oid:1.2.3|MRN-1"
        ))
        .at(param)),
    }
}

pub fn parse_json(body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("the body is not valid JSON: {e}")))
}

pub fn render_person(state: &AppState, p: &Person) -> Value {
    let mut identifiers = vec![
        json!({ "use": "official", "system": state.mpi.enterprise_system, "value": p.enterprise_id.to_string() }),
    ];
    for (system, value) in &p.identifiers {
        let mut id = json!({ "system": system, "value": value });
        if let Some((_, org, _, _)) = p
            .records
            .iter()
            .find(|(_, _, s, v)| s == system && v == value)
        {
            id["assigner"] = json!({ "reference": format!("Organization/{org}") });
        }
        identifiers.push(id);
    }
    let mut r = json!({
        "resourceType": "Patient",
        "id": person_ref(p.enterprise_id),
        "meta": { "lastUpdated": crate::time::to_instant(p.updated_at) },
        "identifier": identifiers,
        "active": true,
        "link": p.records.iter().map(|(sid, _, _, _)| json!({ "other": { "reference": format!("Patient/{}", source_ref(*sid)) }, "type": "seealso" })).collect::<Vec<_>>(),
    });
    if let Value::Object(g) = &p.golden {
        for (k, v) in g {
            r[k] = v.clone();
        }
    }
    if p.records.is_empty() {
        r.as_object_mut().map(|o| o.remove("link"));
    }
    r
}

pub fn render_source(row: &SourceRow) -> Value {
    let mut r: Value = serde_json::from_str(&row.resource)
        .unwrap_or_else(|_| json!({ "resourceType": "Patient" }));
    r["id"] = json!(source_ref(row.id));
    r["meta"] = json!({
        "versionId": row.version.to_string(),
        "lastUpdated": crate::time::to_instant(row.updated_at),
        "source": format!("Organization/{}", row.org_id),
    });
    if row.status != "active" {
        r["active"] = json!(false);
    }
    r["link"] = json!([{ "other": { "reference": format!("Patient/{}", person_ref(row.enterprise_id)) }, "type": "seealso" }]);
    r
}

fn patient_record(
    ctx: &RequestContext,
    action: Action,
    subtype: &str,
    eid: Option<i64>,
    query: &str,
) -> AuditRecord {
    let mut r = AuditRecord::new(&ctx.actor(), "rest", action, subtype)
        .entity("Patient")
        .query(query);
    if let Some(eid) = eid {
        r = r.patient(format!("Patient/{}", person_ref(eid)));
    }
    r
}

/// One audit record per person disclosed (the patient's accounting needs each), or one without.
async fn audit_disclosure(
    state: &AppState,
    ctx: &RequestContext,
    subtype: &str,
    eids: &[i64],
    query: &str,
) -> Result<()> {
    let records: Vec<AuditRecord> = if eids.is_empty() {
        vec![patient_record(ctx, Action::Execute, subtype, None, query)]
    } else {
        eids.iter()
            .map(|e| patient_record(ctx, Action::Execute, subtype, Some(*e), query))
            .collect()
    };
    futures_util::future::try_join_all(records.into_iter().map(|r| state.auditor.record(r)))
        .await
        .map(|_| ())
}

/// PUT /fhir/Patient?identifier=system|value (ITI-104 create/update/merge).
pub async fn feed(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["identifier"])?;
    let (system, value) = token(
        params.one("identifier")?.ok_or_else(|| {
            Error::invalid("identifier=system|value is required for a conditional update")
                .at("identifier")
        })?,
        "identifier",
    )?;
    let patient = parse_json(&body)?;
    let (result, row) = state
        .feeds
        .feed((*ctx.org).clone(), system, value, patient, ctx.actor())
        .await?;
    let sid = result.source_id;
    let status = if result.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut resp = fhir(status, &render_source(&row));
    if let Ok(v) = format!("{}/Patient/{}", state.config.fhir_base(), source_ref(sid)).parse() {
        resp.headers_mut()
            .insert(actix_web::http::header::LOCATION, v);
    }
    if let Ok(v) = format!("{} {}", result.outcome, person_ref(result.enterprise_id)).parse() {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-mpi-outcome"),
            v,
        );
    }
    Ok(resp)
}

/// DELETE /fhir/Patient?identifier=system|value
pub async fn delete(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["identifier"])?;
    let (system, value) = token(
        params.one("identifier")?.ok_or_else(|| {
            Error::invalid("identifier=system|value is required").at("identifier")
        })?,
        "identifier",
    )?;
    let org = ctx.org.clone();
    let actor = ctx.actor();
    state
        .db
        .write(move |c| mpi::delete(c, &org, &system, &value, &actor))
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

fn name_criteria(
    params: &Params,
    field: &str,
) -> Result<(Option<String>, Option<String>, Option<String>)> {
    let plain = params.one(field)?.and_then(normalize::name);
    let exact = params
        .one(&format!("{field}:exact"))?
        .and_then(normalize::name);
    let phonetic = params
        .one(&format!("{field}:phonetic"))?
        .and_then(normalize::name)
        .map(|n| normalize::metaphone(&n));
    Ok((plain, exact, phonetic))
}

/// GET /fhir/Patient (PDQm ITI-78): one entry per person, with all their identifiers.
pub async fn search(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(
        req.query_string(),
        &[
            "_id",
            "family",
            "given",
            "birthdate",
            "gender",
            "identifier",
            "address-postalcode",
            "telecom",
            "_offset",
        ],
    )?;
    let (family_prefix, family_exact, family_phonetic) = name_criteria(&params, "family")?;
    let (given_prefix, given_exact, given_phonetic) = name_criteria(&params, "given")?;
    let mut c = PdqCriteria {
        family_prefix,
        family_exact,
        family_phonetic,
        given_prefix,
        given_exact,
        given_phonetic,
        ..PdqCriteria::default()
    };
    for raw in params.all("birthdate") {
        let (prefix, v) = match raw.get(..2) {
            Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &raw[2..]),
            _ => ("eq", raw),
        };
        let d = normalize::date(v).ok_or_else(|| {
            Error::invalid(format!("birthdate '{v}' is not a date")).at("birthdate")
        })?;
        let next = format!("{d}\u{ffff}");
        match prefix {
            "ge" => c.birth_date_from = Some(d),
            "gt" => c.birth_date_from = Some(next),
            "le" => c.birth_date_to = Some(next),
            "lt" => c.birth_date_to = Some(d),
            _ => {
                c.birth_date_from = Some(d);
                c.birth_date_to = Some(next);
            }
        }
    }
    c.gender = params
        .one("gender")?
        .map(|g| {
            normalize::gender(g)
                .ok_or_else(|| Error::invalid("gender must be male, female or other").at("gender"))
        })
        .transpose()?;
    c.postcode = params
        .one("address-postalcode")?
        .and_then(normalize::postcode);
    c.phone = params
        .one("telecom")?
        .map(|t| t.rsplit('|').next().unwrap_or(t))
        .and_then(normalize::phone);
    let count = params.count(20, 200)?;
    let offset: i64 = params
        .one("_offset")?
        .map(|o| {
            o.parse()
                .map_err(|_| Error::invalid("_offset must be a number"))
        })
        .transpose()?
        .unwrap_or(0)
        .max(0);
    let identifier = params
        .one("identifier")?
        .map(|i| token(i, "identifier"))
        .transpose()?;
    let id = params
        .one("_id")?
        .map(|i| {
            mpi::parse_person_ref(i)
                .ok_or_else(|| Error::invalid("_id must be a person id like ent-12"))
        })
        .transpose()?;
    let has_criteria = c.family_prefix.is_some()
        || c.family_exact.is_some()
        || c.family_phonetic.is_some()
        || c.given_prefix.is_some()
        || c.given_exact.is_some()
        || c.given_phonetic.is_some()
        || c.birth_date_from.is_some()
        || c.birth_date_to.is_some()
        || c.postcode.is_some()
        || c.phone.is_some()
        || identifier.is_some()
        || id.is_some();
    if !has_criteria {
        return Err(Error::invalid("give at least one of family, given, birthdate, identifier, address-postalcode, telecom or _id"));
    }
    let settings = state.mpi.clone();
    let asker = Asker::new(&state, &ctx);
    let (people, total, break_glass) = state
        .db
        .run(move |conn| {
            if let Some((s, v)) = &identifier {
                let Some(eid) = mpi::resolve_identifier(conn, &settings, s, v)? else {
                    return Ok((Vec::new(), 0, false));
                };
                c.narrow_to(
                    crate::db::mpi::members(conn, eid)?
                        .iter()
                        .map(|m| m.id)
                        .collect(),
                );
            }
            if let Some(eid) = id {
                let Some(eid) = mpi::current_identity(conn, eid)? else {
                    return Ok((Vec::new(), 0, false));
                };
                let ids: Vec<i64> = crate::db::mpi::members(conn, eid)?
                    .iter()
                    .map(|m| m.id)
                    .collect();
                c.narrow_to(ids);
            }
            // A phone number is found through its blocking key (every active record with a
            // phone is filed under it), not an index of its own; the query still compares the
            // number itself. A number on thousands of records (a practice's switchboard) is
            // left to that comparison alone: slower, but no list of ids too long to bind.
            if let Some(phone) = &c.phone {
                let key = normalize::phone_key(phone);
                let ids = crate::db::mpi::filed_under(conn, key, PHONE_IDS_MAX + 1)?;
                if ids.len() <= PHONE_IDS_MAX as usize {
                    c.narrow_to(ids);
                }
            }
            // Consent is applied to every match before counting and paging, so that totals and
            // pages say nothing about who was withheld: in SQL under the opt-out model ...
            if let Some(hidden) = asker.hidden_from() {
                c.hidden_from = Some(hidden);
                let (page, total) = crate::db::mpi::pdq_search(conn, &c, offset, count)?;
                if !asker.breaks_glass() {
                    return Ok((mpi::people(conn, &page)?, total, false));
                }
                // Only to say whether break-the-glass released anyone.
                let (visible, break_glass) = asker.visible(conn, &page)?;
                return Ok((mpi::people(conn, &visible)?, total, break_glass));
            }
            // ... and person by person under opt-in.
            let (all, _) = crate::db::mpi::pdq_search(conn, &c, 0, PDQ_POLICY_WINDOW)?;
            let (visible, break_glass) = asker.visible(conn, &all)?;
            let total = visible.len() as i64;
            let page: Vec<i64> = visible
                .into_iter()
                .skip(offset as usize)
                .take(count as usize)
                .collect();
            Ok((mpi::people(conn, &page)?, total, break_glass))
        })
        .await?;
    let eids: Vec<i64> = people.iter().map(|p| p.enterprise_id).collect();
    audit_disclosure(&state, &ctx, "search-type", &eids, req.query_string()).await?;
    let base = state.config.fhir_base();
    let next = (offset + count < total).then(|| {
        let q: Vec<&str> = req
            .query_string()
            .split('&')
            .filter(|p| !p.starts_with("_offset=") && !p.is_empty())
            .collect();
        format!("{base}/Patient?{}&_offset={}", q.join("&"), offset + count)
    });
    let entries = people
        .iter()
        .map(|p| {
            (
                format!("{base}/Patient/{}", person_ref(p.enterprise_id)),
                render_person(&state, p),
            )
        })
        .collect();
    let mut bundle = searchset(&self_url(&state, &req), Some(total as usize), entries, next);
    if break_glass {
        mark_break_glass(&mut bundle);
    }
    Ok(ok(&bundle))
}

/// GET /fhir/Patient/{id}: a person (`ent-N`) or a member's source record (`src-N`).
pub async fn read(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let id = path.into_inner();
    let not_found = || Error::not_found(format!("Patient/{id} is not known to this exchange"));
    if let Some(eid) = mpi::parse_person_ref(&id) {
        let asker = Asker::new(&state, &ctx);
        let person = state
            .db
            .run(move |c| {
                let Some(current) = mpi::current_identity(c, eid)? else {
                    return Ok(None);
                };
                if !asker.access_one(c, current)?.visible {
                    return Ok(None);
                }
                Ok(mpi::people(c, &[current])?.pop())
            })
            .await?
            .ok_or_else(not_found)?;
        state
            .auditor
            .record(
                patient_record(&ctx, Action::Read, "read", Some(person.enterprise_id), "")
                    .entity(format!("Patient/{id}")),
            )
            .await?;
        return Ok(ok(&render_person(&state, &person)));
    }
    let sid = mpi::parse_source_ref(&id).ok_or_else(not_found)?;
    let asker = Asker::new(&state, &ctx);
    let row = state
        .db
        .run(move |c| {
            let Some(row) = crate::db::mpi::get_source(c, sid)? else {
                return Ok(None);
            };
            let visible = match mpi::current_identity(c, row.enterprise_id)? {
                Some(eid) => asker.access_one(c, eid)?.visible,
                None => true,
            };
            Ok(visible.then_some(row))
        })
        .await?
        .filter(|r| r.status != "deleted")
        .ok_or_else(not_found)?;
    state
        .auditor
        .record(
            patient_record(&ctx, Action::Read, "read", Some(row.enterprise_id), "")
                .entity(format!("Patient/{id}")),
        )
        .await?;
    Ok(ok(&render_source(&row)))
}

/// GET /fhir/Patient/$ihe-pix (PIXm ITI-83).
pub async fn pix(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let params = Params::parse(req.query_string(), &["sourceIdentifier", "targetSystem"])?;
    let (system, value) = token(
        params.one("sourceIdentifier")?.ok_or_else(|| {
            Error::invalid("sourceIdentifier=system|value is required").at("sourceIdentifier")
        })?,
        "sourceIdentifier",
    )?;
    let targets: Vec<String> = params
        .all("targetSystem")
        .iter()
        .flat_map(|t| t.split(','))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let settings = state.mpi.clone();
    let asker = Asker::new(&state, &ctx);
    let (eid, refs) = state
        .db
        .run(move |c| {
            let (eid, refs) = mpi::cross_reference(c, &settings, &system, &value, &targets)?;
            if !asker.access_one(c, eid)?.visible {
                // Exactly what an unknown identifier gets: nothing says a person was withheld.
                return Err(
                    Error::not_found("sourceIdentifier Patient Identifier not found")
                        .at("sourceIdentifier"),
                );
            }
            Ok((eid, refs))
        })
        .await?;
    audit_disclosure(&state, &ctx, "ihe-pix", &[eid], req.query_string()).await?;
    let mut parameter = Vec::new();
    for r in &refs {
        parameter.push(json!({ "name": "targetIdentifier", "valueIdentifier": { "system": r.system, "value": r.value } }));
        parameter.push(json!({ "name": "targetId", "valueReference": { "reference": format!("Patient/{}", r.target_id) } }));
    }
    Ok(ok(
        &json!({ "resourceType": "Parameters", "parameter": parameter }),
    ))
}

fn parameter<'a>(params: &'a Value, name: &str) -> Option<&'a Value> {
    params
        .get("parameter")?
        .as_array()?
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
}

/// POST /fhir/Patient/$match
pub async fn match_op(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let input = parse_json(&body)?;
    let (patient, count, only_certain) = match input.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => {
            let patient = parameter(&input, "resource")
                .and_then(|p| p.get("resource"))
                .cloned()
                .ok_or_else(|| {
                    Error::invalid("the 'resource' parameter with a Patient is required")
                        .at("Parameters.parameter")
                })?;
            let count = parameter(&input, "count")
                .and_then(|p| p.get("valueInteger"))
                .and_then(Value::as_u64)
                .unwrap_or(10)
                .clamp(1, 100);
            let only = parameter(&input, "onlyCertainMatches")
                .and_then(|p| p.get("valueBoolean"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            (patient, count as usize, only)
        }
        Some("Patient") => (input, 10, false),
        _ => {
            return Err(
                Error::invalid("send a Parameters resource with a 'resource' Patient")
                    .at("resourceType"),
            )
        }
    };
    let settings = state.mpi.clone();
    let asker = Asker::new(&state, &ctx);
    let (matches, people, break_glass) = state
        .db
        .run(move |c| {
            // Candidates beyond `count` stand in for any that consent withholds.
            let mut m = mpi::match_patient(c, &settings, &patient, count + 50, only_certain)?;
            let eids: Vec<i64> = m.iter().map(|x| x.enterprise_id).collect();
            let (visible, break_glass) = asker.visible(c, &eids)?;
            m.retain(|x| visible.contains(&x.enterprise_id));
            m.truncate(count);
            let eids: Vec<i64> = m.iter().map(|x| x.enterprise_id).collect();
            Ok((m, mpi::people(c, &eids)?, break_glass))
        })
        .await?;
    let eids: Vec<i64> = matches.iter().map(|m| m.enterprise_id).collect();
    audit_disclosure(&state, &ctx, "match", &eids, "").await?;
    let base = state.config.fhir_base();
    let entries: Vec<Value> = matches
        .iter()
        .filter_map(|m| {
            let p = people.iter().find(|p| p.enterprise_id == m.enterprise_id)?;
            Some(json!({
                "fullUrl": format!("{base}/Patient/{}", person_ref(m.enterprise_id)),
                "resource": render_person(&state, p),
                "search": {
                    "mode": "match",
                    "score": m.probability,
                    "extension": [{ "url": MATCH_GRADE_URL, "valueCode": m.grade.code() }]
                }
            }))
        })
        .collect();
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "link": [{ "relation": "self", "url": self_url(&state, &req) }],
        "entry": entries,
    });
    if break_glass {
        mark_break_glass(&mut bundle);
    }
    Ok(ok(&bundle))
}

fn review_json(item: &mpi::ReviewItem) -> Value {
    json!({
        "name": "review",
        "part": [
            { "name": "id", "valueInteger": item.id },
            { "name": "kind", "valueCode": item.kind },
            { "name": "status", "valueCode": item.status },
            { "name": "score", "valueDecimal": (item.score * 10.0).round() / 10.0 },
            { "name": "recordA", "resource": render_source(&item.a) },
            { "name": "recordB", "resource": render_source(&item.b) },
            { "name": "breakdown", "valueString": item.breakdown.to_string() },
            { "name": "created", "valueInstant": crate::time::to_instant(item.created_at) }
        ]
    })
}

/// GET /fhir/Patient/$review-queue?status=open|same|different&_count=&_after=
pub async fn review_queue(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let params = Params::parse(req.query_string(), &["status", "_after"])?;
    let status = params.one("status")?.unwrap_or("open").to_string();
    if !matches!(status.as_str(), "open" | "same" | "different") {
        return Err(Error::invalid("status must be open, same or different").at("status"));
    }
    let after: i64 = params
        .one("_after")?
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let count = params.count(50, 500)?;
    let items = state
        .db
        .run(move |c| mpi::review_queue(c, &status, after, count))
        .await?;
    state
        .auditor
        .record(
            AuditRecord::new(&ctx.actor(), "rest", Action::Execute, "review-queue")
                .entity("Patient/$review-queue")
                .query(req.query_string()),
        )
        .await?;
    Ok(ok(
        &json!({ "resourceType": "Parameters", "parameter": items.iter().map(review_json).collect::<Vec<_>>() }),
    ))
}

fn param_str(p: &Value, name: &str) -> Option<String> {
    let v = parameter(p, name)?;
    ["valueString", "valueCode", "valueId", "valueUri"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_str).map(str::to_string))
        .or_else(|| {
            v.get("valueInteger")
                .and_then(Value::as_i64)
                .map(|i| i.to_string())
        })
        .or_else(|| {
            v.get("valueReference")
                .and_then(|r| r.get("reference"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
}

fn required(p: &Value, name: &str) -> Result<String> {
    param_str(p, name).ok_or_else(|| {
        Error::invalid(format!("parameter '{name}' is required"))
            .at(format!("Parameters.parameter.{name}"))
    })
}

/// POST /fhir/Patient/$resolve-review {review, resolution: same-person | not-same-person}
pub async fn resolve_review(
    ctx: RequestContext,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let p = parse_json(&body)?;
    let id: i64 = required(&p, "review")?
        .parse()
        .map_err(|_| Error::invalid("review must be a review item number"))?;
    let same = match required(&p, "resolution")?.as_str() {
        "same-person" => true,
        "not-same-person" => false,
        _ => {
            return Err(
                Error::invalid("resolution must be same-person or not-same-person")
                    .at("Parameters.parameter.resolution"),
            )
        }
    };
    let actor = ctx.actor();
    let item = state
        .db
        .write(move |c| mpi::resolve_review(c, id, same, &actor))
        .await?;
    Ok(ok(
        &json!({ "resourceType": "Parameters", "parameter": [review_json(&item)] }),
    ))
}

fn person_param(p: &Value, name: &str) -> Result<i64> {
    let v = required(p, name)?;
    mpi::parse_person_ref(&v).ok_or_else(|| {
        Error::invalid(format!(
            "'{name}' must reference a person, e.g. Patient/ent-12"
        ))
    })
}

/// The Parameters answer of a link operation: the resulting person, and a count.
fn link_result(eid: i64, count: Option<(&str, usize)>) -> Value {
    let mut parameter = vec![
        json!({ "name": "result", "valueReference": { "reference": format!("Patient/{}", person_ref(eid)) } }),
    ];
    if let Some((name, n)) = count {
        parameter.push(json!({ "name": name, "valueInteger": n }));
    }
    json!({ "resourceType": "Parameters", "parameter": parameter })
}

/// POST /fhir/Patient/$unlink {source: Patient/src-N}
pub async fn unlink(
    ctx: RequestContext,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let p = parse_json(&body)?;
    let sid = mpi::parse_source_ref(&required(&p, "source")?)
        .ok_or_else(|| Error::invalid("'source' must reference a record, e.g. Patient/src-7"))?;
    let actor = ctx.actor();
    let eid = state.db.write(move |c| mpi::unlink(c, sid, &actor)).await?;
    Ok(ok(&link_result(eid, None)))
}

/// POST /fhir/Patient/$merge {source: Patient/ent-A, target: Patient/ent-B}
pub async fn merge(
    ctx: RequestContext,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let p = parse_json(&body)?;
    let (from, into) = (person_param(&p, "source")?, person_param(&p, "target")?);
    let actor = ctx.actor();
    let moved = state
        .db
        .write(move |c| mpi::merge_identities(c, from, into, &actor))
        .await?;
    Ok(ok(&link_result(into, Some(("moved", moved.len())))))
}

/// POST /fhir/Patient/$unmerge {patient: Patient/ent-A}
pub async fn unmerge(
    ctx: RequestContext,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse> {
    require_operator(&ctx)?;
    let p = parse_json(&body)?;
    let eid = person_param(&p, "patient")?;
    let actor = ctx.actor();
    let restored = state
        .db
        .write(move |c| mpi::unmerge(c, eid, &actor))
        .await?;
    Ok(ok(&link_result(eid, Some(("restored", restored.len())))))
}

/// POST /fhir with a `batch` Bundle of Patient feeds (PUT Patient?identifier=…), each processed
/// on its own, as FHIR batch semantics require.
pub async fn batch(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let bundle = parse_json(&body)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(Error::invalid("POST /fhir takes a Bundle").at("resourceType"));
    }
    match bundle.get("type").and_then(Value::as_str) {
        Some("batch") => {}
        Some("transaction") => {
            return super::documents::transaction(ctx, state, req, bundle).await
        }
        _ => {
            return Err(Error::invalid(
                "Bundle.type must be batch (Patients) or transaction (a document submission, MHD ITI-65)",
            )
            .at("Bundle.type"))
        }
    }
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if entries.len() > 1000 {
        return Err(Error::invalid("at most 1000 entries per batch").at("Bundle.entry"));
    }
    let org = ctx.org.clone();
    let actor = ctx.actor();
    let settings = state.mpi.clone();
    let base = state.config.fhir_base();
    let responses = state
        .db
        .write(move |c| {
            Ok(entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let outcome = batch_entry(c, &settings, &org, &actor, e, i);
                    match outcome {
                        Ok((status, sid, desc)) => json!({ "response": {
                            "status": status,
                            "location": format!("{base}/Patient/{}", source_ref(sid)),
                            "outcome": crate::api::outcome::operation_outcome("information", "informational", &desc, None)
                        } }),
                        Err(e) => json!({ "response": {
                            "status": format!("{}", actix_web::ResponseError::status_code(&e)),
                            "outcome": crate::api::outcome::operation_outcome("error", "invalid", &e.message, e.expression.as_deref())
                        } }),
                    }
                })
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(ok(
        &json!({ "resourceType": "Bundle", "type": "batch-response", "entry": responses }),
    ))
}

fn batch_entry(
    c: &mut crate::db::DbConn,
    settings: &mpi::MpiSettings,
    org: &crate::orgs::Organization,
    actor: &crate::audit::Actor,
    e: &Value,
    i: usize,
) -> Result<(String, i64, String)> {
    let method = e.pointer("/request/method").and_then(Value::as_str);
    let url = e
        .pointer("/request/url")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let ident = url
        .strip_prefix("Patient?identifier=")
        .map(|q| q.replace("%7C", "|").replace("%7c", "|"));
    match (method, ident) {
        (Some("PUT"), Some(q)) => {
            let (s, v) = token(&q, "identifier")?;
            let patient = e.get("resource").ok_or_else(|| {
                Error::invalid("entry has no resource").at(format!("Bundle.entry[{i}].resource"))
            })?;
            let r = mpi::feed(
                c,
                settings,
                org,
                &FeedRequest {
                    system: &s,
                    value: &v,
                    patient,
                },
                actor,
            )?;
            let status = if r.created { "201 Created" } else { "200 OK" };
            Ok((
                status.into(),
                r.source_id,
                format!("{} {}", r.outcome, person_ref(r.enterprise_id)),
            ))
        }
        _ => Err(Error::invalid(
            "each batch entry must be request PUT Patient?identifier=system|value",
        )
        .at(format!("Bundle.entry[{i}].request"))),
    }
}

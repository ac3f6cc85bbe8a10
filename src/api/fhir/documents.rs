//! Document registry endpoints (IHE MHD): ITI-65 submission (transaction Bundle on POST /fhir),
//! ITI-67 DocumentReference search, ITI-66 List search, and ITI-68 retrieve through the broker,
//! which streams the bytes from the member that holds them and checks size and SHA-1 on the way.

use actix_web::body::SizedStream;
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::Stream;
use serde_json::{json, Value};
use std::pin::Pin;
use std::task::{Context, Poll};

use super::guard::{mark_break_glass, Asker, BREAK_GLASS_HEADER};
use super::{base, ok, searchset, self_url, Params};
use crate::api::context::RequestContext;
use crate::api::outcome::fhir;
use crate::api::AppState;
use crate::audit::{Action, AuditRecord, Auditor, Outcome};
use crate::db::documents::{self as store, DocumentRow};
use crate::error::{Error, ErrorKind, Result};
use crate::ids::OrgId;
use crate::mpi::{self, person_ref};
use crate::policy::consent::{labels_of, Access};
use crate::registry::{self, doc_ref, parse_doc_ref, parse_list_ref, search::Criteria};

fn record(ctx: &RequestContext, action: Action, subtype: &str, entity: String) -> AuditRecord {
    AuditRecord::new(&ctx.actor(), "rest", action, subtype).entity(entity)
}

/// What the requester may see of a document: None when consent withholds it (answered exactly
/// like an unknown document), else the access (which says whether break-the-glass was needed).
fn document_access(
    c: &mut crate::db::DbConn,
    asker: &Asker,
    row: &DocumentRow,
    eid: Option<i64>,
) -> Result<Option<Access>> {
    let access = match eid {
        Some(e) => asker.access_one(c, e)?,
        None => Access::open(),
    };
    let labels = serde_json::from_str::<Value>(&row.resource)
        .map(|r| labels_of(&r))
        .unwrap_or_default();
    Ok(access.allows(&labels).then_some(access))
}

/// POST /fhir with a transaction Bundle: ITI-65 Provide Document Bundle.
pub async fn transaction(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    bundle: Value,
) -> Result<HttpResponse> {
    let fhir_base = base(&state, &req);
    let org = ctx.org.clone();
    let actor = ctx.actor();
    let outcome = match registry::plan(&bundle, &org, &fhir_base) {
        Ok(plan) => {
            state
                .db
                .write(move |c| {
                    registry::register(c, &plan, &org, &actor, crate::time::now_micros())
                })
                .await
        }
        Err(e) => Err(e),
    };
    let results = match outcome {
        Ok(r) => r,
        Err(e) => {
            // Nothing was written; the refusal itself is on the record.
            let r = record(&ctx, Action::Create, "ITI-65", "Bundle".into())
                .outcome(Outcome::MinorFailure, e.message.clone());
            if let Err(audit) = state.auditor.record(r).await {
                tracing::error!(error = %audit, "could not audit a refused submission");
            }
            return Err(e);
        }
    };
    let now = crate::time::to_instant(crate::time::now_micros());
    let entries: Vec<Value> = results
        .iter()
        .map(|r| {
            json!({ "response": {
                "status": if r.created { "201 Created" } else { "200 OK" },
                "location": r.location,
                "lastModified": now,
            } })
        })
        .collect();
    Ok(fhir(
        StatusCode::OK,
        &json!({ "resourceType": "Bundle", "type": "transaction-response", "entry": entries }),
    ))
}

/// The person a search is about, from `patient` (a Patient id of the MPI) or
/// `patient.identifier` (any identifier linked to them). None: nobody (an empty result).
pub(super) fn person_of(
    conn: &mut crate::db::DbConn,
    settings: &mpi::MpiSettings,
    patient: Option<&str>,
    identifier: Option<&(String, String)>,
    fhir_base: &str,
) -> Result<Option<i64>> {
    if let Some(p) = patient {
        let local = p
            .strip_prefix(fhir_base)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(p);
        let id = local.strip_prefix("Patient/").unwrap_or(local);
        if let Some(eid) = mpi::parse_person_ref(id) {
            return mpi::current_identity(conn, eid);
        }
        if let Some(sid) = mpi::parse_source_ref(id) {
            return match crate::db::mpi::get_source(conn, sid)? {
                Some(r) if r.status != "deleted" => mpi::current_identity(conn, r.enterprise_id),
                _ => Ok(None),
            };
        }
        return Err(Error::invalid(format!(
            "patient '{p}' is not a Patient id of this exchange: use Patient/ent-N or Patient/src-N from PDQm/PIXm, or patient.identifier=system|value"
        ))
        .at("patient"));
    }
    match identifier {
        Some((s, v)) => mpi::resolve_identifier(conn, settings, s, v),
        None => Ok(None),
    }
}

struct SearchRequest {
    pairs: Vec<(String, String)>,
    patient: Option<String>,
    identifier: Option<(String, String)>,
    master_id: Option<String>,
    count: i64,
    offset: i64,
}

fn search_request(query: &str, allowed: &[&str], documents: bool) -> Result<SearchRequest> {
    let mut with_paging: Vec<&str> = allowed.to_vec();
    with_paging.extend(["_offset", "_sort"]);
    let params = Params::parse(query, &with_paging)?;
    let identifier = params
        .one("patient.identifier")?
        .map(|raw| match raw.split_once('|') {
            Some((s, v)) if !s.is_empty() && !v.is_empty() => Ok((s.to_string(), v.to_string())),
            _ => {
                Err(Error::invalid("patient.identifier must be system|value")
                    .at("patient.identifier"))
            }
        })
        .transpose()?;
    let patient = params.one("patient")?.map(str::to_string);
    let master_id = if documents {
        params
            .one("identifier")?
            .map(|i| i.rsplit('|').next().unwrap_or(i).to_string())
    } else {
        None
    };
    if patient.is_none() && identifier.is_none() && master_id.is_none() {
        return Err(Error::invalid(
            "patient or patient.identifier is required (the person whose documents to find)",
        ));
    }
    let offset = params
        .one("_offset")?
        .map(|o| {
            o.parse::<i64>()
                .map_err(|_| Error::invalid("_offset must be a number").at("_offset"))
        })
        .transpose()?
        .unwrap_or(0)
        .max(0);
    Ok(SearchRequest {
        count: params.count(50, 500)?,
        pairs: params.pairs().to_vec(),
        patient,
        identifier,
        master_id,
        offset,
    })
}

fn next_link(
    base_path: &str,
    query: &str,
    offset: i64,
    count: i64,
    total: usize,
) -> Option<String> {
    ((offset + count) < total as i64).then(|| {
        let q: Vec<&str> = query
            .split('&')
            .filter(|p| !p.starts_with("_offset=") && !p.is_empty())
            .collect();
        format!("{base_path}?{}&_offset={}", q.join("&"), offset + count)
    })
}

async fn find_documents(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    query: String,
) -> Result<HttpResponse> {
    let sr = search_request(&query, &registry::search::DOC_PARAMS, true)?;
    let fhir_base = base(&state, &req);
    let criteria = Criteria::parse(&sr.pairs, true, &fhir_base)?;
    let settings = state.mpi.clone();
    let fb = fhir_base.clone();
    let asker = Asker::new(&state, &ctx);
    let (eid, rows, access) = state
        .db
        .run(move |c| {
            let mut eid = person_of(
                c,
                &settings,
                sr.patient.as_deref(),
                sr.identifier.as_ref(),
                &fb,
            )?;
            let rows: Vec<DocumentRow> = match (eid, &sr.master_id) {
                (Some(eid), _) => {
                    let sources = store::sources_of_identity(c, eid)?;
                    store::documents_of_sources(c, &sources)?
                }
                (None, Some(m)) if sr.patient.is_none() && sr.identifier.is_none() => {
                    let row = store::document_by_master_id(c, m)?;
                    // An identifier-only search is about the one person that document is about.
                    if let Some(r) = &row {
                        eid = registry::person_of_source(c, r.source_id)?;
                    }
                    row.into_iter().filter(|_| eid.is_some()).collect()
                }
                _ => Vec::new(),
            };
            let access = match eid {
                Some(e) => asker.access_one(c, e)?,
                None => Access::open(),
            };
            Ok((eid, rows, access))
        })
        .await?;
    // Consent first: withheld documents are not counted and not paged.
    let mut matched = criteria.documents(if access.visible { rows } else { Vec::new() });
    matched.retain(|(_, r)| access.allows(&labels_of(r)));
    let total = matched.len();
    let page: Vec<&(DocumentRow, Value)> = matched
        .iter()
        .skip(sr.offset as usize)
        .take(sr.count as usize)
        .collect();
    let mut audit = record(&ctx, Action::Execute, "ITI-67", "DocumentReference".into())
        .query(query.clone())
        .outcome(
            if access.visible {
                Outcome::Success
            } else {
                Outcome::MinorFailure
            },
            if access.visible {
                format!("{} of {total} documents disclosed", page.len())
            } else {
                "nothing disclosed: withheld by the patient's consent".to_string()
            },
        );
    if let Some(eid) = eid {
        audit = audit.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(audit).await?;
    let entries = page
        .iter()
        .map(|(row, _)| {
            (
                format!("{fhir_base}/DocumentReference/{}", doc_ref(row.id)),
                registry::render_document(row, &fhir_base),
            )
        })
        .collect();
    let released = access.overridden && !page.is_empty();
    let next = next_link(
        &format!("{fhir_base}/DocumentReference"),
        &query,
        sr.offset,
        sr.count,
        total,
    );
    let mut bundle = searchset(&self_url(&state, &req), Some(total), entries, next);
    if released {
        mark_break_glass(&mut bundle);
    }
    Ok(ok(&bundle))
}

/// GET /fhir/DocumentReference (ITI-67).
pub async fn search(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let query = req.query_string().to_string();
    find_documents(ctx, state, req, query).await
}

/// POST /fhir/DocumentReference/_search with form-encoded parameters (ITI-67).
pub async fn search_post(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse> {
    let form = std::str::from_utf8(&body)
        .map_err(|_| {
            Error::invalid("the search body must be application/x-www-form-urlencoded text")
        })?
        .trim();
    let query = [req.query_string(), form]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("&");
    find_documents(ctx, state, req, query).await
}

/// GET /fhir/DocumentReference/{id}
pub async fn read(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_doc_ref(&path)
        .ok_or_else(|| Error::not_found(format!("DocumentReference/{path} is not registered")))?;
    let asker = Asker::new(&state, &ctx);
    let (row, eid, released) = state
        .db
        .run(move |c| {
            let Some(row) = store::get_document(c, id)? else {
                return Ok((None, None, false));
            };
            let eid = registry::person_of_source(c, row.source_id)?;
            match document_access(c, &asker, &row, eid)? {
                Some(a) => Ok((Some(row), eid, a.overridden)),
                None => Ok((None, None, false)),
            }
        })
        .await?;
    let row = row.ok_or_else(|| {
        Error::not_found(format!(
            "DocumentReference/{} is not registered",
            doc_ref(id)
        ))
    })?;
    let mut audit = record(
        &ctx,
        Action::Read,
        "read",
        format!("DocumentReference/{}", doc_ref(id)),
    );
    if let Some(eid) = eid {
        audit = audit.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(audit).await?;
    let mut doc = registry::render_document(&row, &base(&state, &req));
    if released {
        mark_break_glass(&mut doc);
    }
    Ok(ok(&doc))
}

/// GET /fhir/List (ITI-66: SubmissionSets and Folders).
pub async fn search_lists(
    ctx: RequestContext,
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse> {
    let query = req.query_string().to_string();
    let sr = search_request(&query, &registry::search::LIST_PARAMS, false)?;
    let fhir_base = base(&state, &req);
    let criteria = Criteria::parse(&sr.pairs, false, &fhir_base)?;
    let settings = state.mpi.clone();
    let fb = fhir_base.clone();
    let asker = Asker::new(&state, &ctx);
    let (eid, rows) = state
        .db
        .run(move |c| {
            let eid = person_of(
                c,
                &settings,
                sr.patient.as_deref(),
                sr.identifier.as_ref(),
                &fb,
            )?;
            let visible = match eid {
                Some(e) => asker.access_one(c, e)?.visible,
                None => false,
            };
            let rows = match eid.filter(|_| visible) {
                Some(eid) => {
                    let sources = store::sources_of_identity(c, eid)?;
                    store::lists_of_sources(c, &sources)?
                }
                None => Vec::new(),
            };
            Ok((eid, rows))
        })
        .await?;
    let matched = criteria.lists(rows);
    let total = matched.len();
    let page: Vec<_> = matched
        .iter()
        .skip(sr.offset as usize)
        .take(sr.count as usize)
        .collect();
    let mut audit = record(&ctx, Action::Execute, "ITI-66", "List".into())
        .query(query.clone())
        .outcome(
            Outcome::Success,
            format!("{} of {total} lists disclosed", page.len()),
        );
    if let Some(eid) = eid {
        audit = audit.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(audit).await?;
    let entries = page
        .iter()
        .map(|row| {
            (
                format!("{fhir_base}/List/{}", registry::list_ref(row.id)),
                registry::render_list(row),
            )
        })
        .collect();
    let next = next_link(
        &format!("{fhir_base}/List"),
        &query,
        sr.offset,
        sr.count,
        total,
    );
    Ok(ok(&searchset(
        &self_url(&state, &req),
        Some(total),
        entries,
        next,
    )))
}

/// GET /fhir/List/{id}
pub async fn read_list(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_list_ref(&path)
        .ok_or_else(|| Error::not_found(format!("List/{path} is not registered")))?;
    let asker = Asker::new(&state, &ctx);
    let row = state
        .db
        .run(move |c| {
            let Some(row) = crate::db::documents::list_by_id(c, id)? else {
                return Ok(None);
            };
            let eid = registry::person_of_source(c, row.source_id)?;
            if let Some(e) = eid {
                if !asker.access_one(c, e)?.visible {
                    return Ok(None);
                }
            }
            Ok(Some((row, eid)))
        })
        .await?;
    let (row, eid) =
        row.ok_or_else(|| Error::not_found(format!("List/{path} is not registered")))?;
    let mut audit = record(
        &ctx,
        Action::Read,
        "read",
        format!("List/{}", registry::list_ref(id)),
    );
    if let Some(eid) = eid {
        audit = audit.patient(format!("Patient/{}", person_ref(eid)));
    }
    state.auditor.record(audit).await?;
    Ok(ok(&registry::render_list(&row)))
}

/// GET /fhir/Binary/{id} (ITI-68): streams the document from the member that holds it.
pub async fn retrieve(
    ctx: RequestContext,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse> {
    let id = parse_doc_ref(&path)
        .ok_or_else(|| Error::not_found(format!("Binary/{path} is not a registered document")))?;
    let entity = format!("DocumentReference/{}", doc_ref(id));
    let asker = Asker::new(&state, &ctx);
    let found = state
        .db
        .run(move |c| {
            let Some(row) = store::get_document(c, id)? else {
                return Ok(None);
            };
            let eid = registry::person_of_source(c, row.source_id)?;
            let Some(access) = document_access(c, &asker, &row, eid)? else {
                return Ok(None);
            };
            let holder = crate::orgs::get(c, &OrgId::parse(&row.org_id)?)?;
            Ok(Some((row, eid, holder, access.overridden)))
        })
        .await?;
    let Some((row, eid, holder, released)) = found else {
        return Err(Error::not_found(format!(
            "Binary/{path} is not a registered document"
        )));
    };
    let audit_base = {
        let mut r = record(&ctx, Action::Read, "ITI-68", entity.clone())
            .query(format!("member={}", row.org_id));
        if let Some(eid) = eid {
            r = r.patient(format!("Patient/{}", person_ref(eid)));
        }
        r
    };
    let fail = |e: Error| {
        let r = audit_base
            .clone()
            .outcome(Outcome::MinorFailure, e.message.clone());
        let auditor = state.auditor.clone();
        async move {
            if let Err(a) = auditor.record(r).await {
                tracing::error!(error = %a, "could not audit a failed retrieve");
            }
            e
        }
    };
    if row.status != "current" {
        return Err(fail(Error::new(
            ErrorKind::Gone,
            format!(
                "{entity} is {}: search DocumentReference?relatesto={entity} for the document that replaces it",
                row.status
            ),
        ))
        .await);
    }
    if !holder.as_ref().is_some_and(|h| h.is_active()) {
        return Err(fail(Error::new(
            ErrorKind::BadGateway,
            format!(
                "member '{}' that holds {entity} is not an active member of the exchange",
                row.org_id
            ),
        ))
        .await);
    }
    let response = match state
        .outbound
        .get(&row.org_id, &row.url, &row.content_type)
        .await
    {
        Ok(r) => r,
        Err(e) => return Err(fail(e).await),
    };
    if !response.status().is_success() {
        return Err(fail(Error::new(
            ErrorKind::BadGateway,
            format!(
                "member '{}' answered {} for {entity}; the document may have moved in its repository",
                row.org_id,
                response.status()
            ),
        ))
        .await);
    }
    if let Some(len) = response.content_length() {
        if len != row.size as u64 {
            return Err(fail(Error::new(
                ErrorKind::BadGateway,
                format!(
                    "member '{}' sent {len} bytes for {entity}, but {} bytes were registered: the document was not passed on",
                    row.org_id, row.size
                ),
            ))
            .await);
        }
    }
    let expected_hash = openssl::base64::decode_block(&row.hash).unwrap_or_default();
    // Disclosed from here on: on the record before the first byte leaves.
    state
        .auditor
        .record(audit_base.clone().outcome(
            Outcome::Success,
            format!("{} bytes from member '{}'", row.size, row.org_id),
        ))
        .await?;
    let auditor = state.auditor.clone();
    let on_failure = Box::new(move |why: String| {
        tracing::warn!(reason = %why, "document transfer cut");
        let r = audit_base.outcome(Outcome::SeriousFailure, why);
        tokio::spawn(record_quietly(auditor, r));
    });
    let stream = Verified {
        inner: Box::pin(response.bytes_stream()),
        hasher: openssl::sha::Sha1::new(),
        expected_hash,
        expected_size: row.size as u64,
        seen: 0,
        held: None,
        done: false,
        on_failure: Some(on_failure),
    };
    let mut response = HttpResponse::Ok();
    if released {
        response.insert_header((BREAK_GLASS_HEADER, "released"));
    }
    Ok(response
        .content_type(row.content_type.as_str())
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-store"))
        .body(SizedStream::new(row.size as u64, stream)))
}

async fn record_quietly(auditor: Auditor, r: AuditRecord) {
    if let Err(e) = auditor.record(r).await {
        tracing::error!(error = %e, "could not audit a cut transfer");
    }
}

/// Why a transfer was cut after it started.
#[derive(Debug)]
struct TransferError(String);

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransferError {}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// Passes the member's bytes on while counting and hashing them, one chunk behind: the last
/// chunk is released only once size and SHA-1 match the registry, so a client never receives
/// a complete-looking document that is not the registered one (the connection is cut instead).
struct Verified {
    inner: ByteStream,
    hasher: openssl::sha::Sha1,
    expected_hash: Vec<u8>,
    expected_size: u64,
    seen: u64,
    held: Option<Bytes>,
    done: bool,
    on_failure: Option<Box<dyn FnOnce(String) + Send>>,
}

impl Verified {
    fn fail(&mut self, why: String) -> Poll<Option<Result<Bytes, TransferError>>> {
        self.done = true;
        self.held = None;
        if let Some(f) = self.on_failure.take() {
            f(why.clone());
        }
        Poll::Ready(Some(Err(TransferError(why))))
    }
}

impl Stream for Verified {
    type Item = Result<Bytes, TransferError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.inner.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    this.seen += chunk.len() as u64;
                    if this.seen > this.expected_size {
                        let why = format!(
                            "the member sent more than the {} registered bytes",
                            this.expected_size
                        );
                        return this.fail(why);
                    }
                    this.hasher.update(&chunk);
                    if let Some(previous) = this.held.replace(chunk) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let why = format!(
                        "the transfer from the member failed: {}",
                        crate::outbound::describe(&e)
                    );
                    return this.fail(why);
                }
                Poll::Ready(None) => {
                    if this.seen != this.expected_size {
                        let why = format!(
                            "the member sent {} bytes, {} were registered",
                            this.seen, this.expected_size
                        );
                        return this.fail(why);
                    }
                    let hasher = std::mem::replace(&mut this.hasher, openssl::sha::Sha1::new());
                    if hasher.finish().as_slice() != this.expected_hash.as_slice() {
                        return this
                            .fail("the document's SHA-1 differs from the registered hash".into());
                    }
                    this.done = true;
                    return Poll::Ready(this.held.take().map(Ok));
                }
            }
        }
    }
}

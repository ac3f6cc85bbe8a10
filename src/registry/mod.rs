//! The document registry (IHE MHD): members register metadata of documents that stay in their
//! own repositories (ITI-65), consumers find them across the region (ITI-67, ITI-66) and fetch
//! them through the broker (ITI-68, see `api::fhir::documents`).
//!
//! A submission is checked in two steps: `plan` validates the Bundle on its own (structure,
//! required metadata, attachment rules, who may submit what) without touching the database;
//! `register` then resolves patients and relations and writes everything in the caller's
//! transaction, so any error leaves nothing behind.

pub mod search;

use serde_json::{json, Value};

use crate::audit::{Action, Actor, AuditRecord, Outcome};
use crate::db::documents::{self as store, DocumentRow, ListRow, NewDocument, NewList};
use crate::db::{self, DbConn};
use crate::error::{Error, ErrorKind, Result};
use crate::mpi::{self, person_ref, source_ref};
use crate::orgs::Organization;

pub const LIST_TYPES: &str = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes";
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const CONFIDENTIALITY_CODES: [&str; 6] = ["U", "L", "M", "N", "R", "V"];
const RELATION_CODES: [&str; 4] = ["replaces", "transforms", "signs", "appends"];

pub fn doc_ref(id: i64) -> String {
    format!("doc-{id}")
}

pub fn parse_doc_ref(s: &str) -> Option<i64> {
    s.strip_prefix("doc-")?
        .parse()
        .ok()
        .filter(|n: &i64| *n > 0)
}

pub fn list_ref(id: i64) -> String {
    format!("list-{id}")
}

pub fn parse_list_ref(s: &str) -> Option<i64> {
    s.strip_prefix("list-")?
        .parse()
        .ok()
        .filter(|n: &i64| *n > 0)
}

/// Where the subject of a submitted resource points.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    Source(i64),
    Person(i64),
    Identifier(String, String),
}

/// A relation to a registered document (relatesTo).
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Id(i64),
    MasterId(String),
}

#[derive(Debug, Clone)]
pub struct PlannedDocument {
    pub index: usize,
    pub full_url: Option<String>,
    pub master_id: String,
    pub subject: Subject,
    pub date: Option<i64>,
    pub content_type: String,
    pub url: String,
    pub size: i64,
    pub hash: String,
    pub relations: Vec<(String, Target)>,
    pub digest: String,
    pub resource: Value,
}

#[derive(Debug, Clone)]
pub struct PlannedList {
    pub index: usize,
    pub kind: String,
    pub master_id: String,
    pub subject: Subject,
    pub date: Option<i64>,
    /// fullUrls of the bundle entries this List names.
    pub items: Vec<String>,
    pub digest: String,
    pub resource: Value,
}

#[derive(Debug, Clone)]
pub struct StatusChange {
    pub index: usize,
    pub id: i64,
    pub status: String,
}

/// A validated ITI-65 submission, not yet written.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub documents: Vec<PlannedDocument>,
    pub lists: Vec<PlannedList>,
    pub changes: Vec<StatusChange>,
    pub entries: usize,
}

fn at(i: usize, path: &str) -> String {
    if path.is_empty() {
        format!("Bundle.entry[{i}].resource")
    } else {
        format!("Bundle.entry[{i}].resource.{path}")
    }
}

fn has_code(cc: Option<&Value>) -> bool {
    cc.and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .is_some_and(|codings| {
            codings.iter().any(|c| {
                c.get("code")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.trim().is_empty())
            })
        })
}

/// SHA-256 over the canonical JSON of a resource without its server-assigned parts: two
/// submissions of the same content have the same digest.
fn digest(resource: &Value) -> String {
    let mut r = resource.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    hex::encode(openssl::sha::sha256(r.to_string().as_bytes()))
}

/// A FHIR `instant` or `dateTime` (with time zone) as microseconds; partial dates at their start.
pub fn parse_datetime(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_micros());
    }
    search::date_range(s).map(|(start, _)| start)
}

/// Strips our own base URL (absolute references) and returns `Type/id`.
fn local_reference<'a>(reference: &'a str, fhir_base: &str) -> &'a str {
    reference
        .strip_prefix(fhir_base)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(reference)
}

fn subject_of(resource: &Value, i: usize, fhir_base: &str) -> Result<Subject> {
    let subject = resource.get("subject").ok_or_else(|| {
        Error::invalid("subject is required: the patient the document is about")
            .at(at(i, "subject"))
    })?;
    if let Some(reference) = subject.get("reference").and_then(Value::as_str) {
        let local = local_reference(reference, fhir_base);
        let id = local.strip_prefix("Patient/").unwrap_or_default();
        if let Some(n) = mpi::parse_source_ref(id) {
            return Ok(Subject::Source(n));
        }
        if let Some(n) = mpi::parse_person_ref(id) {
            return Ok(Subject::Person(n));
        }
        return Err(Error::new(
            ErrorKind::Unprocessable,
            format!("XDSUnknownPatientId: subject '{reference}' is not a Patient of this exchange; use a Patient the MPI returned (Patient/src-N or Patient/ent-N) or an identifier in your own system"),
        )
        .at(at(i, "subject.reference")));
    }
    let ident = subject.get("identifier");
    match (
        ident.and_then(|x| x.get("system")).and_then(Value::as_str),
        ident.and_then(|x| x.get("value")).and_then(Value::as_str),
    ) {
        (Some(s), Some(v)) if !s.is_empty() && !v.is_empty() => {
            Ok(Subject::Identifier(s.to_string(), v.to_string()))
        }
        _ => Err(Error::invalid(
            "subject needs a reference (Patient/src-N or Patient/ent-N) or an identifier with system and value",
        )
        .at(at(i, "subject"))),
    }
}

fn date_of(resource: &Value, i: usize, field: &str, required: bool) -> Result<Option<i64>> {
    match resource.get(field) {
        None if required => Err(Error::invalid(format!(
            "{field} is required (when the document was created, e.g. 2026-01-31T10:00:00Z)"
        ))
        .at(at(i, field))),
        None => Ok(None),
        Some(v) => v
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| Some(t.timestamp_micros()))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "{field} must be a FHIR instant with a time zone, e.g. 2026-01-31T10:00:00Z"
                ))
                .at(at(i, field))
            }),
    }
}

/// `master_id` of a List: its uniqueId identifier (use `usual`), else its first identifier.
fn list_unique_id(resource: &Value) -> Option<String> {
    let ids = resource.get("identifier")?.as_array()?;
    let pick = ids
        .iter()
        .find(|x| x.get("use").and_then(Value::as_str) == Some("usual"))
        .or_else(|| ids.first())?;
    pick.get("value")
        .and_then(Value::as_str)
        .filter(|v| !v.trim().is_empty())
        .map(str::to_string)
}

fn check_own_org(
    reference: Option<&str>,
    org: &Organization,
    what: &str,
    path: String,
) -> Result<()> {
    let Some(reference) = reference else {
        return Ok(());
    };
    let own = format!("Organization/{}", org.id);
    if reference == own || reference.ends_with(&format!("/{own}")) {
        Ok(())
    } else {
        Err(Error::forbidden(format!(
            "{what} is '{reference}', but this submission comes from '{own}': a member registers only its own documents"
        ))
        .at(path))
    }
}

/// The attachment rules: content stays at the source.
fn check_attachment(
    att: &Value,
    i: usize,
    org: &Organization,
) -> Result<(String, String, i64, String)> {
    let path = |f: &str| at(i, &format!("content[0].attachment.{f}"));
    if att.get("data").is_some() {
        return Err(Error::invalid(
            "attachment.data is not accepted: this exchange registers metadata only and the document stays in your repository; \
             give attachment.url (where the broker can fetch it), size and hash instead",
        )
        .at(path("data")));
    }
    let content_type = att
        .get("contentType")
        .and_then(Value::as_str)
        .filter(|s| s.contains('/') && !s.contains(char::is_control))
        .ok_or_else(|| {
            Error::invalid("attachment.contentType is required, e.g. application/pdf")
                .at(path("contentType"))
        })?;
    let url = att.get("url").and_then(Value::as_str).ok_or_else(|| {
        Error::invalid(
            "attachment.url is required: where the document can be fetched in your repository",
        )
        .at(path("url"))
    })?;
    let Some(base) = org.fhir_base.as_deref() else {
        return Err(Error::invalid(format!(
            "organisation '{}' has no registered FHIR base, so its documents cannot be fetched; ask the exchange operator to register your endpoint",
            org.id
        ))
        .at(path("url")));
    };
    let base = base.trim_end_matches('/');
    let under_base = url
        .strip_prefix(base)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1);
    let traversal = url.split(['/', '?']).any(|seg| seg == ".." || seg == ".");
    if !under_base || traversal || url.contains(char::is_whitespace) || url.contains('#') {
        return Err(Error::invalid(format!(
            "attachment.url '{url}' is not under your registered FHIR base {base}/: the broker fetches documents only from the member that holds them"
        ))
        .at(path("url")));
    }
    let size = att
        .get("size")
        .and_then(Value::as_i64)
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            Error::invalid("attachment.size is required: the document's length in bytes")
                .at(path("size"))
        })?;
    let hash = att.get("hash").and_then(Value::as_str).ok_or_else(|| {
        Error::invalid("attachment.hash is required: the SHA-1 of the document, base64")
            .at(path("hash"))
    })?;
    match openssl::base64::decode_block(hash) {
        Ok(bytes) if bytes.len() == 20 => {}
        _ => {
            return Err(Error::invalid(format!(
                "attachment.hash '{hash}' is not a base64 SHA-1 (20 bytes, 28 characters)"
            ))
            .at(path("hash")))
        }
    }
    Ok((
        content_type.to_string(),
        url.to_string(),
        size,
        hash.to_string(),
    ))
}

fn plan_document(
    e: &Value,
    i: usize,
    org: &Organization,
    fhir_base: &str,
) -> Result<PlannedDocument> {
    let r = &e["resource"];
    let master_id = r
        .pointer("/masterIdentifier/value")
        .and_then(Value::as_str)
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| {
            Error::invalid("masterIdentifier.value is required: the document's unique id")
                .at(at(i, "masterIdentifier"))
        })?
        .to_string();
    match r.get("status").and_then(Value::as_str) {
        Some("current") => {}
        Some(other) => {
            return Err(Error::invalid(format!(
                "status '{other}' cannot be submitted: a new document is 'current' (to retire one, replace it or mark it entered-in-error)"
            ))
            .at(at(i, "status")))
        }
        None => return Err(Error::invalid("status is required ('current')").at(at(i, "status"))),
    }
    if !has_code(r.get("type")) {
        return Err(Error::invalid(
            "type is required: a CodeableConcept with a coding (e.g. LOINC 11506-3 Progress note)",
        )
        .at(at(i, "type")));
    }
    let category_ok = r
        .get("category")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty() && c.iter().all(|cc| has_code(Some(cc))));
    if !category_ok {
        return Err(Error::invalid(
            "category is required: at least one CodeableConcept with a coding (the document class)",
        )
        .at(at(i, "category")));
    }
    let date = date_of(r, i, "date", true)?;
    let labels = r.get("securityLabel").and_then(Value::as_array);
    let confidentiality = labels.is_some_and(|ls| {
        ls.iter().any(|l| {
            l.get("coding").and_then(Value::as_array).is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.get("system").and_then(Value::as_str) == Some(CONFIDENTIALITY)
                        && c.get("code")
                            .and_then(Value::as_str)
                            .is_some_and(|code| CONFIDENTIALITY_CODES.contains(&code))
                })
            })
        })
    });
    if !confidentiality {
        return Err(Error::invalid(format!(
            "securityLabel must carry the document's confidentiality: a coding from {CONFIDENTIALITY} (U, L, M, N, R or V)"
        ))
        .at(at(i, "securityLabel")));
    }
    let contents = r.get("content").and_then(Value::as_array);
    let content = match contents.map(Vec::as_slice) {
        Some([one]) => one,
        Some([]) | None => return Err(Error::invalid("content is required: one attachment with its url").at(at(i, "content"))),
        Some(_) => {
            return Err(Error::invalid(
                "this exchange registers one content (attachment) per DocumentReference; register other formats as separate documents",
            )
            .at(at(i, "content")))
        }
    };
    let format_ok = content
        .get("format")
        .and_then(|f| f.get("code"))
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty());
    if !format_ok {
        return Err(Error::invalid("content.format is required: a Coding of the document's format (e.g. urn:ihe:iti:xds:2017:mimeTypeSufficient)").at(at(i, "content[0].format")));
    }
    let att = content.get("attachment").ok_or_else(|| {
        Error::invalid("content.attachment is required").at(at(i, "content[0].attachment"))
    })?;
    let (content_type, url, size, hash) = check_attachment(att, i, org)?;
    let subject = subject_of(r, i, fhir_base)?;
    check_own_org(
        r.pointer("/custodian/reference").and_then(Value::as_str),
        org,
        "custodian",
        at(i, "custodian"),
    )?;
    for (k, a) in r
        .get("author")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if let Some(reference) = a.get("reference").and_then(Value::as_str) {
            if local_reference(reference, fhir_base).starts_with("Organization/") {
                check_own_org(
                    Some(reference),
                    org,
                    "author",
                    at(i, &format!("author[{k}]")),
                )?;
            }
        }
    }
    let mut relations = Vec::new();
    for (k, rel) in r
        .get("relatesTo")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = at(i, &format!("relatesTo[{k}]"));
        let code = rel.get("code").and_then(Value::as_str).unwrap_or_default();
        if !RELATION_CODES.contains(&code) {
            return Err(Error::invalid(format!(
                "relatesTo.code '{code}' is not one of replaces, transforms, signs, appends"
            ))
            .at(path));
        }
        let target =
            if let Some(reference) = rel.pointer("/target/reference").and_then(Value::as_str) {
                local_reference(reference, fhir_base)
                    .strip_prefix("DocumentReference/")
                    .and_then(parse_doc_ref)
                    .map(Target::Id)
            } else {
                rel.pointer("/target/identifier/value")
                    .and_then(Value::as_str)
                    .map(|v| Target::MasterId(v.to_string()))
            };
        let target = target.ok_or_else(|| {
            Error::invalid("relatesTo.target must reference a registered DocumentReference (DocumentReference/doc-N) or give its masterIdentifier as target.identifier").at(format!("{path}.target"))
        })?;
        relations.push((code.to_string(), target));
    }
    Ok(PlannedDocument {
        index: i,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(str::to_string),
        master_id,
        subject,
        date,
        content_type,
        url,
        size,
        hash,
        relations,
        digest: digest(r),
        resource: r.clone(),
    })
}

fn plan_list(e: &Value, i: usize, org: &Organization, fhir_base: &str) -> Result<PlannedList> {
    let r = &e["resource"];
    let kind = r
        .pointer("/code/coding")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter().find_map(|c| {
                let code = c.get("code").and_then(Value::as_str)?;
                (c.get("system").and_then(Value::as_str) == Some(LIST_TYPES)
                    && (code == "submissionset" || code == "folder"))
                    .then(|| code.to_string())
            })
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "a List in a submission must be a SubmissionSet or a Folder: code {LIST_TYPES}#submissionset or #folder"
            ))
            .at(at(i, "code"))
        })?;
    let master_id = list_unique_id(r).ok_or_else(|| {
        Error::invalid("identifier is required: the uniqueId of the SubmissionSet (identifier with use 'usual')")
            .at(at(i, "identifier"))
    })?;
    if r.get("status").and_then(Value::as_str) != Some("current") {
        return Err(Error::invalid("List.status must be 'current'").at(at(i, "status")));
    }
    if r.get("mode").and_then(Value::as_str) != Some("working") {
        return Err(Error::invalid("List.mode must be 'working'").at(at(i, "mode")));
    }
    let date = date_of(r, i, "date", kind == "submissionset")?;
    let subject = subject_of(r, i, fhir_base)?;
    check_own_org(
        r.pointer("/source/reference")
            .and_then(Value::as_str)
            .filter(|s| local_reference(s, fhir_base).starts_with("Organization/")),
        org,
        "source",
        at(i, "source"),
    )?;
    let mut items = Vec::new();
    for (k, item) in r
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let reference = item
            .pointer("/item/reference")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                Error::invalid("List.entry.item.reference is required")
                    .at(at(i, &format!("entry[{k}].item")))
            })?;
        items.push(reference.to_string());
    }
    Ok(PlannedList {
        index: i,
        kind,
        master_id,
        subject,
        date,
        items,
        digest: digest(r),
        resource: r.clone(),
    })
}

/// Validates a transaction Bundle as an ITI-65 submission, without touching the database.
pub fn plan(bundle: &Value, org: &Organization, fhir_base: &str) -> Result<Plan> {
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    if entries.is_empty() {
        return Err(Error::invalid("the transaction has no entries").at("Bundle.entry"));
    }
    if entries.len() > 1000 {
        return Err(Error::invalid("at most 1000 entries per transaction").at("Bundle.entry"));
    }
    let mut plan = Plan {
        entries: entries.len(),
        ..Plan::default()
    };
    for (i, e) in entries.iter().enumerate() {
        let kind = e.pointer("/resource/resourceType").and_then(Value::as_str);
        let method = e.pointer("/request/method").and_then(Value::as_str);
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or_default();
        match (kind, method) {
            (Some("DocumentReference"), Some("POST")) => {
                plan.documents.push(plan_document(e, i, org, fhir_base)?)
            }
            (Some("List"), Some("POST")) => plan.lists.push(plan_list(e, i, org, fhir_base)?),
            (Some("DocumentReference"), Some("PUT")) => {
                let id = url
                    .strip_prefix("DocumentReference/")
                    .and_then(parse_doc_ref)
                    .ok_or_else(|| {
                        Error::invalid("a PUT entry must name a registered document: request.url DocumentReference/doc-N")
                            .at(format!("Bundle.entry[{i}].request.url"))
                    })?;
                let status = e.pointer("/resource/status").and_then(Value::as_str).unwrap_or_default();
                if status != "entered-in-error" {
                    return Err(Error::invalid(
                        "a registered document can only be updated to status 'entered-in-error'; to change its content, submit a new one that replaces it",
                    )
                    .at(at(i, "status")));
                }
                plan.changes.push(StatusChange {
                    index: i,
                    id,
                    status: status.to_string(),
                });
            }
            (Some("Binary"), _) => {
                return Err(Error::invalid(
                    "Binary entries are not accepted: documents stay in your repository; register a DocumentReference whose attachment.url points there",
                )
                .at(format!("Bundle.entry[{i}]")))
            }
            (Some("Patient"), _) => {
                return Err(Error::invalid(
                    "Patient entries are not accepted in a document submission: feed patients with PUT /fhir/Patient?identifier=… (PIXm ITI-104) and reference the Patient the MPI returned",
                )
                .at(format!("Bundle.entry[{i}]")))
            }
            (Some(t), Some(m)) => {
                return Err(Error::invalid(format!(
                    "{m} {t} is not part of a document submission: POST DocumentReference and List (SubmissionSet, Folder), or PUT DocumentReference/doc-N to mark it entered-in-error"
                ))
                .at(format!("Bundle.entry[{i}]")))
            }
            _ => {
                return Err(Error::invalid("each entry needs a resource and request.method")
                    .at(format!("Bundle.entry[{i}]")))
            }
        }
    }
    let submission_sets = plan
        .lists
        .iter()
        .filter(|l| l.kind == "submissionset")
        .count();
    if !plan.documents.is_empty() && submission_sets != 1 {
        return Err(Error::invalid(
            "a submission of documents needs exactly one SubmissionSet List (code submissionset)",
        )
        .at("Bundle.entry"));
    }
    if submission_sets > 1 {
        return Err(Error::invalid("only one SubmissionSet per transaction").at("Bundle.entry"));
    }
    let full_urls: Vec<&str> = plan
        .documents
        .iter()
        .filter_map(|d| d.full_url.as_deref())
        .collect();
    for l in &plan.lists {
        for (k, item) in l.items.iter().enumerate() {
            if !full_urls.contains(&item.as_str()) {
                return Err(Error::invalid(format!(
                    "List entry '{item}' does not name a DocumentReference of this transaction (by its fullUrl)"
                ))
                .at(at(l.index, &format!("entry[{k}].item.reference"))));
            }
        }
    }
    for d in &plan.documents {
        let named = d.full_url.as_ref().is_some_and(|u| {
            plan.lists
                .iter()
                .any(|l| l.kind == "submissionset" && l.items.contains(u))
        });
        if !named {
            return Err(Error::invalid(
                "every DocumentReference must be an entry of the SubmissionSet (List.entry.item referencing its fullUrl)",
            )
            .at(format!("Bundle.entry[{}]", d.index)));
        }
    }
    let mut ids: Vec<&str> = plan
        .documents
        .iter()
        .map(|d| d.master_id.as_str())
        .collect();
    ids.sort_unstable();
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::invalid(
            "two DocumentReferences of this transaction have the same masterIdentifier",
        )
        .at("Bundle.entry"));
    }
    Ok(plan)
}

/// What happened to one entry of the submission.
#[derive(Debug, Clone)]
pub struct EntryResult {
    pub index: usize,
    pub created: bool,
    /// `DocumentReference/doc-N` or `List/list-N`.
    pub location: String,
}

/// The person a source record belongs to now (None if it was deleted or retired).
pub fn person_of_source(conn: &mut DbConn, source_id: i64) -> Result<Option<i64>> {
    match crate::db::mpi::get_source(conn, source_id)? {
        Some(s) => mpi::current_identity(conn, s.enterprise_id),
        None => Ok(None),
    }
}

/// The registered subject: a source record and the person it belongs to now.
fn resolve_subject(
    conn: &mut DbConn,
    subject: &Subject,
    org: &Organization,
    i: usize,
) -> Result<(i64, i64)> {
    let unknown = |what: String| {
        Error::new(
            ErrorKind::Unprocessable,
            format!("XDSUnknownPatientId: {what} is not known to the MPI; feed the patient first (PUT /fhir/Patient?identifier=…)"),
        )
        .at(at(i, "subject"))
    };
    let row = match subject {
        Subject::Source(id) => crate::db::mpi::get_source(conn, *id)?
            .filter(|r| r.status != "deleted")
            .ok_or_else(|| unknown(format!("Patient/{}", source_ref(*id))))?,
        Subject::Person(eid) => {
            let current = mpi::current_identity(conn, *eid)?
                .ok_or_else(|| unknown(format!("Patient/{}", person_ref(*eid))))?;
            let members = crate::db::mpi::members(conn, current)?;
            members
                .iter()
                .find(|m| m.org_id == org.id.as_str())
                .or_else(|| members.first())
                .cloned()
                .ok_or_else(|| unknown(format!("Patient/{}", person_ref(*eid))))?
        }
        Subject::Identifier(system, value) => {
            if crate::db::orgs::system_owner(conn, system)?.as_deref() != Some(org.id.as_str()) {
                return Err(Error::forbidden(format!(
                    "subject.identifier system '{system}' is not one of organisation '{}''s identifier systems; reference the Patient the MPI returned instead",
                    org.id
                ))
                .at(at(i, "subject.identifier")));
            }
            crate::db::mpi::find_source(conn, system, value)?
                .filter(|r| r.status != "deleted")
                .ok_or_else(|| unknown(format!("patient {system}|{value}")))?
        }
    };
    let eid = mpi::current_identity(conn, row.enterprise_id)?
        .ok_or_else(|| unknown(format!("Patient/{}", source_ref(row.id))))?;
    Ok((row.id, eid))
}

fn find_target(conn: &mut DbConn, target: &Target) -> Result<Option<DocumentRow>> {
    match target {
        Target::Id(id) => store::get_document(conn, *id),
        Target::MasterId(m) => store::document_by_master_id(conn, m),
    }
}

/// The document as the registry keeps it: the submission, with the subject resolved, the
/// custodian named and relations pointing at registered ids.
fn stored_document(
    d: &PlannedDocument,
    org: &Organization,
    source_id: i64,
    targets: &[i64],
) -> Value {
    let mut r = d.resource.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    r["subject"] = json!({ "reference": format!("Patient/{}", source_ref(source_id)) });
    r["custodian"] = json!({ "reference": format!("Organization/{}", org.id) });
    if let Some(rels) = r.get_mut("relatesTo").and_then(Value::as_array_mut) {
        for (rel, id) in rels.iter_mut().zip(targets) {
            rel["target"] = json!({ "reference": format!("DocumentReference/{}", doc_ref(*id)) });
        }
    }
    r
}

/// Writes a planned submission in the caller's transaction (all or nothing), with its audit record.
pub fn register(
    conn: &mut DbConn,
    plan: &Plan,
    org: &Organization,
    actor: &Actor,
    now: i64,
) -> Result<Vec<EntryResult>> {
    let mut results: Vec<EntryResult> = Vec::new();
    let mut person: Option<i64> = None;
    let mut same_patient = |eid: i64, i: usize| -> Result<()> {
        match person {
            Some(p) if p != eid => Err(Error::new(
                ErrorKind::Unprocessable,
                "XDSPatientIdDoesNotMatch: every document and the SubmissionSet of one submission must be about the same patient",
            )
            .at(at(i, "subject"))),
            _ => {
                person = Some(eid);
                Ok(())
            }
        }
    };
    // Subjects first, so that an unknown patient fails before anything else is looked at.
    let mut doc_subjects = Vec::new();
    for d in &plan.documents {
        let (sid, eid) = resolve_subject(conn, &d.subject, org, d.index)?;
        same_patient(eid, d.index)?;
        doc_subjects.push(sid);
    }
    let mut list_subjects = Vec::new();
    for l in &plan.lists {
        let (sid, eid) = resolve_subject(conn, &l.subject, org, l.index)?;
        same_patient(eid, l.index)?;
        list_subjects.push(sid);
    }
    // The SubmissionSet (and folders) first: documents point at it.
    let mut list_ids = Vec::new();
    for (l, sid) in plan.lists.iter().zip(&list_subjects) {
        match store::list_by_master_id(conn, &l.master_id)? {
            Some(existing) if existing.digest == l.digest && existing.org_id == org.id.as_str() => {
                list_ids.push((existing.id, false));
            }
            Some(_) => {
                return Err(Error::conflict(format!(
                    "XDSDuplicateUniqueIdInRegistry: a different List with identifier '{}' is already registered",
                    l.master_id
                ))
                .at(at(l.index, "identifier")))
            }
            None => {
                let id = store::insert_list(
                    conn,
                    &NewList {
                        master_id: l.master_id.clone(),
                        kind: l.kind.clone(),
                        org_id: org.id.to_string(),
                        source_id: *sid,
                        status: "current".into(),
                        list_date: l.date,
                        digest: l.digest.clone(),
                        resource: "{}".into(),
                        created_at: now,
                    },
                )?;
                list_ids.push((id, true));
            }
        }
    }
    let submission_set = plan
        .lists
        .iter()
        .zip(&list_ids)
        .find(|(l, _)| l.kind == "submissionset")
        .map(|(_, (id, _))| *id);
    let mut doc_ids: Vec<(Option<String>, i64)> = Vec::new();
    let mut superseded = Vec::new();
    for (d, sid) in plan.documents.iter().zip(&doc_subjects) {
        if let Some(existing) = store::document_by_master_id(conn, &d.master_id)? {
            if existing.digest == d.digest && existing.org_id == org.id.as_str() {
                doc_ids.push((d.full_url.clone(), existing.id));
                results.push(EntryResult {
                    index: d.index,
                    created: false,
                    location: format!("DocumentReference/{}", doc_ref(existing.id)),
                });
                continue;
            }
            return Err(Error::conflict(format!(
                "XDSDuplicateUniqueIdInRegistry: a different document with masterIdentifier '{}' is already registered",
                d.master_id
            ))
            .at(at(d.index, "masterIdentifier")));
        }
        let mut targets = Vec::new();
        for (k, (code, target)) in d.relations.iter().enumerate() {
            let path = at(d.index, &format!("relatesTo[{k}].target"));
            let t = find_target(conn, target)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Unprocessable,
                    "XDSUnknownDocument: relatesTo.target is not a registered document",
                )
                .at(path.clone())
            })?;
            if code == "replaces" {
                if t.org_id != org.id.as_str() {
                    return Err(Error::forbidden(format!(
                        "DocumentReference/{} was registered by '{}': only its author may replace it",
                        doc_ref(t.id),
                        t.org_id
                    ))
                    .at(path));
                }
                if t.status != "current" {
                    return Err(Error::new(
                        ErrorKind::Unprocessable,
                        format!(
                            "XDSMetadataUpdateError: DocumentReference/{} is {} and cannot be replaced again",
                            doc_ref(t.id),
                            t.status
                        ),
                    )
                    .at(path));
                }
                let t_eid = person_of_source(conn, t.source_id)?;
                if t_eid != person {
                    return Err(Error::new(
                        ErrorKind::Unprocessable,
                        "XDSPatientIdDoesNotMatch: a replacement must be about the same patient as the document it replaces",
                    )
                    .at(path));
                }
                superseded.push(t.id);
            }
            targets.push(t.id);
        }
        let resource = stored_document(d, org, *sid, &targets);
        let id = store::insert_document(
            conn,
            &NewDocument {
                master_id: d.master_id.clone(),
                org_id: org.id.to_string(),
                source_id: *sid,
                list_id: submission_set,
                status: "current".into(),
                doc_date: d.date,
                content_type: d.content_type.clone(),
                url: d.url.clone(),
                size: d.size,
                hash: d.hash.clone(),
                digest: d.digest.clone(),
                resource: resource.to_string(),
                created_at: now,
                updated_at: now,
            },
        )?;
        doc_ids.push((d.full_url.clone(), id));
        results.push(EntryResult {
            index: d.index,
            created: true,
            location: format!("DocumentReference/{}", doc_ref(id)),
        });
    }
    superseded.sort_unstable();
    superseded.dedup();
    for id in &superseded {
        store::set_document_status(conn, *id, "superseded", now)?;
    }
    for ch in &plan.changes {
        let t = store::get_document(conn, ch.id)?.ok_or_else(|| {
            Error::not_found(format!(
                "DocumentReference/{} is not registered",
                doc_ref(ch.id)
            ))
            .at(format!("Bundle.entry[{}].request.url", ch.index))
        })?;
        if t.org_id != org.id.as_str() {
            return Err(Error::forbidden(format!(
                "DocumentReference/{} was registered by '{}': only its author may mark it entered-in-error",
                doc_ref(t.id),
                t.org_id
            ))
            .at(format!("Bundle.entry[{}].request.url", ch.index)));
        }
        store::set_document_status(conn, t.id, &ch.status, now)?;
        if person.is_none() {
            person = person_of_source(conn, t.source_id)?;
        }
        results.push(EntryResult {
            index: ch.index,
            created: false,
            location: format!("DocumentReference/{}", doc_ref(t.id)),
        });
    }
    for ((l, (id, created)), sid) in plan.lists.iter().zip(&list_ids).zip(&list_subjects) {
        if *created {
            let mut r = l.resource.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("id");
                o.remove("meta");
            }
            r["subject"] = json!({ "reference": format!("Patient/{}", source_ref(*sid)) });
            if let Some(entries) = r.get_mut("entry").and_then(Value::as_array_mut) {
                for e in entries.iter_mut() {
                    let item = e
                        .pointer("/item/reference")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    if let Some((_, doc)) = doc_ids
                        .iter()
                        .find(|(u, _)| u.is_some() && u.as_deref() == item.as_deref())
                    {
                        e["item"] =
                            json!({ "reference": format!("DocumentReference/{}", doc_ref(*doc)) });
                    }
                }
            }
            store::set_list_resource(conn, *id, &r.to_string())?;
        }
        results.push(EntryResult {
            index: l.index,
            created: *created,
            location: format!("List/{}", list_ref(*id)),
        });
    }
    results.sort_by_key(|r| r.index);
    let created = results.iter().filter(|r| r.created).count();
    let mut record = AuditRecord::new(actor, "rest", Action::Create, "ITI-65")
        .entity(
            submission_set
                .map(|id| format!("List/{}", list_ref(id)))
                .unwrap_or_else(|| "DocumentReference".into()),
        )
        .query(
            results
                .iter()
                .map(|r| r.location.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .outcome(
            Outcome::Success,
            format!(
                "{created} registered, {} unchanged, {} superseded, {} marked entered-in-error",
                results.len() - created - plan.changes.len(),
                superseded.len(),
                plan.changes.len()
            ),
        );
    if let Some(eid) = person {
        record = record.patient(format!("Patient/{}", person_ref(eid)));
    }
    db::audit::append(conn, &[record])?;
    Ok(results)
}

/// A registered document as a FHIR DocumentReference, with its attachment URL pointing at the
/// broker's retrieve endpoint.
pub fn render_document(row: &DocumentRow, fhir_base: &str) -> Value {
    let mut r: Value = serde_json::from_str(&row.resource)
        .unwrap_or_else(|_| json!({ "resourceType": "DocumentReference" }));
    r["resourceType"] = json!("DocumentReference");
    r["id"] = json!(doc_ref(row.id));
    r["meta"] = json!({
        "lastUpdated": crate::time::to_instant(row.updated_at),
        "source": format!("Organization/{}", row.org_id),
    });
    r["status"] = json!(row.status);
    if let Some(att) = r.pointer_mut("/content/0/attachment") {
        att["url"] = json!(format!("{fhir_base}/Binary/{}", doc_ref(row.id)));
    }
    r
}

pub fn render_list(row: &ListRow) -> Value {
    let mut r: Value =
        serde_json::from_str(&row.resource).unwrap_or_else(|_| json!({ "resourceType": "List" }));
    r["resourceType"] = json!("List");
    r["id"] = json!(list_ref(row.id));
    r["meta"] = json!({
        "lastUpdated": crate::time::to_instant(row.created_at),
        "source": format!("Organization/{}", row.org_id),
    });
    r
}

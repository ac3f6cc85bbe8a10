//! The master patient index: members feed their own patients (source records, one per member
//! identifier); each arriving record is matched online against candidates found by blocking
//! keys, scored with Fellegi–Sunter weights, and linked to an enterprise identity, queued for
//! review, or given a new identity. Every decision keeps its score breakdown and is audited in
//! the same transaction.

pub mod bulk;
pub mod estimate;
pub mod nicknames;
pub mod normalize;
pub mod queue;
pub mod score;

use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};

use crate::audit::{Action, Actor, AuditRecord};
use crate::config::Config;
use crate::db::mpi::{self as store, SourceContent, SourceRow};
use crate::db::{self, DbConn};
use crate::error::{Error, Result};
use crate::orgs::Organization;
use normalize::{metaphone, Demographics, KeyId};
use score::{Score, Thresholds, Weights};

/// How the MPI matches, from `[mpi]` in the configuration.
#[derive(Debug, Clone)]
pub struct MpiSettings {
    pub weights: Weights,
    pub thresholds: Thresholds,
    /// Below this, a `$match` candidate is not returned at all.
    pub possible: f64,
    pub shared_systems: Vec<String>,
    pub enterprise_system: String,
    pub max_candidates: i64,
}

impl MpiSettings {
    pub fn from_config(config: &Config) -> Result<MpiSettings> {
        let m = &config.mpi;
        let weights = if m.weights_file.as_os_str().is_empty() {
            Weights::parse(score::DEFAULT_WEIGHTS)?
        } else {
            let text = std::fs::read_to_string(&m.weights_file).map_err(|e| {
                Error::config(format!(
                    "config key 'mpi.weights_file': cannot read {}: {e}",
                    m.weights_file.display()
                ))
            })?;
            Weights::parse(&text)?
        };
        Ok(MpiSettings {
            weights,
            thresholds: Thresholds {
                link: m.auto_link_threshold,
                review: m.review_threshold,
            },
            possible: m.possible_threshold,
            shared_systems: m.shared_identifier_systems.clone(),
            enterprise_system: enterprise_system(config),
            max_candidates: m.max_candidates,
        })
    }
}

pub fn enterprise_system(config: &Config) -> String {
    let base = &config.exchange.identifier_system_base;
    if base.starts_with("urn:") {
        format!("{base}:enterprise")
    } else {
        format!("{}/enterprise", base.trim_end_matches('/'))
    }
}

/// FHIR ids of MPI resources.
pub fn source_ref(id: i64) -> String {
    format!("src-{id}")
}
pub fn person_ref(id: i64) -> String {
    format!("ent-{id}")
}
pub fn parse_source_ref(s: &str) -> Option<i64> {
    s.trim_start_matches("Patient/")
        .strip_prefix("src-")?
        .parse()
        .ok()
}
pub fn parse_person_ref(s: &str) -> Option<i64> {
    s.trim_start_matches("Patient/")
        .strip_prefix("ent-")?
        .parse()
        .ok()
}

/// A candidate scored against an incoming record.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub source_id: i64,
    pub org_id: String,
    pub enterprise_id: i64,
    pub score: Score,
}

/// What the matcher concluded for one record.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// Candidates at or above the review threshold, best first.
    pub ranked: Vec<Scored>,
    pub link: Option<Scored>,
    /// Candidates to queue for an operator, with their kind.
    pub reviews: Vec<(Scored, &'static str)>,
    pub ambiguous: bool,
    /// Other identities this record is certain for, to merge into the linked one.
    pub merges: Vec<i64>,
}

/// A stored record as the matcher sees it.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// First, so that a candidate rejected by it is read from one place (`score::Sketch`).
    pub sketch: score::Sketch,
    pub id: i64,
    pub org_id: String,
    pub enterprise_id: i64,
    pub demo: Demographics,
}

impl Candidate {
    pub fn new(id: i64, org_id: String, enterprise_id: i64, demo: Demographics) -> Candidate {
        Candidate {
            sketch: score::Sketch::of(&demo),
            id,
            org_id,
            enterprise_id,
            demo,
        }
    }

    /// Records whose stored demographics cannot be read are left out (never matched).
    /// The rows `store::candidates` and `store::matchable` read.
    pub fn of_rows(rows: Vec<store::CandidateRow>) -> Vec<Candidate> {
        let mut out = Vec::with_capacity(rows.len());
        Candidate::extend_of_rows(&mut out, rows);
        out
    }

    /// `of_rows` into `out`. (Collected through a filter, a bulk batch's few hundred thousand
    /// candidates grew their vector by doubling, each step into fresh memory.)
    pub fn extend_of_rows(out: &mut Vec<Candidate>, rows: Vec<store::CandidateRow>) {
        out.extend(
            rows.into_iter()
                .filter_map(|(id, org_id, enterprise_id, demo)| {
                    let demo = serde_json::from_str(&demo).ok()?;
                    Some(Candidate::new(id, org_id, enterprise_id, demo))
                }),
        );
    }
}

impl Evaluation {
    /// The candidate the decision is explained by: the one linked to, else the best scored.
    pub fn best(&self) -> Option<&Scored> {
        self.link.as_ref().or(self.ranked.first())
    }

    /// The decision's breakdown as stored (`Score::stored`); `{}` when no candidate explains it.
    pub fn stored_breakdown(&self) -> String {
        self.best()
            .map(|b| b.score.stored())
            .unwrap_or_else(|| "{}".into())
    }

    /// `linked`, `review` or `new-identity`.
    pub fn outcome(&self) -> &'static str {
        match (&self.link, self.ambiguous, self.reviews.is_empty()) {
            (Some(_), _, _) => "linked",
            (None, true, _) | (None, false, false) => "review",
            (None, false, true) => "new-identity",
        }
    }
}

/// Scores candidates and decides: link to one identity, queue reviews, or neither.
/// A match with another record of the same member is linked when certain, and always flagged
/// as a potential duplicate for that member to clean up in its own system.
pub fn evaluate<C: std::borrow::Borrow<Candidate>>(
    s: &MpiSettings,
    org_id: &str,
    demo: &Demographics,
    candidates: &[C],
    non_matches: &HashSet<i64>,
) -> Evaluation {
    let sketch = score::Sketch::of(demo);
    evaluate_scored(s, org_id, candidates, non_matches, |c| {
        review_score(s, demo, &sketch, c)
    })
}

/// The record's score against a candidate if it reaches the review threshold (below it, a
/// candidate plays no part in the decision).
/// `sketch`: the record's (`score::Sketch::of(demo)`).
pub fn review_score(
    s: &MpiSettings,
    demo: &Demographics,
    sketch: &score::Sketch,
    c: &Candidate,
) -> Option<Score> {
    let floor = s.thresholds.review;
    if !score::may_reach(sketch, &c.sketch, &s.weights, floor) {
        return None;
    }
    score::score_at_least(demo, &c.demo, &s.weights, floor)
}

/// `evaluate` with the candidates' scores from `score_of` (as `review_score` gives them):
/// a bulk load scores a batch's stored candidates ahead, on several threads.
pub fn evaluate_scored<C: std::borrow::Borrow<Candidate>>(
    s: &MpiSettings,
    org_id: &str,
    candidates: &[C],
    non_matches: &HashSet<i64>,
    score_of: impl Fn(&Candidate) -> Option<Score>,
) -> Evaluation {
    let mut ranked: Vec<Scored> = candidates
        .iter()
        .map(|c| c.borrow())
        .filter(|c| !non_matches.contains(&c.id))
        .filter_map(|c| {
            score_of(c).map(|score| Scored {
                source_id: c.id,
                org_id: c.org_id.clone(),
                enterprise_id: c.enterprise_id,
                score,
            })
        })
        .collect();
    ranked.sort_by(|a, b| b.score.total.total_cmp(&a.score.total));
    let linkable: Vec<&Scored> = ranked
        .iter()
        .filter(|c| c.score.total >= s.thresholds.link && c.score.hazards.is_empty())
        .collect();
    // Several identities above the threshold: the person was split earlier. Link to the best
    // and queue the others, so an operator can merge them.
    // When the two identities' best records are themselves plausible together, they are one
    // person split by an earlier miss: merge them (recorded, so it can be undone).
    let link = linkable.first().map(|c| (*c).clone());
    let demographics = |id: i64| {
        candidates
            .iter()
            .map(|c| c.borrow())
            .find(|c| c.id == id)
            .map(|c| &c.demo)
    };
    let mut merges: Vec<i64> = Vec::new();
    let mut ambiguous = false;
    if let Some(best) = &link {
        let best_demo = demographics(best.source_id);
        for other in &linkable {
            if other.enterprise_id == best.enterprise_id || merges.contains(&other.enterprise_id) {
                continue;
            }
            let together = best_demo
                .as_ref()
                .zip(demographics(other.source_id))
                .map(|(a, b)| score::score(a, b, &s.weights));
            match together {
                Some(t) if t.hazards.is_empty() && t.total >= s.thresholds.review => {
                    merges.push(other.enterprise_id)
                }
                _ => ambiguous = true,
            }
        }
    }
    let joined: HashSet<i64> = link
        .iter()
        .map(|l| l.enterprise_id)
        .chain(merges.iter().copied())
        .collect();
    let reviews = ranked
        .iter()
        .filter(|c| c.org_id == org_id || !joined.contains(&c.enterprise_id))
        .map(|c| {
            (
                c.clone(),
                if c.org_id == org_id {
                    "potential-duplicate"
                } else {
                    "potential-match"
                },
            )
        })
        .collect();
    Evaluation {
        ranked,
        link,
        reviews,
        ambiguous,
        merges,
    }
}

/// The blocking keys a stored record is filed under: those of its stored demographics while it
/// is active; none once it was replaced or deleted (its keys were removed then).
fn stored_keys(row: &SourceRow) -> Vec<KeyId> {
    if row.status != "active" {
        return Vec::new();
    }
    serde_json::from_str::<Demographics>(&row.demographics)
        .map(|d| d.key_ids())
        .unwrap_or_default()
}

fn content(patient: &Value, demo: &Demographics, now: i64) -> SourceContent {
    SourceContent {
        resource: patient.to_string(),
        family: demo.family.as_deref().map(String::from),
        given: demo.given.as_deref().map(String::from),
        family_phonetic: demo.family.as_deref().map(metaphone),
        given_phonetic: demo.given.as_deref().map(metaphone),
        birth_date: demo.birth_date.as_deref().map(String::from),
        gender: demo.gender.as_deref().map(String::from),
        postcode: demo.postcode.as_deref().map(String::from),
        phone: demo.phone.as_deref().map(String::from),
        demographics: serde_json::to_string(demo).unwrap_or_else(|_| "{}".into()),
        updated_at: now,
    }
}

/// The outcome of feeding one record.
#[derive(Debug, Clone, Serialize)]
pub struct FeedResult {
    pub source_id: i64,
    pub enterprise_id: i64,
    pub created: bool,
    /// `new-identity`, `linked`, `kept`, `review`, `merged`.
    pub outcome: String,
    pub score: Option<f64>,
    pub reviews_queued: usize,
    /// The record as written, when the write knows it without reading it back: a new record
    /// of a batch, unless a record after it in the batch went the online path (which can
    /// merge its person away).
    #[serde(skip)]
    pub stored: Option<Box<SourceRow>>,
}

/// A validated feed request.
pub struct FeedRequest<'a> {
    pub system: &'a str,
    pub value: &'a str,
    pub patient: &'a Value,
}

fn ident_pairs(patient: &Value) -> Result<Vec<(String, String)>> {
    let Some(ids) = patient.get("identifier") else {
        return Ok(Vec::new());
    };
    let ids = ids.as_array().ok_or_else(|| {
        Error::invalid("Patient.identifier must be a list").at("Patient.identifier")
    })?;
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let system = id
                .get("system")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let value = id
                .get("value")
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty());
            match (system, value) {
                (Some(s), Some(v)) => Ok((s.to_string(), v.trim().to_string())),
                _ => Err(
                    Error::invalid("every identifier needs a system and a value")
                        .at(format!("Patient.identifier[{i}]")),
                ),
            }
        })
        .collect()
}

/// Checks a Patient sent by `org` under `system|value`; returns its identifiers.
pub fn validate_feed(
    s: &MpiSettings,
    org: &Organization,
    req: &FeedRequest,
) -> Result<Vec<(String, String)>> {
    let p = req.patient;
    if p.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return Err(Error::invalid("the body must be a FHIR Patient resource").at("resourceType"));
    }
    if !org.identifier_systems.iter().any(|sys| sys == req.system) {
        return Err(Error::forbidden(format!(
            "identifier system '{}' is not owned by '{}': a member feeds only its own patients, under the systems registered for it",
            req.system, org.id
        )));
    }
    let ids = ident_pairs(p)?;
    if !ids
        .iter()
        .any(|(sys, val)| sys == req.system && val == req.value)
    {
        return Err(Error::invalid(format!(
            "the Patient must carry the identifier it is stored under ({}|{})",
            req.system, req.value
        ))
        .at("Patient.identifier"));
    }
    for (i, (sys, _)) in ids.iter().enumerate() {
        let own = org.identifier_systems.iter().any(|o| o == sys);
        if !own && !s.shared_systems.iter().any(|x| x == sys) {
            return Err(Error::forbidden(format!(
                "identifier system '{sys}' is neither owned by '{}' nor a shared system (national or insurance id)",
                org.id
            ))
            .at(format!("Patient.identifier[{i}]")));
        }
    }
    if let Some(d) = p.get("birthDate") {
        if d.as_str().and_then(normalize::date).is_none() {
            return Err(
                Error::invalid("birthDate must be a date (YYYY, YYYY-MM or YYYY-MM-DD)")
                    .at("Patient.birthDate"),
            );
        }
    }
    if let Some(g) = p.get("gender") {
        if !matches!(g.as_str(), Some("male" | "female" | "other" | "unknown")) {
            return Err(
                Error::invalid("gender must be male, female, other or unknown")
                    .at("Patient.gender"),
            );
        }
    }
    for key in ["name", "address", "telecom", "link"] {
        if p.get(key).is_some_and(|v| !v.is_array()) {
            return Err(Error::invalid(format!("Patient.{key} must be a list"))
                .at(format!("Patient.{key}")));
        }
    }
    Ok(ids)
}

/// The record this Patient says replaced it (ITI-104 merge), if any.
fn replaced_by(p: &Value) -> Result<Option<(String, String)>> {
    let Some(links) = p.get("link").and_then(Value::as_array) else {
        return Ok(None);
    };
    for (i, l) in links.iter().enumerate() {
        if l.get("type").and_then(Value::as_str) != Some("replaced-by") {
            continue;
        }
        let other = l.get("other").ok_or_else(|| {
            Error::invalid("link.other is required").at(format!("Patient.link[{i}].other"))
        })?;
        if let Some(id) = other.get("identifier") {
            let sys = id.get("system").and_then(Value::as_str);
            let val = id.get("value").and_then(Value::as_str);
            if let (Some(s), Some(v)) = (sys, val) {
                return Ok(Some((s.to_string(), v.to_string())));
            }
        }
        if let Some(r) = other.get("reference").and_then(Value::as_str) {
            if let Some(q) = r.strip_prefix("Patient?identifier=") {
                if let Some((s, v)) = q.split_once('|') {
                    return Ok(Some((s.to_string(), v.to_string())));
                }
            }
            if let Some(id) = parse_source_ref(r) {
                return Ok(Some(("#src".into(), id.to_string())));
            }
        }
        return Err(Error::invalid(
            "a replaced-by link must name the surviving record by identifier (other.identifier) or reference (Patient/src-N)",
        )
        .at(format!("Patient.link[{i}].other")));
    }
    Ok(None)
}

/// ITI-104: create or update a member's source record and match it; or merge it when it is
/// marked replaced-by another of the member's records. One transaction, audited.
pub fn feed(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    req: &FeedRequest,
    actor: &Actor,
) -> Result<FeedResult> {
    let ids = validate_feed(s, org, req)?;
    db::write_tx(conn, |conn| {
        let result = feed_in(conn, s, org, req, &ids)?;
        db::audit::append(conn, &[feed_audit(actor, &result)])?;
        Ok(result)
    })
}

/// The audit record of one record fed.
pub fn feed_audit(actor: &Actor, result: &FeedResult) -> AuditRecord {
    let action = if result.created {
        Action::Create
    } else {
        Action::Update
    };
    AuditRecord::new(actor, "rest", action, "patient-feed")
        .entity(format!("Patient/{}", source_ref(result.source_id)))
        .patient(format!("Patient/{}", person_ref(result.enterprise_id)))
        .outcome(crate::audit::Outcome::Success, describe(result))
}

/// The feed of one validated record, inside the caller's transaction, not audited.
fn feed_in(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    req: &FeedRequest,
    ids: &[(String, String)],
) -> Result<FeedResult> {
    let now = crate::time::now_micros();
    match replaced_by(req.patient)? {
        Some(target) => merge_source(conn, s, org, req, &target, ids, now),
        None => upsert(conn, s, org, req, ids, now),
    }
}

fn describe(r: &FeedResult) -> String {
    let score = r
        .score
        .map(|s| format!(" (score {s:.1})"))
        .unwrap_or_default();
    format!(
        "{} {}{score}; {} review(s) queued",
        r.outcome,
        person_ref(r.enterprise_id),
        r.reviews_queued
    )
}

fn upsert(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    req: &FeedRequest,
    ids: &[(String, String)],
    now: i64,
) -> Result<FeedResult> {
    let demo = Demographics::from_patient(req.patient, &s.shared_systems);
    let content = content(req.patient, &demo, now);
    let existing = store::find_source(conn, req.system, req.value)?;
    if let Some(e) = &existing {
        if e.org_id != org.id.as_str() {
            return Err(Error::forbidden(
                "this identifier belongs to another member's record",
            ));
        }
    }
    let normalised_ids = indexed_identifiers(s, ids, (req.system, req.value));
    match existing {
        None => {
            let candidates = store::candidates(
                conn,
                &demo.key_ids(),
                None,
                s.max_candidates,
                store::CROWDED,
            )?;
            let candidates = Candidate::of_rows(candidates);
            let eval = evaluate(s, org.id.as_str(), &demo, &candidates, &HashSet::new());
            let (eid, kind) = match &eval.link {
                Some(l) => (l.enterprise_id, "auto"),
                None => (store::insert_identity(conn, now)?, "new"),
            };
            let sid = store::insert_source(
                conn,
                org.id.as_str(),
                req.system,
                req.value,
                eid,
                kind,
                &content,
                now,
            )?;
            store::replace_identifiers(conn, sid, &normalised_ids)?;
            store::update_blocking_keys(conn, sid, &[], &demo.key_ids())?;
            let mut result = apply(conn, sid, eid, &eval, now)?;
            result.created = true;
            Ok(result)
        }
        Some(e) => {
            store::update_source_content(conn, e.id, &content)?;
            store::replace_identifiers(conn, e.id, &normalised_ids)?;
            store::update_blocking_keys(conn, e.id, &stored_keys(&e), &demo.key_ids())?;
            rematch(conn, s, org, e, &demo, now)
        }
    }
}

/// After an update: keep a manual or still-plausible link; otherwise detach and match again.
fn rematch(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    e: SourceRow,
    demo: &Demographics,
    now: i64,
) -> Result<FeedResult> {
    let others: Vec<SourceRow> = store::members(conn, e.enterprise_id)?
        .into_iter()
        .filter(|m| m.id != e.id)
        .collect();
    let best_with_others = others
        .iter()
        .filter_map(|m| serde_json::from_str::<Demographics>(&m.demographics).ok())
        .map(|d| score::score(demo, &d, &s.weights).total)
        .fold(f64::NEG_INFINITY, f64::max);
    let keep =
        e.link_kind == "manual" || (!others.is_empty() && best_with_others >= s.thresholds.review);
    if keep {
        rebuild_golden(conn, e.enterprise_id, now)?;
        return Ok(FeedResult {
            source_id: e.id,
            enterprise_id: e.enterprise_id,
            created: false,
            outcome: "kept".into(),
            score: if others.is_empty() {
                None
            } else {
                Some(best_with_others)
            },
            reviews_queued: 0,
            stored: None,
        });
    }
    let old_eid = e.enterprise_id;
    let non_matches = store::non_matches_of(conn, e.id)?;
    let candidates = store::candidates(
        conn,
        &demo.key_ids(),
        Some(e.id),
        s.max_candidates,
        store::CROWDED,
    )?;
    let candidates: Vec<Candidate> = Candidate::of_rows(candidates)
        .into_iter()
        .filter(|c| c.enterprise_id != old_eid)
        .collect();
    let eval = evaluate(s, org.id.as_str(), demo, &candidates, &non_matches);
    let eid = match (&eval.link, others.is_empty()) {
        (Some(l), _) => l.enterprise_id,
        (None, true) => old_eid,
        (None, false) => store::insert_identity(conn, now)?,
    };
    if eid != old_eid {
        store::set_source_identity(
            conn,
            e.id,
            eid,
            if eval.link.is_some() { "auto" } else { "new" },
        )?;
        store::insert_history(
            conn,
            old_eid,
            "detach",
            &json!({ "source": e.id, "to": eid }).to_string(),
            None,
            now,
        )?;
        if others.is_empty() {
            store::set_identity_status(conn, old_eid, "merged", Some(eid), now)?;
        } else {
            rebuild_golden(conn, old_eid, now)?;
        }
    }
    let mut r = apply(conn, e.id, eid, &eval, now)?;
    r.created = false;
    Ok(r)
}

/// Records the decision, queues reviews, rebuilds the golden record.
fn apply(conn: &mut DbConn, sid: i64, eid: i64, eval: &Evaluation, now: i64) -> Result<FeedResult> {
    let best = eval.best();
    let outcome = eval.outcome();
    let breakdown = eval.stored_breakdown();
    store::insert_decision(
        conn,
        sid,
        best.map(|b| b.source_id),
        outcome,
        best.map(|b| b.score.total),
        &breakdown,
        now,
    )?;
    let mut queued = 0;
    for (c, kind) in &eval.reviews {
        let breakdown = c.score.stored();
        if store::insert_review(conn, sid, c.source_id, kind, c.score.total, &breakdown, now)? {
            queued += 1;
        }
    }
    if let Some(l) = &eval.link {
        let detail = json!({ "source": sid, "candidate": l.source_id, "score": l.score.total });
        store::insert_history(conn, eid, "link", &detail.to_string(), None, now)?;
    }
    for other in &eval.merges {
        if *other != eid && current_identity(conn, *other)? == Some(*other) {
            move_members(conn, *other, eid, "mpi-auto-merge", now)?;
        }
    }
    rebuild_golden(conn, eid, now)?;
    Ok(FeedResult {
        source_id: sid,
        enterprise_id: eid,
        created: false,
        outcome: outcome.into(),
        score: best.map(|b| (b.score.total * 10.0).round() / 10.0),
        reviews_queued: queued,
        stored: None,
    })
}

fn merge_source(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    req: &FeedRequest,
    target: &(String, String),
    ids: &[(String, String)],
    now: i64,
) -> Result<FeedResult> {
    let survivor = if target.0 == "#src" {
        target
            .1
            .parse()
            .ok()
            .map(|id| store::get_source(conn, id))
            .transpose()?
            .flatten()
    } else {
        store::find_source(conn, &target.0, &target.1)?
    };
    let survivor = survivor.filter(|r| r.status == "active").ok_or_else(|| {
        Error::not_found(
            "the surviving record named in link replaced-by is not known to the MPI; feed it first",
        )
    })?;
    if survivor.org_id != org.id.as_str() {
        return Err(Error::forbidden("a member can merge only its own records"));
    }
    let old = match store::find_source(conn, req.system, req.value)? {
        Some(o) => o,
        None => {
            // Never seen: keep it as a retired record so its identifier resolves to the survivor.
            let demo = Demographics::from_patient(req.patient, &s.shared_systems);
            let sid = store::insert_source(
                conn,
                org.id.as_str(),
                req.system,
                req.value,
                survivor.enterprise_id,
                "manual",
                &content(req.patient, &demo, now),
                now,
            )?;
            let filed = indexed_identifiers(s, ids, (req.system, req.value));
            store::replace_identifiers(conn, sid, &filed)?;
            store::get_source(conn, sid)?
                .ok_or_else(|| Error::internal("source record vanished"))?
        }
    };
    if old.org_id != org.id.as_str() {
        return Err(Error::forbidden(
            "this identifier belongs to another member's record",
        ));
    }
    if old.id == survivor.id {
        return Err(Error::invalid("a record cannot be replaced by itself").at("Patient.link"));
    }
    let old_eid = old.enterprise_id;
    store::set_source_status(conn, old.id, "replaced", Some(survivor.id), now)?;
    store::set_source_identity(conn, old.id, survivor.enterprise_id, "manual")?;
    store::update_blocking_keys(conn, old.id, &stored_keys(&old), &[])?;
    let detail = json!({ "source": old.id, "replaced_by": survivor.id }).to_string();
    store::insert_history(
        conn,
        survivor.enterprise_id,
        "source-merge",
        &detail,
        Some(org.id.as_str()),
        now,
    )?;
    if old_eid != survivor.enterprise_id {
        if store::members(conn, old_eid)?.is_empty() {
            store::set_identity_status(conn, old_eid, "merged", Some(survivor.enterprise_id), now)?;
        } else {
            rebuild_golden(conn, old_eid, now)?;
        }
    }
    rebuild_golden(conn, survivor.enterprise_id, now)?;
    Ok(FeedResult {
        source_id: old.id,
        enterprise_id: survivor.enterprise_id,
        created: false,
        outcome: "merged".into(),
        score: None,
        reviews_queued: 0,
        stored: None,
    })
}

/// Conditional DELETE: the member's record leaves the MPI (its identity is rebuilt without it).
pub fn delete(
    conn: &mut DbConn,
    org: &Organization,
    system: &str,
    value: &str,
    actor: &Actor,
) -> Result<i64> {
    if !org.identifier_systems.iter().any(|s| s == system) {
        return Err(Error::forbidden(format!(
            "identifier system '{system}' is not owned by '{}'",
            org.id
        )));
    }
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        let rec = store::find_source(conn, system, value)?
            .filter(|r| r.status != "deleted")
            .ok_or_else(|| Error::not_found(format!("no record {system}|{value} in the MPI")))?;
        store::set_source_status(conn, rec.id, "deleted", None, now)?;
        store::update_blocking_keys(conn, rec.id, &stored_keys(&rec), &[])?;
        store::insert_history(
            conn,
            rec.enterprise_id,
            "source-delete",
            &json!({ "source": rec.id }).to_string(),
            Some(org.id.as_str()),
            now,
        )?;
        if store::members(conn, rec.enterprise_id)?.is_empty() {
            store::set_identity_status(conn, rec.enterprise_id, "retired", None, now)?;
        } else {
            rebuild_golden(conn, rec.enterprise_id, now)?;
        }
        let record = AuditRecord::new(actor, "rest", Action::Delete, "patient-feed")
            .entity(format!("Patient/{}", source_ref(rec.id)))
            .patient(format!("Patient/{}", person_ref(rec.enterprise_id)));
        db::audit::append(conn, &[record])?;
        Ok(rec.id)
    })
}

/// Survivorship: for each element (name, gender, birthDate, address, telecom) the golden record
/// takes the value of the most recently updated active source record that has it.
pub fn rebuild_golden(conn: &mut DbConn, eid: i64, now: i64) -> Result<()> {
    let mut members = store::members(conn, eid)?;
    members.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(b.id.cmp(&a.id)));
    let resources: Vec<Value> = members
        .iter()
        .filter_map(|m| serde_json::from_str(&m.resource).ok())
        .collect();
    store::set_golden(conn, eid, &golden(&resources), now)?;
    // Records that joined or left the person take the person's consent with them.
    crate::db::consent::refresh_hides(conn, eid)
}

/// The golden record of member resources ordered by survivorship (most recent first).
fn golden<V: std::borrow::Borrow<Value>>(resources: &[V]) -> String {
    let mut golden = serde_json::Map::new();
    for key in ["name", "gender", "birthDate", "address", "telecom"] {
        if let Some(v) = resources
            .iter()
            .find_map(|r| r.borrow().get(key).filter(|v| !v.is_null()))
        {
            golden.insert(key.into(), v.clone());
        }
    }
    Value::Object(golden).to_string()
}

/// A person as the exchange knows them: golden demographics, every identifier, every record.
#[derive(Debug, Clone)]
pub struct Person {
    pub enterprise_id: i64,
    pub status: String,
    pub merged_into: Option<i64>,
    pub golden: Value,
    pub updated_at: i64,
    /// (source id, org id, system, value) of each active record.
    pub records: Vec<(i64, String, String, String)>,
    /// Every identifier of the person's active records (own and shared systems), deduplicated.
    pub identifiers: Vec<(String, String)>,
}

pub fn people(conn: &mut DbConn, eids: &[i64]) -> Result<Vec<Person>> {
    let idents = store::get_identities(conn, eids)?;
    let members = store::members_of(conn, eids)?;
    let own: Vec<(i64, &str, &str)> = members
        .iter()
        .map(|m| (m.id, m.system.as_str(), m.value.as_str()))
        .collect();
    let identifiers = store::identifiers_of(conn, &own)?;
    let mut out = Vec::new();
    for eid in eids {
        let Some(row) = idents.iter().find(|i| i.id == *eid) else {
            continue;
        };
        let recs: Vec<&SourceRow> = members.iter().filter(|m| m.enterprise_id == *eid).collect();
        let mut ids: Vec<(String, String)> = identifiers
            .iter()
            .filter(|(sid, _, _)| recs.iter().any(|r| r.id == *sid))
            .map(|(_, s, v)| (s.clone(), v.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        out.push(Person {
            enterprise_id: *eid,
            status: row.status.clone(),
            merged_into: row.merged_into,
            golden: serde_json::from_str(&row.golden).unwrap_or(Value::Null),
            updated_at: row.updated_at,
            records: recs
                .iter()
                .map(|r| (r.id, r.org_id.clone(), r.system.clone(), r.value.clone()))
                .collect(),
            identifiers: ids,
        });
    }
    Ok(out)
}

/// Follows merges to the identity that is current.
pub fn current_identity(conn: &mut DbConn, mut eid: i64) -> Result<Option<i64>> {
    for _ in 0..32 {
        match store::get_identity(conn, eid)? {
            None => return Ok(None),
            Some(i) if i.status == "merged" => match i.merged_into {
                Some(next) => eid = next,
                None => return Ok(None),
            },
            Some(i) if i.status == "retired" => return Ok(None),
            Some(_) => return Ok(Some(eid)),
        }
    }
    Ok(None)
}

/// The identifiers a record is filed under in `source_identifiers`: all of them but the one
/// it is stored under, `own`, which its row holds (the unique `source_records_identifier`: two
/// index entries fewer a record). Values in shared systems (national, insurance ids) are
/// normalised (`normalize::identifier_value`), so that `123-45-6789` and `123456789` find the
/// same person.
fn indexed_identifiers(
    s: &MpiSettings,
    ids: &[(String, String)],
    own: (&str, &str),
) -> Vec<(String, String)> {
    ids.iter()
        .filter(|(system, value)| (system.as_str(), value.as_str()) != own)
        .map(|(system, value)| {
            let v = if s.shared_systems.iter().any(|x| x == system) {
                normalize::identifier_value(value).unwrap_or_else(|| value.clone())
            } else {
                value.clone()
            };
            (system.clone(), v)
        })
        .collect()
}

/// Whether an identifier system is known to the exchange (owned by a member, shared, or ours).
pub fn known_system(conn: &mut DbConn, s: &MpiSettings, system: &str) -> Result<bool> {
    Ok(system == s.enterprise_system
        || s.shared_systems.iter().any(|x| x == system)
        || db::orgs::system_owner(conn, system)?.is_some())
}

/// Resolves an identifier (a member's, a shared one, or the enterprise id) to the current identity.
pub fn resolve_identifier(
    conn: &mut DbConn,
    s: &MpiSettings,
    system: &str,
    value: &str,
) -> Result<Option<i64>> {
    if system == s.enterprise_system {
        return match value.parse::<i64>() {
            Ok(eid) => current_identity(conn, eid),
            Err(_) => Ok(None),
        };
    }
    if let Some(rec) = store::find_source(conn, system, value)? {
        return if rec.status == "deleted" {
            Ok(None)
        } else {
            current_identity(conn, rec.enterprise_id)
        };
    }
    let value = if s.shared_systems.iter().any(|x| x == system) {
        normalize::identifier_value(value).unwrap_or_default()
    } else {
        value.to_string()
    };
    let sources = store::sources_with_identifier(conn, system, &value)?;
    let rows = store::get_sources(conn, &sources)?;
    let mut eids: Vec<i64> = Vec::new();
    for r in rows.iter().filter(|r| r.status == "active") {
        if let Some(e) = current_identity(conn, r.enterprise_id)? {
            if !eids.contains(&e) {
                eids.push(e);
            }
        }
    }
    Ok(if eids.len() == 1 {
        eids.first().copied()
    } else {
        None
    })
}

/// One PIXm cross-reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossReference {
    pub system: String,
    pub value: String,
    /// `src-N` or `ent-N`.
    pub target_id: String,
}

/// ITI-83 with IHE error semantics: unknown source domain 400, unknown patient 404,
/// unknown target domain 403. Returns the person and their identifiers in other domains.
pub fn cross_reference(
    conn: &mut DbConn,
    s: &MpiSettings,
    system: &str,
    value: &str,
    targets: &[String],
) -> Result<(i64, Vec<CrossReference>)> {
    if !known_system(conn, s, system)? {
        return Err(Error::invalid(format!(
            "sourceIdentifier Assigning Authority '{system}' not found"
        ))
        .at("sourceIdentifier"));
    }
    for t in targets {
        if !known_system(conn, s, t)? {
            return Err(
                Error::forbidden(format!("targetSystem '{t}' not found")).at("targetSystem")
            );
        }
    }
    let eid = resolve_identifier(conn, s, system, value)?.ok_or_else(|| {
        Error::not_found("sourceIdentifier Patient Identifier not found").at("sourceIdentifier")
    })?;
    // The person's active records and their identifiers: `people` would read these too, with
    // its identity row and golden record, which a cross-reference does not use.
    let members = store::members(conn, eid)?;
    let own: Vec<(i64, &str, &str)> = members
        .iter()
        .map(|m| (m.id, m.system.as_str(), m.value.as_str()))
        .collect();
    let mut out = vec![CrossReference {
        system: s.enterprise_system.clone(),
        value: eid.to_string(),
        target_id: person_ref(eid),
    }];
    for (sid, sys, val) in store::identifiers_of(conn, &own)? {
        out.push(CrossReference {
            system: sys,
            value: val,
            target_id: source_ref(sid),
        });
    }
    out.retain(|x| !(x.system == system && x.value == value));
    if !targets.is_empty() {
        out.retain(|x| targets.contains(&x.system));
    }
    out.dedup();
    Ok((eid, out))
}

/// FHIR match-grade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Grade {
    Certain,
    Probable,
    Possible,
}

impl Grade {
    pub fn code(self) -> &'static str {
        match self {
            Grade::Certain => "certain",
            Grade::Probable => "probable",
            Grade::Possible => "possible",
        }
    }
}

#[derive(Debug, Clone)]
pub struct MatchCandidate {
    pub enterprise_id: i64,
    pub score: Score,
    pub grade: Grade,
    pub probability: f64,
}

/// `$match`: the people most likely to be this Patient, best first.
pub fn match_patient(
    conn: &mut DbConn,
    s: &MpiSettings,
    patient: &Value,
    count: usize,
    only_certain: bool,
) -> Result<Vec<MatchCandidate>> {
    if patient.get("resourceType").and_then(Value::as_str) != Some("Patient") {
        return Err(Error::invalid("the 'resource' parameter must be a Patient")
            .at("Parameters.parameter.resource"));
    }
    let demo = Demographics::from_patient(patient, &s.shared_systems);
    let candidates = store::candidates(
        conn,
        &demo.key_ids(),
        None,
        s.max_candidates,
        store::CROWDED_FOR_SEARCH,
    )?;
    let mut best: BTreeMap<i64, Score> = BTreeMap::new();
    for c in Candidate::of_rows(candidates) {
        let Some(sc) = score::score_at_least(&demo, &c.demo, &s.weights, s.possible) else {
            continue;
        };
        let better = best
            .get(&c.enterprise_id)
            .is_none_or(|b| sc.total > b.total);
        if better {
            best.insert(c.enterprise_id, sc);
        }
    }
    let mut out: Vec<MatchCandidate> = best
        .into_iter()
        .map(|(eid, sc)| {
            let grade = if sc.total >= s.thresholds.link && sc.hazards.is_empty() {
                Grade::Certain
            } else if sc.total >= s.thresholds.review {
                Grade::Probable
            } else {
                Grade::Possible
            };
            MatchCandidate {
                enterprise_id: eid,
                probability: sc.probability(&s.thresholds),
                score: sc,
                grade,
            }
        })
        .collect();
    out.sort_by(|a, b| b.score.total.total_cmp(&a.score.total));
    if only_certain {
        let certain: Vec<MatchCandidate> = out
            .into_iter()
            .filter(|c| c.grade == Grade::Certain)
            .collect();
        // FHIR: with onlyCertainMatches, return a single certain match or nothing.
        return Ok(if certain.len() == 1 {
            certain
        } else {
            Vec::new()
        });
    }
    out.truncate(count);
    Ok(out)
}

/// A potential match as an operator reviews it.
#[derive(Debug, Clone)]
pub struct ReviewItem {
    pub id: i64,
    pub kind: String,
    pub status: String,
    pub score: f64,
    pub breakdown: Value,
    pub a: SourceRow,
    pub b: SourceRow,
    pub created_at: i64,
}

pub fn review_queue(
    conn: &mut DbConn,
    status: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<ReviewItem>> {
    let rows = store::reviews(conn, status, after, limit)?;
    let ids: Vec<i64> = rows.iter().flat_map(|r| [r.source_a, r.source_b]).collect();
    let sources = store::get_sources(conn, &ids)?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let a = sources.iter().find(|x| x.id == r.source_a)?.clone();
            let b = sources.iter().find(|x| x.id == r.source_b)?.clone();
            Some(ReviewItem {
                id: r.id,
                kind: r.kind,
                status: r.status,
                score: r.score,
                breakdown: score::breakdown_value(&r.breakdown),
                a,
                b,
                created_at: r.created_at,
            })
        })
        .collect())
}

fn actor_name(actor: &Actor) -> String {
    actor
        .user_id
        .clone()
        .or_else(|| actor.org_id.as_ref().map(|o| o.to_string()))
        .unwrap_or_else(|| "operator".into())
}

fn audit_admin(
    conn: &mut DbConn,
    actor: &Actor,
    subtype: &str,
    entity: String,
    patient: Option<i64>,
    desc: String,
) -> Result<()> {
    let mut record = AuditRecord::new(actor, "admin", Action::Update, subtype)
        .entity(entity)
        .outcome(crate::audit::Outcome::Success, desc);
    if let Some(eid) = patient {
        record = record.patient(format!("Patient/{}", person_ref(eid)));
    }
    db::audit::append(conn, &[record]).map(|_| ())
}

/// Moves every active record of `from` into `into` (recorded, so it can be undone).
fn move_members(
    conn: &mut DbConn,
    from: i64,
    into: i64,
    actor: &str,
    now: i64,
) -> Result<Vec<i64>> {
    let moved: Vec<i64> = store::members(conn, from)?.iter().map(|m| m.id).collect();
    for id in &moved {
        store::set_source_identity(conn, *id, into, "manual")?;
    }
    store::set_identity_status(conn, from, "merged", Some(into), now)?;
    let detail = json!({ "from": from, "into": into, "sources": moved }).to_string();
    store::insert_history(conn, from, "merged-into", &detail, Some(actor), now)?;
    store::insert_history(conn, into, "merged-from", &detail, Some(actor), now)?;
    rebuild_golden(conn, into, now)?;
    Ok(moved)
}

/// Resolves a review: the same person (link their identities) or not (remember, and separate
/// them if they were linked).
pub fn resolve_review(
    conn: &mut DbConn,
    id: i64,
    same_person: bool,
    actor: &Actor,
) -> Result<ReviewItem> {
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        let row = store::get_review(conn, id)?
            .ok_or_else(|| Error::not_found(format!("no review item {id}")))?;
        if row.status != "open" {
            return Err(Error::conflict(format!(
                "review item {id} was already resolved ({})",
                row.status
            )));
        }
        let who = actor_name(actor);
        let a = store::get_source(conn, row.source_a)?
            .ok_or_else(|| Error::not_found("record gone"))?;
        let b = store::get_source(conn, row.source_b)?
            .ok_or_else(|| Error::not_found("record gone"))?;
        let desc = if same_person {
            if a.enterprise_id != b.enterprise_id {
                move_members(conn, b.enterprise_id, a.enterprise_id, &who, now)?;
            }
            store::resolve_review(conn, id, "same", &who, now)?;
            format!(
                "same person: {} and {} linked in {}",
                source_ref(a.id),
                source_ref(b.id),
                person_ref(a.enterprise_id)
            )
        } else {
            store::insert_non_match(conn, a.id, b.id, now)?;
            if a.enterprise_id == b.enterprise_id {
                detach(conn, &b, &who, now)?;
            }
            store::resolve_review(conn, id, "different", &who, now)?;
            format!(
                "not the same person: {} and {} will never be auto-linked",
                source_ref(a.id),
                source_ref(b.id)
            )
        };
        audit_admin(
            conn,
            actor,
            "mpi-review-resolve",
            format!("MatchReview/{id}"),
            Some(a.enterprise_id),
            desc,
        )?;
        let item = review_queue_item(conn, id)?;
        Ok(item)
    })
}

fn review_queue_item(conn: &mut DbConn, id: i64) -> Result<ReviewItem> {
    let row = store::get_review(conn, id)?
        .ok_or_else(|| Error::not_found(format!("no review item {id}")))?;
    let a =
        store::get_source(conn, row.source_a)?.ok_or_else(|| Error::not_found("record gone"))?;
    let b =
        store::get_source(conn, row.source_b)?.ok_or_else(|| Error::not_found("record gone"))?;
    Ok(ReviewItem {
        id: row.id,
        kind: row.kind,
        status: row.status,
        score: row.score,
        breakdown: score::breakdown_value(&row.breakdown),
        a,
        b,
        created_at: row.created_at,
    })
}

/// Gives a record its own identity; returns the new enterprise id.
fn detach(conn: &mut DbConn, rec: &SourceRow, who: &str, now: i64) -> Result<i64> {
    let old = rec.enterprise_id;
    let eid = store::insert_identity(conn, now)?;
    store::set_source_identity(conn, rec.id, eid, "manual")?;
    let detail = json!({ "source": rec.id, "from": old, "to": eid }).to_string();
    store::insert_history(conn, old, "unlink", &detail, Some(who), now)?;
    store::insert_history(conn, eid, "unlinked-from", &detail, Some(who), now)?;
    rebuild_golden(conn, eid, now)?;
    if store::members(conn, old)?.is_empty() {
        store::set_identity_status(conn, old, "retired", None, now)?;
    } else {
        rebuild_golden(conn, old, now)?;
    }
    Ok(eid)
}

/// Unlinks a source record from its identity and remembers that it is not the others.
pub fn unlink(conn: &mut DbConn, source_id: i64, actor: &Actor) -> Result<i64> {
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        let rec = store::get_source(conn, source_id)?
            .filter(|r| r.status == "active")
            .ok_or_else(|| {
                Error::not_found(format!("no active record {}", source_ref(source_id)))
            })?;
        let others: Vec<i64> = store::members(conn, rec.enterprise_id)?
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != rec.id)
            .collect();
        if others.is_empty() {
            return Err(Error::conflict(format!(
                "{} is the only record of its identity",
                source_ref(rec.id)
            )));
        }
        for o in &others {
            store::insert_non_match(conn, rec.id, *o, now)?;
        }
        let eid = detach(conn, &rec, &actor_name(actor), now)?;
        let desc = format!(
            "{} unlinked from {} into {}",
            source_ref(rec.id),
            person_ref(rec.enterprise_id),
            person_ref(eid)
        );
        audit_admin(
            conn,
            actor,
            "mpi-unlink",
            format!("Patient/{}", source_ref(rec.id)),
            Some(rec.enterprise_id),
            desc,
        )?;
        Ok(eid)
    })
}

/// Merges identity `from` into `into`.
pub fn merge_identities(
    conn: &mut DbConn,
    from: i64,
    into: i64,
    actor: &Actor,
) -> Result<Vec<i64>> {
    if from == into {
        return Err(Error::invalid("an identity cannot be merged into itself"));
    }
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        for eid in [from, into] {
            if current_identity(conn, eid)? != Some(eid) {
                return Err(Error::not_found(format!(
                    "{} is not a current identity",
                    person_ref(eid)
                )));
            }
        }
        let moved = move_members(conn, from, into, &actor_name(actor), now)?;
        let desc = format!(
            "{} merged into {} ({} record(s))",
            person_ref(from),
            person_ref(into),
            moved.len()
        );
        audit_admin(
            conn,
            actor,
            "mpi-merge",
            format!("Patient/{}", person_ref(from)),
            Some(into),
            desc,
        )?;
        Ok(moved)
    })
}

/// Undoes the last merge of identity `eid` into another: its records come back.
pub fn unmerge(conn: &mut DbConn, eid: i64, actor: &Actor) -> Result<Vec<i64>> {
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        let ident = store::get_identity(conn, eid)?
            .ok_or_else(|| Error::not_found(format!("no identity {}", person_ref(eid))))?;
        if ident.status != "merged" {
            return Err(Error::conflict(format!(
                "{} is not merged into another identity",
                person_ref(eid)
            )));
        }
        let last = store::history(conn, eid)?
            .into_iter()
            .rev()
            .find(|h| h.action == "merged-into")
            .ok_or_else(|| Error::conflict(format!("{} has no merge to undo", person_ref(eid))))?;
        let detail: Value =
            serde_json::from_str(&last.detail).map_err(|_| Error::internal("bad history entry"))?;
        let into = detail["into"]
            .as_i64()
            .ok_or_else(|| Error::internal("bad history entry"))?;
        let sources: Vec<i64> = detail["sources"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let mut restored = Vec::new();
        for sid in sources {
            if let Some(r) = store::get_source(conn, sid)? {
                if r.enterprise_id == into && r.status == "active" {
                    store::set_source_identity(conn, sid, eid, "manual")?;
                    restored.push(sid);
                }
            }
        }
        let who = actor_name(actor);
        store::set_identity_status(conn, eid, "active", None, now)?;
        let d = json!({ "from": into, "restored": restored }).to_string();
        store::insert_history(conn, eid, "unmerged", &d, Some(&who), now)?;
        store::insert_history(conn, into, "unmerged-out", &d, Some(&who), now)?;
        rebuild_golden(conn, eid, now)?;
        rebuild_golden(conn, into, now)?;
        let desc = format!(
            "{} unmerged from {} ({} record(s) restored)",
            person_ref(eid),
            person_ref(into),
            restored.len()
        );
        audit_admin(
            conn,
            actor,
            "mpi-unmerge",
            format!("Patient/{}", person_ref(eid)),
            Some(eid),
            desc,
        )?;
        Ok(restored)
    })
}

/// The stored decisions for a record, for "why was this linked?".
pub fn explain(conn: &mut DbConn, source_id: i64) -> Result<Vec<store::DecisionRow>> {
    store::decisions(conn, source_id)
}

pub fn history(conn: &mut DbConn, eid: i64) -> Result<Vec<store::HistoryRow>> {
    store::history(conn, eid)
}

//! Many records of one member fed at once (`hie import`, batch Bundles, concurrent feeds).
//!
//! The decisions are those of the online feed: each record is matched, in order, against every
//! record stored before it and every earlier record of the batch, with the same blocking keys,
//! weights, thresholds and hazard rules (`evaluate`). What changes is the work around them:
//! candidates of the whole batch are looked up with a few set-at-a-time queries instead of two
//! per record, the rows are written with multi-row inserts (index entries sorted), and the
//! batch is one transaction.
//!
//! Records the batch path does not decide alone take the online path, one by one, after the
//! batch's new records and in the same transaction: updates of stored records, a second record
//! under an identifier already in the batch, merges (`link` replaced-by), and records whose
//! match would merge two identities.

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

use super::normalize::Demographics;
use super::{
    content, evaluate, feed_in, golden, indexed_identifiers, replaced_by, validate_feed, Candidate,
    Evaluation, FeedRequest, FeedResult, MpiSettings,
};
use crate::db::mpi::{self as store, BulkRows, IdTable, NewDecision, NewHistory, NewIdentity};
use crate::db::mpi::{NewReview, NewSource, SourceContent};
use crate::db::{self, DbConn};
use crate::error::{Error, Result};
use crate::orgs::Organization;

/// The identifier a Patient is stored under: its first identifier in a system `org` owns.
pub fn own_identifier(org: &Organization, patient: &Value) -> Result<(String, String)> {
    patient
        .get("identifier")
        .and_then(Value::as_array)
        .and_then(|ids| {
            ids.iter().find_map(|id| {
                let s = id.get("system")?.as_str()?;
                let v = id.get("value")?.as_str()?;
                org.identifier_systems
                    .iter()
                    .any(|o| o == s)
                    .then(|| (s.to_string(), v.trim().to_string()))
            })
        })
        .ok_or_else(|| {
            Error::invalid(format!(
                "the Patient has no identifier in a system '{}' owns ({})",
                org.id,
                org.identifier_systems.join(", ")
            ))
            .at("Patient.identifier")
        })
}

/// A record validated and normalised, ready to match.
struct Prepared {
    system: String,
    value: String,
    patient: Value,
    /// As indexed (shared ids normalised).
    ids: Vec<(String, String)>,
    /// As sent, for the online path.
    raw_ids: Vec<(String, String)>,
    demo: Demographics,
    keys: Vec<String>,
    /// The row's content (serialised here, on every core).
    content: SourceContent,
    /// The golden record of a person known only from this record.
    golden: String,
    merge: bool,
}

/// A Patient to feed, under the identifier named by the request (ITI-104's
/// `Patient?identifier=`) or, when none is named, its first identifier in a system the
/// member owns.
pub struct Submission {
    pub patient: Value,
    pub under: Option<(String, String)>,
}

impl From<Value> for Submission {
    fn from(patient: Value) -> Submission {
        Submission {
            patient,
            under: None,
        }
    }
}

fn prepare(s: &MpiSettings, org: &Organization, sub: Submission) -> Result<Prepared> {
    let Submission { patient, under } = sub;
    let (system, value) = match under {
        Some(id) => id,
        None => own_identifier(org, &patient)?,
    };
    let raw_ids = validate_feed(
        s,
        org,
        &FeedRequest {
            system: &system,
            value: &value,
            patient: &patient,
        },
    )?;
    let merge = replaced_by(&patient)?.is_some();
    let demo = Demographics::from_patient(&patient, &s.shared_systems);
    Ok(Prepared {
        keys: demo.blocking_keys(),
        content: content(&patient, &demo, 0),
        golden: golden(&[&patient]),
        ids: indexed_identifiers(s, &raw_ids),
        raw_ids,
        demo,
        system,
        value,
        patient,
        merge,
    })
}

/// Validation and normalisation on every core, in order.
fn prepare_all(
    s: &MpiSettings,
    org: &Organization,
    patients: Vec<Submission>,
) -> Vec<Result<Prepared>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    if threads < 2 || patients.len() < 256 {
        return patients.into_iter().map(|p| prepare(s, org, p)).collect();
    }
    let per = patients.len().div_ceil(threads);
    let mut parts: Vec<Vec<Submission>> = Vec::new();
    let mut rest = patients;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        parts.push(rest);
        rest = tail;
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|p| prepare(s, org, p))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![Err(Error::internal("record preparation failed"))])
            })
            .collect()
    })
}

/// A new record the batch decided, before ids are allocated. Ids below zero are the batch's
/// own: record `-(k + 1)` is `fresh[k]`, identity `-(n + 1)` the batch's n-th new identity.
struct Decided {
    pos: usize,
    prepared: Prepared,
    eid: i64,
    eval: Evaluation,
}

/// Feeds `patients` of `org`. Returns one result per patient, in order: a refused record is
/// an error of its own and changes nothing. `audit` writes the audit trail of the batch in
/// its transaction. An error of the database fails the whole batch (nothing written).
pub fn feed_many<A>(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    patients: Vec<Submission>,
    audit: A,
) -> Result<Vec<Result<FeedResult>>>
where
    A: FnOnce(&mut DbConn, &[Result<FeedResult>]) -> Result<()>,
{
    let prepared = prepare_all(s, org, patients);
    db::write_tx(conn, |conn| {
        let now = crate::time::now_micros();
        let mut results: Vec<Option<Result<FeedResult>>> = Vec::with_capacity(prepared.len());
        let mut candidates: Vec<(usize, Prepared)> = Vec::new();
        for (pos, p) in prepared.into_iter().enumerate() {
            match p {
                Ok(p) => {
                    results.push(None);
                    candidates.push((pos, p));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let (fresh, mut online) = split_new(conn, candidates)?;
        let (decided, deferred) = decide(conn, s, org, fresh)?;
        online.extend(deferred);
        write_decided(conn, org, decided, now, &mut results)?;
        online.sort_by_key(|(pos, _)| *pos);
        for (pos, p) in online {
            let req = FeedRequest {
                system: &p.system,
                value: &p.value,
                patient: &p.patient,
            };
            // A savepoint each: a refused update leaves the rest of the batch alone.
            let r = diesel::Connection::transaction(&mut *conn, |c| {
                feed_in(c, s, org, &req, &p.raw_ids)
            });
            results[pos] = Some(r);
        }
        let results: Vec<Result<FeedResult>> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::internal("record left undecided"))))
            .collect();
        audit(conn, &results)?;
        Ok(results)
    })
}

/// New records (the batch path) and the rest (the online path).
#[allow(clippy::type_complexity)]
fn split_new(
    conn: &mut DbConn,
    prepared: Vec<(usize, Prepared)>,
) -> Result<(Vec<(usize, Prepared)>, Vec<(usize, Prepared)>)> {
    let mut by_system: HashMap<&str, Vec<&str>> = HashMap::new();
    for (_, p) in &prepared {
        by_system.entry(&p.system).or_default().push(&p.value);
    }
    let mut stored: HashSet<(String, String)> = HashSet::new();
    for (system, values) in by_system {
        for v in store::existing_values(conn, system, &values)? {
            stored.insert((system.to_string(), v));
        }
    }
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let (mut fresh, mut online) = (Vec::new(), Vec::new());
    for (pos, p) in prepared {
        let id = (p.system.clone(), p.value.clone());
        if p.merge || stored.contains(&id) || !seen.insert(id) {
            online.push((pos, p));
        } else {
            fresh.push((pos, p));
        }
    }
    Ok((fresh, online))
}

/// Matches the new records in order, each against the stored candidates of its keys and the
/// batch's earlier records.
#[allow(clippy::type_complexity)]
fn decide(
    conn: &mut DbConn,
    s: &MpiSettings,
    org: &Organization,
    fresh: Vec<(usize, Prepared)>,
) -> Result<(Vec<Decided>, Vec<(usize, Prepared)>)> {
    let limit = usize::try_from(s.max_candidates).unwrap_or(usize::MAX);
    // The batch's distinct keys, numbered; each record's keys by number.
    let mut numbers: HashMap<&str, usize> = HashMap::new();
    let mut keys: Vec<&str> = Vec::new();
    let record_keys: Vec<Vec<usize>> = fresh
        .iter()
        .map(|(_, p)| {
            p.keys
                .iter()
                .map(|k| {
                    *numbers.entry(k.as_str()).or_insert_with(|| {
                        keys.push(k.as_str());
                        keys.len() - 1
                    })
                })
                .collect()
        })
        .collect();
    let mut stored_by_key: Vec<Vec<i64>> = vec![Vec::new(); keys.len()];
    for (key, id) in store::key_hits(conn, &keys)? {
        if let Some(&k) = numbers.get(key.as_str()) {
            stored_by_key[k].push(id);
        }
    }
    // Per record, its stored buckets (the batch's own records are added as it goes).
    for b in &mut stored_by_key {
        b.sort_unstable_by(|x, y| y.cmp(x));
        b.truncate(store::BUCKET_READ as usize);
    }
    // The stored records any of them may be matched with: adding the batch's own records to
    // the buckets only pushes stored ones down the ranking, never up.
    let mut wanted: Vec<i64> = record_keys
        .iter()
        .flat_map(|ks| {
            let buckets: Vec<&[i64]> = ks.iter().map(|&k| stored_by_key[k].as_slice()).collect();
            store::rank_candidates(&buckets, limit)
        })
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let stored: HashMap<i64, Candidate> = store::matchable(conn, &wanted)?
        .into_iter()
        .filter_map(|(id, org_id, enterprise_id, demo)| {
            let demo = serde_json::from_str(&demo).ok()?;
            Some((
                id,
                Candidate {
                    id,
                    org_id,
                    enterprise_id,
                    demo,
                },
            ))
        })
        .collect();

    let mut decided: Vec<Decided> = Vec::with_capacity(fresh.len());
    let mut deferred = Vec::new();
    // The batch's decided records as candidates, and their keys.
    let mut batch: Vec<Candidate> = Vec::with_capacity(fresh.len());
    let mut batch_by_key: Vec<Vec<usize>> = vec![Vec::new(); keys.len()];
    let mut new_identities = 0i64;
    let none = HashSet::new();
    for ((pos, mut p), ks) in fresh.into_iter().zip(record_keys) {
        // Batch records rank as newer than any stored one.
        let batch_id = |k: usize| i64::MAX / 2 + k as i64;
        let buckets: Vec<Vec<i64>> = ks
            .iter()
            .map(|&k| {
                let mut b: Vec<i64> = batch_by_key[k].iter().rev().map(|&j| batch_id(j)).collect();
                b.extend(&stored_by_key[k]);
                b.truncate(store::BUCKET_READ as usize);
                b
            })
            .collect();
        let ranked = store::rank_candidates(&buckets, limit);
        let cands: Vec<&Candidate> = ranked
            .iter()
            .filter_map(|&id| {
                if id >= i64::MAX / 2 {
                    batch.get((id - i64::MAX / 2) as usize)
                } else {
                    stored.get(&id)
                }
            })
            .collect();
        let eval = evaluate(s, org.id.as_str(), &p.demo, &cands, &none);
        if !eval.merges.is_empty() {
            deferred.push((pos, p));
            continue;
        }
        let eid = match &eval.link {
            Some(l) => l.enterprise_id,
            None => {
                new_identities += 1;
                -new_identities
            }
        };
        let k = batch.len();
        batch.push(Candidate {
            id: -(k as i64) - 1,
            org_id: org.id.to_string(),
            enterprise_id: eid,
            demo: std::mem::take(&mut p.demo),
        });
        for &key in &ks {
            batch_by_key[key].push(k);
        }
        decided.push(Decided {
            pos,
            prepared: p,
            eid,
            eval,
        });
    }
    Ok((decided, deferred))
}

/// Allocates ids, writes every row of the decided records, rebuilds the stored identities
/// they joined.
fn write_decided(
    conn: &mut DbConn,
    org: &Organization,
    decided: Vec<Decided>,
    now: i64,
    results: &mut [Option<Result<FeedResult>>],
) -> Result<()> {
    if decided.is_empty() {
        return Ok(());
    }
    let sids = store::allocate_ids(conn, IdTable::SourceRecords, decided.len())?;
    let new_count = decided.iter().filter(|d| d.eid < 0).count();
    let eids = store::allocate_ids(conn, IdTable::Identities, new_count)?;
    let sid = |id: i64| -> i64 {
        if id < 0 {
            sids[(-id - 1) as usize]
        } else {
            id
        }
    };
    let eid = |id: i64| -> i64 {
        if id < 0 {
            eids[(-id - 1) as usize]
        } else {
            id
        }
    };
    let mut rows = BulkRows::default();
    // Members of the batch's new identities, newest first (survivorship).
    let mut members: HashMap<i64, Vec<&Prepared>> = HashMap::new();
    let mut joined: Vec<i64> = Vec::new();
    for d in decided.iter().rev().filter(|d| d.eid < 0) {
        members.entry(d.eid).or_default().push(&d.prepared);
    }
    for n in 1..=new_count as i64 {
        let golden = match members.get(&-n).map(Vec::as_slice) {
            Some([only]) => only.golden.clone(),
            Some(several) => golden(&several.iter().map(|p| &p.patient).collect::<Vec<_>>()),
            None => "{}".into(),
        };
        rows.identities.push(NewIdentity {
            id: eid(-n),
            status: "active".into(),
            merged_into: None,
            golden,
            created_at: now,
            updated_at: now,
        });
    }
    drop(members);
    for (k, d) in decided.into_iter().enumerate() {
        let source_id = sids[k];
        let enterprise_id = eid(d.eid);
        let p = d.prepared;
        let c = p.content;
        rows.sources.push(NewSource {
            id: source_id,
            org_id: org.id.to_string(),
            system: p.system,
            value: p.value,
            enterprise_id,
            status: "active".into(),
            link_kind: if d.eval.link.is_some() { "auto" } else { "new" }.into(),
            version: 1,
            resource: c.resource,
            family: c.family,
            given: c.given,
            family_phonetic: c.family_phonetic,
            given_phonetic: c.given_phonetic,
            birth_date: c.birth_date,
            gender: c.gender,
            postcode: c.postcode,
            phone: c.phone,
            demographics: c.demographics,
            created_at: now,
            updated_at: now,
        });
        rows.identifiers
            .extend(p.ids.into_iter().map(|(s, v)| (s, v, source_id)));
        rows.keys
            .extend(p.keys.into_iter().map(|key| (key, source_id)));
        let best = d.eval.best();
        rows.decisions.push(NewDecision {
            source_id,
            candidate_id: best.map(|b| sid(b.source_id)),
            outcome: d.eval.outcome().into(),
            score: best.map(|b| b.score.total),
            breakdown: best
                .map(|b| serde_json::to_string(&b.score).unwrap_or_default())
                .unwrap_or_else(|| "{}".into()),
            created_at: now,
        });
        for (c, kind) in &d.eval.reviews {
            rows.reviews.push(NewReview::new(
                source_id,
                sid(c.source_id),
                kind,
                c.score.total,
                serde_json::to_string(&c.score).unwrap_or_default(),
                now,
            ));
        }
        if let Some(l) = &d.eval.link {
            let detail = json!({ "source": source_id, "candidate": sid(l.source_id), "score": l.score.total });
            rows.history.push(NewHistory {
                enterprise_id,
                action: "link".into(),
                detail: detail.to_string(),
                actor: None,
                created_at: now,
            });
            if d.eid > 0 {
                joined.push(d.eid);
            }
        }
        results[d.pos] = Some(Ok(FeedResult {
            source_id,
            enterprise_id,
            created: true,
            outcome: d.eval.outcome().into(),
            score: best.map(|b| (b.score.total * 10.0).round() / 10.0),
            reviews_queued: d.eval.reviews.len(),
        }));
    }
    store::insert_bulk(conn, rows)?;
    joined.sort_unstable();
    joined.dedup();
    rebuild_joined(conn, &joined, now)
}

/// `rebuild_golden` for the stored identities new records joined, a few queries for all of
/// them. A new record takes its person's consent restrictions (`consent_hides`) from the
/// records already there: it brings no consent of its own.
fn rebuild_joined(conn: &mut DbConn, eids: &[i64], now: i64) -> Result<()> {
    for chunk in eids.chunks(1000) {
        let mut members = store::members_of(conn, chunk)?;
        members.sort_by(|a, b| {
            a.enterprise_id
                .cmp(&b.enterprise_id)
                .then(b.updated_at.cmp(&a.updated_at))
                .then(b.id.cmp(&a.id))
        });
        for group in members.chunk_by(|a, b| a.enterprise_id == b.enterprise_id) {
            let resources: Vec<Value> = group
                .iter()
                .filter_map(|m| serde_json::from_str(&m.resource).ok())
                .collect();
            store::set_golden(conn, group[0].enterprise_id, &golden(&resources), now)?;
            if let Some(hides) = group
                .iter()
                .map(|m| m.consent_hides.as_str())
                .find(|h| !h.is_empty())
            {
                crate::db::consent::set_hides(conn, group[0].enterprise_id, hides)?;
            }
        }
    }
    Ok(())
}

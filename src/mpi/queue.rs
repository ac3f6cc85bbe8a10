//! The HTTP identity feed (ITI-104), batched. Concurrent `PUT Patient?identifier=` requests
//! queue here; one task takes whatever has queued, feeds it through the batch path
//! (`bulk::feed_many`, the online decisions in arrival order) in one transaction, and answers
//! each request. Each record is audited on its own, as a single feed is. If the database fails
//! the batch as a whole, each request is retried alone, so one request's conflict cannot fail
//! the others.

use serde_json::Value;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::bulk::{feed_many, Submission};
use super::{feed, feed_audit, FeedRequest, FeedResult, MpiSettings};
use crate::audit::Actor;
use crate::db::mpi::{self as store, SourceRow};
use crate::db::{self, Db, DbConn, DbUrl};
use crate::error::{Error, Result};
use crate::orgs::Organization;

/// Requests fed in one transaction at most.
const MAX_BATCH: usize = 256;

/// Batches handed to the database at once. On SQLite two: the next batch is gathered and
/// queued while one is written, so the writer is not left idle while the answers of the last
/// batch travel back and the next requests arrive; batches still run one after the other on
/// the writer — each sees everything fed before it — and only requests that were concurrent
/// anyway can end up in either order. On PostgreSQL one: two batches would be two concurrent
/// transactions, and batches about the same people lock the same identities in different
/// orders (deadlocks, measured in the concurrent-feed test) or insert the same identifier.
fn in_flight(db: &Db) -> usize {
    match db.url() {
        DbUrl::Sqlite(_) => 2,
        DbUrl::Postgres(_) => 1,
    }
}

type Answer = Result<(FeedResult, SourceRow)>;

#[derive(Clone)]
struct Job {
    org: Organization,
    system: String,
    value: String,
    patient: Value,
    actor: Actor,
}

/// Where the feed handlers send their records.
#[derive(Clone)]
pub struct FeedQueue {
    tx: mpsc::Sender<(Job, oneshot::Sender<Answer>)>,
}

impl FeedQueue {
    pub fn start(db: Db, settings: Arc<MpiSettings>) -> FeedQueue {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 16);
        tokio::spawn(run(db, settings, rx));
        FeedQueue { tx }
    }

    /// Feeds one Patient under `system|value`; returns the outcome and the stored record once
    /// committed.
    pub async fn feed(
        &self,
        org: Organization,
        system: String,
        value: String,
        patient: Value,
        actor: Actor,
    ) -> Answer {
        let (answer, wait) = oneshot::channel();
        let job = Job {
            org,
            system,
            value,
            patient,
            actor,
        };
        self.tx
            .send((job, answer))
            .await
            .map_err(|_| Error::unavailable("the identity feed is shutting down; retry shortly"))?;
        wait.await
            .map_err(|_| Error::unavailable("the identity feed is not available; retry shortly"))?
    }
}

async fn run(
    db: Db,
    settings: Arc<MpiSettings>,
    mut rx: mpsc::Receiver<(Job, oneshot::Sender<Answer>)>,
) {
    let in_flight = Arc::new(Semaphore::new(in_flight(&db)));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot before gathering, so the batch takes whatever queued meanwhile.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let (db, settings) = (db.clone(), Arc::clone(&settings));
        tokio::spawn(async move {
            write_batch(&db, &settings, batch).await;
            drop(permit);
        });
    }
}

/// Feeds one batch in one transaction and answers each request; if the database fails the
/// batch, each request is retried alone.
async fn write_batch(
    db: &Db,
    settings: &Arc<MpiSettings>,
    batch: Vec<(Job, oneshot::Sender<Answer>)>,
) {
    let (jobs, answers): (Vec<Job>, Vec<oneshot::Sender<Answer>>) = batch.into_iter().unzip();
    let s = Arc::clone(settings);
    let retry = jobs.clone();
    match db.write(move |c| feed_batch(c, &s, jobs)).await {
        Ok(results) => {
            for (answer, r) in answers.into_iter().zip(results) {
                let _ = answer.send(r);
            }
        }
        // Each request once more, alone: one request's conflict must not fail the others, and
        // on PostgreSQL a conflict with another writer (a deadlock, a unique violation raised
        // once the other committed) goes through the second time.
        Err(_) => {
            for (job, answer) in retry.into_iter().zip(answers) {
                let s = Arc::clone(settings);
                let r = db.write(move |c| feed_alone(c, &s, &job)).await;
                let _ = answer.send(r);
            }
        }
    }
}

/// One request through the online path.
fn feed_alone(c: &mut DbConn, s: &MpiSettings, job: &Job) -> Answer {
    let req = FeedRequest {
        system: &job.system,
        value: &job.value,
        patient: &job.patient,
    };
    let r = feed(c, s, &job.org, &req, &job.actor)?;
    let row =
        store::get_source(c, r.source_id)?.ok_or_else(|| Error::internal("record vanished"))?;
    Ok((r, row))
}

/// The batch, member by member (each member's records in arrival order).
fn feed_batch(c: &mut DbConn, s: &MpiSettings, jobs: Vec<Job>) -> Result<Vec<Answer>> {
    let mut answers: Vec<Option<Answer>> = (0..jobs.len()).map(|_| None).collect();
    let mut orgs: Vec<Organization> = Vec::new();
    for j in &jobs {
        if !orgs.iter().any(|o| o.id == j.org.id) {
            orgs.push(j.org.clone());
        }
    }
    let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    for org in orgs {
        let mut at = Vec::new();
        let mut subs = Vec::new();
        let mut actors = Vec::new();
        for (i, slot) in jobs.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|j| j.org.id == org.id) {
                if let Some(j) = slot.take() {
                    at.push(i);
                    actors.push(j.actor);
                    subs.push(Submission {
                        patient: j.patient,
                        under: Some((j.system, j.value)),
                    });
                }
            }
        }
        let results = feed_many(c, s, &org, subs, |c, rs| {
            let records: Vec<_> = rs
                .iter()
                .zip(&actors)
                .filter_map(|(r, a)| r.as_ref().ok().map(|r| feed_audit(a, r)))
                .collect();
            db::audit::append(c, &records).map(|_| ())
        })?;
        let ids: Vec<i64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.source_id))
            .collect();
        let rows: std::collections::HashMap<i64, SourceRow> = store::get_sources(c, &ids)?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
        for (i, r) in at.into_iter().zip(results) {
            answers[i] = Some(r.and_then(|r| {
                // A record sent twice in one batch is one row: the last answer takes it.
                let row = match rows.get(&r.source_id) {
                    Some(row) => row.clone(),
                    None => return Err(Error::internal("record vanished")),
                };
                Ok((r, row))
            }));
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::internal("request left unanswered"))))
        .collect())
}

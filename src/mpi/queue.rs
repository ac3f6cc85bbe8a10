//! The HTTP identity feed (ITI-104), batched and pipelined. Concurrent
//! `PUT Patient?identifier=` requests queue here. One task takes whatever has queued and
//! matches it (`bulk::Matcher`, the online decisions in arrival order) on a reading
//! connection, while the batch before it is written: the batches not yet written are
//! candidates as if stored. A second task writes each batch in one transaction and answers
//! each request; a batch whose matching went stale meanwhile (another write, a record added
//! by anyone else, a batch before it not written as decided) is matched again as it is
//! written. Each record is audited on its own, as a single feed is. If the database fails
//! the batch as a whole, each request is retried alone, so one request's conflict cannot
//! fail the others.

use serde_json::Value;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

use super::bulk::{write_group, Commit, Matched, Matcher, Pipeline, Submission, Written};
use super::{feed, feed_audit, FeedRequest, FeedResult, MpiSettings};
use crate::audit::Actor;
use crate::db::mpi::{self as store, SourceRow};
use crate::db::{self, Db, DbConn};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::orgs::Organization;

/// Requests fed in one transaction at most.
const MAX_BATCH: usize = 256;

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
    pub fn start(db: Db, settings: Arc<MpiSettings>, metrics: Metrics) -> FeedQueue {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 16);
        tokio::spawn(run(db, settings, metrics, rx));
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

/// A batch on its way to the writer: its groups as matched (None if matching failed: each
/// request is then fed alone), and for each group the requests its records came from.
struct Work {
    jobs: Vec<Job>,
    answers: Vec<oneshot::Sender<Answer>>,
    matched: Option<Vec<(Matched, Vec<usize>)>>,
}

async fn run(
    db: Db,
    settings: Arc<MpiSettings>,
    metrics: Metrics,
    mut rx: mpsc::Receiver<(Job, oneshot::Sender<Answer>)>,
) {
    let pipe = Arc::new(Pipeline::new(db.writes()));
    let matcher = Arc::new(std::sync::Mutex::new(Matcher::default()));
    // One batch waits for the writer at most.
    let (to_writer, from_matcher) = mpsc::channel::<Work>(1);
    tokio::spawn(write_loop(
        db.clone(),
        Arc::clone(&settings),
        Arc::clone(&pipe),
        metrics,
        from_matcher,
    ));
    // The batch matched last, held until the next batch's reads are queued ahead of its write
    // (on SQLite both run on the writer's connection): the next is matched while it is
    // written. With nothing waiting, it goes at once.
    let mut held: Option<Work> = None;
    // On PostgreSQL the reads run on a connection of their own, so nothing is held; instead the
    // next batch is taken only once the writer has taken the last one. The writer is the
    // bound there (a batch's round trips cost about the same for one record as for eight), and
    // every batch matched ahead of it would split the waiting requests into smaller batches.
    let paced = matches!(db.url(), db::DbUrl::Postgres(_));
    loop {
        let permit = match paced {
            true => match to_writer.reserve().await {
                Ok(p) => Some(p),
                Err(_) => return,
            },
            false => None,
        };
        let first = match held.take() {
            Some(work) => match rx.try_recv() {
                Ok(j) => {
                    held = Some(work);
                    j
                }
                Err(_) => {
                    if to_writer.send(work).await.is_err() {
                        return;
                    }
                    continue;
                }
            },
            None => match rx.recv().await {
                Some(j) => j,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let (jobs, answers): (Vec<Job>, Vec<oneshot::Sender<Answer>>) = batch.into_iter().unzip();
        let mut m = Matching {
            db: &db,
            settings: &settings,
            matcher: &matcher,
            pipe: &pipe,
            held: &mut held,
            to_writer: &to_writer,
            paced,
        };
        let matched = m.batch(jobs.clone()).await;
        if let Err(e) = &matched {
            tracing::warn!(error = %e, "matching a feed batch failed; feeding its records one by one");
        }
        if let Some(work) = held.take() {
            if to_writer.send(work).await.is_err() {
                return;
            }
        }
        let work = Work {
            jobs,
            answers,
            matched: matched.ok(),
        };
        match permit {
            Some(p) => p.send(work),
            None => held = Some(work),
        }
    }
}

/// Matching one batch, member by member (each member's records in arrival order).
struct Matching<'a> {
    db: &'a Db,
    settings: &'a Arc<MpiSettings>,
    matcher: &'a Arc<std::sync::Mutex<Matcher>>,
    pipe: &'a Arc<Pipeline>,
    held: &'a mut Option<Work>,
    to_writer: &'a mpsc::Sender<Work>,
    /// PostgreSQL's pacing (`run`): nothing is ever held.
    paced: bool,
}

/// Runs matcher work (normalising, scoring: CPU) off the async executor.
async fn on_matcher<T, F>(matcher: &Arc<std::sync::Mutex<Matcher>>, f: F) -> Result<T>
where
    F: FnOnce(&mut Matcher) -> T + Send + 'static,
    T: Send + 'static,
{
    let matcher = Arc::clone(matcher);
    tokio::task::spawn_blocking(move || f(&mut matcher.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .map_err(|e| Error::internal(format!("matching task failed: {e}")))
}

impl Matching<'_> {
    async fn batch(&mut self, jobs: Vec<Job>) -> Result<Vec<(Matched, Vec<usize>)>> {
        let mut orgs: Vec<Organization> = Vec::new();
        for j in &jobs {
            if !orgs.iter().any(|o| o.id == j.org.id) {
                orgs.push(j.org.clone());
            }
        }
        let mut jobs: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
        let mut groups: Vec<(Matched, Vec<usize>)> = Vec::with_capacity(orgs.len());
        for org in orgs {
            let mut at = Vec::new();
            let mut subs = Vec::new();
            for (i, slot) in jobs.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|j| j.org.id == org.id) {
                    if let Some(j) = slot.take() {
                        at.push(i);
                        subs.push(Submission {
                            patient: j.patient,
                            under: Some((j.system, j.value)),
                        });
                    }
                }
            }
            match self.group(&org, subs, !groups.is_empty()).await {
                Ok(m) => groups.push((m, at)),
                Err(e) => {
                    if let Some(first) = groups.first().map(|(m, _)| m.group()) {
                        on_matcher(self.matcher, move |m| m.discard_from(first)).await?;
                    }
                    return Err(e);
                }
            }
        }
        Ok(groups)
    }

    async fn group(
        &mut self,
        org: &Organization,
        subs: Vec<Submission>,
        after_others: bool,
    ) -> Result<Matched> {
        let (s, o, p) = (
            Arc::clone(self.settings),
            org.clone(),
            Arc::clone(self.pipe),
        );
        // PostgreSQL: nothing is held (the reads run on a connection of their own), so the
        // group is matched in one trip to the matcher — begun, read on the matcher's kept
        // connection and finished on the same thread. Each trip off the executor cost the
        // 1M feed ~70 µs of a ~1.3 ms batch on two busy cores, three of them a group.
        if self.paced {
            let db = self.db.clone();
            return on_matcher(self.matcher, move |m| {
                if after_others && m.needs_flush() {
                    return Ok(m.unmatched(&s, &o, subs));
                }
                // `begin` waits for a group that must be written first.
                let read = m
                    .begin(&s, &o, subs, Some(&p))?
                    .on_writer()
                    .statement_snapshots();
                let reading = db.read_kept(|c| read.run(c, &s, Some(&p)))?;
                Ok(m.finish(&s, &o, reading, true))
            })
            .await?;
        }
        // Nearly always nothing waits to be written first: one trip to the matcher begins.
        let begun = on_matcher(self.matcher, move |m| match m.needs_flush() {
            true => Err(subs),
            false => Ok(m.begin(&s, &o, subs, Some(&p))),
        })
        .await?;
        let read = match begun {
            Ok(read) => read?.on_writer(),
            Err(subs) => {
                let (s, o) = (Arc::clone(self.settings), org.clone());
                // After a group that changes more than it adds, the rest of the batch cannot be
                // matched before it is written: it is matched as it is written.
                if after_others {
                    return on_matcher(self.matcher, move |m| m.unmatched(&s, &o, subs)).await;
                }
                // The held batch must be written before this one is read (`begin` waits for
                // it).
                self.send_held().await?;
                let p = Arc::clone(self.pipe);
                on_matcher(self.matcher, move |m| m.begin(&s, &o, subs, Some(&p)))
                    .await??
                    .on_writer()
            }
        };
        let (s, p) = (Arc::clone(self.settings), Arc::clone(self.pipe));
        let reading = self.db.read_on_writer(move |c| read.run(c, &s, Some(&p)));
        self.send_held().await?;
        let reading = reading.await?;
        let (s, o) = (Arc::clone(self.settings), org.clone());
        on_matcher(self.matcher, move |m| m.finish(&s, &o, reading, true)).await
    }

    async fn send_held(&mut self) -> Result<()> {
        if let Some(work) = self.held.take() {
            self.to_writer
                .send(work)
                .await
                .map_err(|_| Error::unavailable("the identity feed's writer has stopped"))?;
        }
        Ok(())
    }
}

/// Writes the batches in order, each in one transaction, and answers each request once its
/// transaction committed. If the database fails a batch, each of its requests is retried
/// alone. On PostgreSQL a batch commits while the next is written (`Db::write_open`, on two
/// connections in turn): a batch's statements are done in about the time the server takes to
/// flush the commit before it to disk, which otherwise the writer waited out batch after batch
/// (the 1M feed ran 31 % faster with `synchronous_commit` off, which loses acknowledged
/// writes on a crash and is not an option). Commits still happen in order: a batch is
/// committed only after the one before it did, and rolled back and fed again, request by
/// request, if that one did not.
async fn write_loop(
    db: Db,
    settings: Arc<MpiSettings>,
    pipe: Arc<Pipeline>,
    metrics: Metrics,
    mut rx: mpsc::Receiver<Work>,
) {
    let overlap = matches!(db.url(), db::DbUrl::Postgres(_));
    let mut w = Writer {
        db,
        settings,
        pipe,
        metrics,
        written: Written::default(),
        committing: None,
        second: false,
    };
    loop {
        let Some(Work {
            jobs,
            answers,
            matched,
        }) = w.next(&mut rx).await
        else {
            if let Some(f) = match w.committing.take() {
                Some(c) => c.outcome().await,
                None => None,
            } {
                w.recover(f).await;
            }
            return;
        };
        let last = matched
            .as_ref()
            .and_then(|g| g.last().map(|(m, _)| m.group()));
        let Some(groups) = matched else {
            w.fail(jobs, answers, last).await;
            continue;
        };
        let (s, p, written) = (
            Arc::clone(&w.settings),
            Arc::clone(&w.pipe),
            w.written.clone(),
        );
        let actors: Vec<Actor> = jobs.iter().map(|j| j.actor.clone()).collect();
        let write = move |c: &mut DbConn| write_groups(c, &s, &p, written, groups, &actors);
        if !overlap {
            match w.db.write_uncounted(write).await {
                Ok((results, written)) => w.answer(results, written, answers, last),
                Err(_) => w.fail(jobs, answers, last).await,
            }
            continue;
        }
        let opened = w.db.write_open(w.second, write).await;
        // The batch before must have committed before this one can.
        let failed = match w.committing.take() {
            Some(c) => c.outcome().await,
            None => None,
        };
        match (opened, failed) {
            (Ok(((results, mut written), open)), None) => {
                let commit = Arc::new(Commit::default());
                written.committing(Arc::clone(&commit));
                let again = written.matched_again() > w.written.matched_again();
                let before = std::mem::replace(&mut w.written, written);
                let (pipe, metrics) = (Arc::clone(&w.pipe), w.metrics.clone());
                let task = tokio::spawn(async move {
                    let committed = match open.commit().await {
                        Ok(()) => true,
                        Err(e) => {
                            tracing::warn!(error = %e, "committing a feed batch failed; feeding its records one by one");
                            false
                        }
                    };
                    commit.tell(committed);
                    if !committed {
                        return Some(answers);
                    }
                    metrics.feed_batch(results.len(), again, false);
                    for (answer, r) in answers.into_iter().zip(results) {
                        let _ = answer.send(r);
                    }
                    if let Some(g) = last {
                        pipe.finished(g);
                    }
                    None
                });
                w.committing = Some(Committing {
                    task,
                    jobs,
                    last,
                    before,
                });
                w.second = !w.second;
            }
            (opened, failed) => {
                // Written on top of a batch that did not commit: rolled back first, so that
                // the requests fed again do not wait on its locks.
                if let Ok((_, open)) = opened {
                    open.rollback().await;
                }
                if let Some(f) = failed {
                    w.recover(f).await;
                }
                w.fail(jobs, answers, last).await;
            }
        }
    }
}

/// The feed's writer between batches.
struct Writer {
    db: Db,
    settings: Arc<MpiSettings>,
    pipe: Arc<Pipeline>,
    metrics: Metrics,
    written: Written,
    /// The batch whose commit is under way (PostgreSQL).
    committing: Option<Committing>,
    /// Which of its two connections the next batch is written on.
    second: bool,
}

/// A batch being committed. Its task answers the requests once committed, and hands the
/// answers back if the commit failed.
struct Committing {
    task: tokio::task::JoinHandle<Option<Vec<oneshot::Sender<Answer>>>>,
    jobs: Vec<Job>,
    last: Option<u64>,
    /// What the writer knew before the batch.
    before: Written,
}

impl Writer {
    /// The next batch. Idle for a while, the connections kept for the feed go back to the
    /// pool; a commit under way that ends meanwhile is settled at once (a failed one's
    /// requests are not left waiting for the next batch).
    async fn next(&mut self, rx: &mut mpsc::Receiver<Work>) -> Option<Work> {
        let idle = tokio::time::sleep(db::KEEP_FOR);
        tokio::pin!(idle);
        let mut released = false;
        loop {
            tokio::select! {
                work = rx.recv() => return work,
                done = async {
                    match self.committing.as_mut() {
                        Some(c) => (&mut c.task).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(f) = self.committing.take().and_then(|c| c.settled(done)) {
                        self.recover(f).await;
                    }
                    // A commit that ends after the release keeps its connection: back too.
                    if released {
                        self.db.release_kept();
                    }
                }
                () = &mut idle, if !released => {
                    self.db.release_kept();
                    released = true;
                }
            }
        }
    }

    /// A batch that did not commit: the writer forgets it, and its requests are fed alone.
    async fn recover(&mut self, f: Failed) {
        self.written = f.before;
        self.fail(f.jobs, f.answers, f.last).await;
    }

    /// A batch written as a whole: its answers, once committed.
    fn answer(
        &mut self,
        results: Vec<Answer>,
        written: Written,
        answers: Vec<oneshot::Sender<Answer>>,
        last: Option<u64>,
    ) {
        let again = written.matched_again() > self.written.matched_again();
        self.metrics.feed_batch(results.len(), again, false);
        self.written = written;
        for (answer, r) in answers.into_iter().zip(results) {
            let _ = answer.send(r);
        }
        if let Some(g) = last {
            self.pipe.finished(g);
        }
    }

    /// Each request once more, alone: one request's conflict must not fail the others, and
    /// on PostgreSQL a conflict with another writer (a deadlock, a unique violation raised
    /// once the other committed) goes through the second time.
    async fn fail(
        &mut self,
        jobs: Vec<Job>,
        answers: Vec<oneshot::Sender<Answer>>,
        last: Option<u64>,
    ) {
        self.metrics.feed_batch(jobs.len(), false, true);
        for (job, answer) in jobs.into_iter().zip(answers) {
            let s = Arc::clone(&self.settings);
            let r = self.db.write(move |c| feed_alone(c, &s, &job)).await;
            let _ = answer.send(r);
        }
        if let Some(g) = last {
            self.pipe.finished(g);
        }
    }
}

/// A batch whose commit failed.
struct Failed {
    jobs: Vec<Job>,
    answers: Vec<oneshot::Sender<Answer>>,
    last: Option<u64>,
    before: Written,
}

impl Committing {
    /// Waits for the commit: `None` once committed (and answered), else the batch to feed
    /// again.
    async fn outcome(mut self) -> Option<Failed> {
        let done = (&mut self.task).await;
        self.settled(done)
    }

    /// What its finished task (`done`) leaves to do: `None` once committed, else the batch
    /// to feed again.
    fn settled(
        self,
        done: std::result::Result<Option<Vec<oneshot::Sender<Answer>>>, tokio::task::JoinError>,
    ) -> Option<Failed> {
        let Committing {
            jobs, last, before, ..
        } = self;
        match done {
            Ok(None) => None,
            Ok(Some(answers)) => Some(Failed {
                jobs,
                answers,
                last,
                before,
            }),
            // The task failed: its requests were answered "not available" as it dropped
            // their channels, so they are not fed again.
            Err(e) => {
                tracing::error!(error = %e, "the feed's commit task failed");
                Some(Failed {
                    jobs: Vec::new(),
                    answers: Vec::new(),
                    last,
                    before,
                })
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

/// Writes a batch's groups in order inside the writer's transaction; returns the answers and
/// what the writer now knows of the groups written.
fn write_groups(
    c: &mut DbConn,
    s: &MpiSettings,
    pipe: &Pipeline,
    mut written: Written,
    groups: Vec<(Matched, Vec<usize>)>,
    actors: &[Actor],
) -> Result<(Vec<Answer>, Written)> {
    let mut answers: Vec<Option<Answer>> = (0..actors.len()).map(|_| None).collect();
    for (m, at) in groups {
        let results = write_group(c, s, &mut written, m.with_rows(), Some(pipe), |c, rs| {
            let records: Vec<_> = rs
                .iter()
                .zip(&at)
                .filter_map(|(r, &i)| {
                    let actor = actors.get(i)?;
                    r.as_ref().ok().map(|r| feed_audit(actor, r))
                })
                .collect();
            db::audit::append(c, &records).map(|_| ())
        })?;
        // The rows the write does not know as written are read back.
        let ids: Vec<i64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .filter(|r| r.stored.is_none())
            .map(|r| r.source_id)
            .collect();
        let rows: std::collections::HashMap<i64, SourceRow> = match ids.is_empty() {
            true => Default::default(),
            false => store::get_sources(c, &ids)?
                .into_iter()
                .map(|row| (row.id, row))
                .collect(),
        };
        for (i, r) in at.into_iter().zip(results) {
            let answer = r.and_then(|mut r| {
                if let Some(row) = r.stored.take() {
                    return Ok((r, *row));
                }
                // A record sent twice in one batch is one row: the last answer takes it.
                let row = match rows.get(&r.source_id) {
                    Some(row) => row.clone(),
                    None => return Err(Error::internal("record vanished")),
                };
                Ok((r, row))
            });
            if let Some(slot) = answers.get_mut(i) {
                *slot = Some(answer);
            }
        }
    }
    let answers = answers
        .into_iter()
        .map(|a| a.unwrap_or_else(|| Err(Error::internal("request left unanswered"))))
        .collect();
    Ok((answers, written))
}

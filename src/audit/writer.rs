//! Group commit for audit records of reads: concurrent requests hand their records to one
//! writer task, which appends whatever has queued up in a single transaction (on PostgreSQL
//! usually a single statement, its own transaction: `db::audit::append_at_guess`) and answers
//! each request when its record is durable.

use tokio::sync::{mpsc, oneshot};

use super::AuditRecord;
use crate::db::{self, Db};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

enum Msg {
    Record(Box<AuditRecord>, oneshot::Sender<Result<i64>>),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
}

impl Auditor {
    /// Starts the writer task on the current tokio runtime.
    pub fn start(db: Db, batch_max: usize, metrics: Metrics) -> Auditor {
        let (tx, rx) = mpsc::channel(batch_max.max(1) * 16);
        tokio::spawn(run(db, rx, batch_max.max(1), metrics));
        Auditor { tx }
    }

    /// Appends a record and returns its sequence number once it is committed.
    pub async fn record(&self, record: AuditRecord) -> Result<i64> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Record(Box::new(record), done))
            .await
            .map_err(|_| Error::unavailable("the audit trail is shutting down; retry shortly"))?;
        wait.await
            .map_err(|_| Error::unavailable("the audit trail is not available; retry shortly"))?
    }

    /// Writes everything queued so far, then stops the writer.
    pub async fn shutdown(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

type Waiter = oneshot::Sender<Result<i64>>;

async fn run(db: Db, mut rx: mpsc::Receiver<Msg>, batch_max: usize, metrics: Metrics) {
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<(Box<AuditRecord>, Waiter)> = Vec::new();
        let mut stop = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record(r, done) => batch.push((r, done)),
                Msg::Shutdown(done) => stop = Some(done),
            }
            if batch.len() < batch_max && stop.is_none() {
                next = rx.try_recv().ok();
            }
        }
        commit(&db, batch, &metrics).await;
        if let Some(done) = stop {
            // Anything queued before the channel closed is still written.
            rx.close();
            let mut rest = Vec::new();
            while let Ok(msg) = rx.try_recv() {
                if let Msg::Record(r, d) = msg {
                    rest.push((r, d));
                }
            }
            commit(&db, rest, &metrics).await;
            let _ = done.send(());
            return;
        }
    }
}

async fn commit(db: &Db, batch: Vec<(Box<AuditRecord>, Waiter)>, metrics: &Metrics) {
    if batch.is_empty() {
        return;
    }
    let (records, waiters): (Vec<_>, Vec<_>) = batch.into_iter().map(|(r, w)| (*r, w)).unzip();
    let count = records.len();
    let result = if db.is_sqlite() {
        // `write` is one transaction already (a savepoint in it was two more round trips).
        db.write(move |conn| db::audit::append(conn, &records))
            .await
    } else {
        // PostgreSQL: one statement of its own after the head last written, else a transaction.
        db.run(
            move |conn| match db::audit::append_at_guess(conn, &records)? {
                Some(seqs) => Ok(seqs),
                None => db::write_tx(conn, |c| db::audit::append(c, &records)),
            },
        )
        .await
    };
    match result {
        Ok(seqs) => {
            metrics.audit_committed(count);
            for (waiter, seq) in waiters.into_iter().zip(seqs) {
                let _ = waiter.send(Ok(seq));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, records = count, "audit batch could not be written");
            metrics.audit_failed(count);
            for waiter in waiters {
                let _ = waiter.send(Err(Error::unavailable(
                    "the audit trail could not be written, so nothing was disclosed; retry shortly",
                )));
            }
        }
    }
}

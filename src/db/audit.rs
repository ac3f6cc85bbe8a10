//! Persistence of the audit chain. `append` must run inside the transaction of the change it
//! records; it locks the chain head first, so appends from any connection or process are
//! serialised and the chain stays linear.

use diesel::prelude::*;

use super::schema::{audit_events, audit_head};
use super::{prepared, DbConn};
use crate::audit::{chain_hash, AuditRecord, ChainedRecord};
use crate::error::Result;

#[derive(Insertable, Queryable)]
#[diesel(table_name = audit_events)]
// An absent value is bound as NULL (what the column defaults to anyway), so the statement's
// text is the same for every record and PostgreSQL keeps it prepared: with DEFAULT in place of
// absent values, each record was a new statement, parsed in a round trip of its own.
#[diesel(treat_none_as_default_value = false)]
struct Row {
    seq: i64,
    recorded_at: i64,
    org_id: Option<String>,
    user_id: Option<String>,
    user_role: Option<String>,
    purpose: Option<String>,
    client_addr: Option<String>,
    request_id: Option<String>,
    event_type: String,
    action: String,
    subtype: String,
    patient: Option<String>,
    entity: Option<String>,
    query: Option<String>,
    outcome: String,
    outcome_desc: Option<String>,
    prev_hash: String,
    hash: String,
    break_glass: Option<String>,
}

impl Row {
    fn new(seq: i64, r: &AuditRecord, prev_hash: String, hash: String) -> Row {
        Row {
            seq,
            recorded_at: r.recorded_at,
            org_id: r.org_id.clone(),
            user_id: r.user_id.clone(),
            user_role: r.user_role.clone(),
            purpose: r.purpose.clone(),
            client_addr: r.client_addr.clone(),
            request_id: r.request_id.clone(),
            event_type: r.event_type.clone(),
            action: r.action.clone(),
            subtype: r.subtype.clone(),
            patient: r.patient.clone(),
            entity: r.entity.clone(),
            query: r.query.clone(),
            outcome: r.outcome.clone(),
            outcome_desc: r.outcome_desc.clone(),
            prev_hash,
            hash,
            break_glass: r.break_glass.clone(),
        }
    }

    fn into_chained(self) -> ChainedRecord {
        ChainedRecord {
            seq: self.seq,
            record: AuditRecord {
                recorded_at: self.recorded_at,
                org_id: self.org_id,
                user_id: self.user_id,
                user_role: self.user_role,
                purpose: self.purpose,
                client_addr: self.client_addr,
                request_id: self.request_id,
                event_type: self.event_type,
                action: self.action,
                subtype: self.subtype,
                patient: self.patient,
                entity: self.entity,
                query: self.query,
                outcome: self.outcome,
                outcome_desc: self.outcome_desc,
                break_glass: self.break_glass,
            },
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// Takes the chain-head row lock (a write, so on SQLite it also takes the database write lock).
pub fn lock_head(conn: &mut DbConn) -> Result<()> {
    prepared::sql("UPDATE audit_head SET seq = seq WHERE id = 1").execute(conn)?;
    Ok(())
}

/// PostgreSQL: the head this process last appended or read, the next append's guess. A
/// guess that holds saves the round trip that locks and reads the head; one that does not
/// (another connection or process appended since, or the transaction that wrote it rolled
/// back) changes nothing, and the append locks and reads the head as it would have.
static GUESS: std::sync::Mutex<Option<(i64, String)>> = std::sync::Mutex::new(None);

fn guess() -> std::sync::MutexGuard<'static, Option<(i64, String)>> {
    GUESS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The records chained after the head `(seq, hash)`; the new head.
fn chain(mut seq: i64, hash: String, records: &[AuditRecord]) -> (Vec<Row>, i64, String) {
    let mut prev = hash;
    let mut rows = Vec::with_capacity(records.len());
    for record in records {
        seq += 1;
        let hash = chain_hash(&prev, seq, record);
        rows.push(Row::new(seq, record, prev, hash.clone()));
        prev = hash;
    }
    (rows, seq, prev)
}

/// PostgreSQL: the records appended after the head this process wrote last, if it is still
/// the head — `append_pg` is one statement, so outside a transaction it is its own, committed
/// (and on disk, with `synchronous_commit` on) when it returns: one round trip where `BEGIN`,
/// the statement and `COMMIT` were three. Their sequence numbers, or None when nothing was
/// written (SQLite, no head known, or another writer moved it): then `append` in a transaction.
pub fn append_at_guess(conn: &mut DbConn, records: &[AuditRecord]) -> Result<Option<Vec<i64>>> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(None);
    };
    if records.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let guessed = guess().clone();
    let Some((seq, hash)) = guessed else {
        return Ok(None);
    };
    let (rows, new_seq, new_hash) = chain(seq, hash.clone(), records);
    if !append_pg(pg, &rows, (seq, &hash), new_seq, &new_hash)? {
        // Stale: forgotten (unless another append has guessed since), so that the `append`
        // that follows locks and reads the head without sending this statement again.
        let mut guessed = guess();
        if guessed
            .as_ref()
            .is_some_and(|(s, h)| *s == seq && *h == hash)
        {
            *guessed = None;
        }
        return Ok(None);
    }
    *guess() = Some((new_seq, new_hash));
    Ok(Some(rows.iter().map(|r| r.seq).collect()))
}

/// Appends records to the chain; call inside a transaction. Returns their sequence numbers.
pub fn append(conn: &mut DbConn, records: &[AuditRecord]) -> Result<Vec<i64>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let seqs = |rows: &[Row]| rows.iter().map(|r| r.seq).collect();
    if let Some(seqs) = append_at_guess(conn, records)? {
        return Ok(seqs);
    }
    // The head, locked and read in one statement kept prepared (`db::prepared`): on
    // PostgreSQL a `SELECT … FOR UPDATE`; SQLite has no row locks, so there a write takes the
    // database's.
    #[derive(QueryableByName)]
    struct Head {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        hash: String,
    }
    let head = if conn.is_sqlite() {
        "UPDATE audit_head SET seq = seq WHERE id = 1 RETURNING seq, hash"
    } else {
        "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE"
    };
    let Head { seq, hash } = prepared::sql(head).get_result(conn)?;
    let (rows, new_seq, new_hash) = chain(seq, hash.clone(), records);
    match conn {
        DbConn::Postgresql(pg) => {
            if !append_pg(pg, &rows, (seq, &hash), new_seq, &new_hash)? {
                return Err(crate::error::Error::internal(
                    "the audit chain's head moved while locked",
                ));
            }
            *guess() = Some((new_seq, new_hash));
        }
        DbConn::Sqlite(_) => {
            for row in &rows {
                diesel::insert_into(audit_events::table)
                    .values(row)
                    .execute(conn)?;
            }
            prepared::sql("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")
                .bind::<diesel::sql_types::BigInt, _>(new_seq)
                .bind::<diesel::sql_types::Text, _>(&new_hash)
                .execute(conn)?;
        }
    }
    Ok(seqs(&rows))
}

/// PostgreSQL: the records and the new head in one statement, one round trip, whatever the
/// number of records (a column array per column: the text never varies, so it stays
/// prepared) — if the head is still `after`, which the statement locks and checks first
/// (read committed: a head another transaction moved is checked as it is now). Returns
/// whether it was, and so whether anything was written.
fn append_pg(
    pg: &mut diesel::PgConnection,
    rows: &[Row],
    after: (i64, &str),
    seq: i64,
    head: &str,
) -> Result<bool> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    type Texts = Array<Text>;
    type MaybeTexts = Array<Nullable<Text>>;
    fn col<'a, U>(rows: &'a [Row], f: impl Fn(&'a Row) -> U) -> Vec<U> {
        rows.iter().map(f).collect()
    }
    let updated = prepared::sql(
        "WITH head AS (SELECT 1 FROM audit_head WHERE id = 1 AND seq = ? AND hash = ? FOR UPDATE), \
         chained AS (INSERT INTO audit_events (seq, recorded_at, org_id, user_id, \
         user_role, purpose, client_addr, request_id, event_type, action, subtype, patient, \
         entity, query, outcome, outcome_desc, prev_hash, hash, break_glass) \
         SELECT * FROM unnest(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         WHERE EXISTS (SELECT 1 FROM head)) \
         UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1 AND EXISTS (SELECT 1 FROM head)",
    )
    .bind::<BigInt, _>(after.0)
    .bind::<Text, _>(after.1)
    .bind::<Array<BigInt>, _>(col(rows, |r| r.seq))
    .bind::<Array<BigInt>, _>(col(rows, |r| r.recorded_at))
    .bind::<MaybeTexts, _>(col(rows, |r| r.org_id.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.user_id.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.user_role.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.purpose.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.client_addr.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.request_id.as_deref()))
    .bind::<Texts, _>(col(rows, |r| r.event_type.as_str()))
    .bind::<Texts, _>(col(rows, |r| r.action.as_str()))
    .bind::<Texts, _>(col(rows, |r| r.subtype.as_str()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.patient.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.entity.as_deref()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.query.as_deref()))
    .bind::<Texts, _>(col(rows, |r| r.outcome.as_str()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.outcome_desc.as_deref()))
    .bind::<Texts, _>(col(rows, |r| r.prev_hash.as_str()))
    .bind::<Texts, _>(col(rows, |r| r.hash.as_str()))
    .bind::<MaybeTexts, _>(col(rows, |r| r.break_glass.as_deref()))
    .bind::<BigInt, _>(seq)
    .bind::<Text, _>(head)
    .execute(pg)?;
    Ok(updated == 1)
}

/// The chain in order, `limit` records after `after_seq`.
pub fn page(conn: &mut DbConn, after_seq: i64, limit: i64) -> Result<Vec<ChainedRecord>> {
    let rows: Vec<Row> = audit_events::table
        .filter(audit_events::seq.gt(after_seq))
        .order(audit_events::seq.asc())
        .limit(limit)
        .load(conn)?;
    Ok(rows.into_iter().map(Row::into_chained).collect())
}

/// The recorded end of the chain.
pub fn head(conn: &mut DbConn) -> Result<(i64, String)> {
    Ok(audit_head::table
        .filter(audit_head::id.eq(1))
        .select((audit_head::seq, audit_head::hash))
        .first(conn)?)
}

/// Search filters for AuditEvent; every field narrows the result.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub from_micros: Option<i64>,
    pub to_micros: Option<i64>,
    pub org_or_user: Option<String>,
    pub patient: Option<String>,
    pub entity: Option<String>,
    pub purpose: Option<String>,
    pub outcome: Option<String>,
    pub action: Option<String>,
    pub subtype: Option<String>,
    /// Only these subtypes (when not empty).
    pub subtypes: Vec<String>,
    /// Only break-the-glass accesses (true) or only others (false).
    pub break_glass: Option<bool>,
    /// Only records older than this sequence number (paging, newest first).
    pub before_seq: Option<i64>,
}

/// Newest first; at most `limit` records.
pub fn search(conn: &mut DbConn, f: &AuditFilter, limit: i64) -> Result<Vec<ChainedRecord>> {
    let mut q = audit_events::table.into_boxed();
    if let Some(v) = f.from_micros {
        q = q.filter(audit_events::recorded_at.ge(v));
    }
    if let Some(v) = f.to_micros {
        q = q.filter(audit_events::recorded_at.lt(v));
    }
    if let Some(v) = &f.org_or_user {
        q = q.filter(
            audit_events::org_id
                .eq(v.clone())
                .or(audit_events::user_id.eq(v.clone())),
        );
    }
    if let Some(v) = &f.patient {
        q = q.filter(audit_events::patient.eq(v.clone()));
    }
    if let Some(v) = &f.entity {
        q = q.filter(audit_events::entity.eq(v.clone()));
    }
    if let Some(v) = &f.purpose {
        q = q.filter(audit_events::purpose.eq(v.clone()));
    }
    if let Some(v) = &f.outcome {
        q = q.filter(audit_events::outcome.eq(v.clone()));
    }
    if let Some(v) = &f.action {
        q = q.filter(audit_events::action.eq(v.clone()));
    }
    if let Some(v) = &f.subtype {
        q = q.filter(audit_events::subtype.eq(v.clone()));
    }
    if !f.subtypes.is_empty() {
        q = q.filter(audit_events::subtype.eq_any(f.subtypes.clone()));
    }
    match f.break_glass {
        Some(true) => q = q.filter(audit_events::break_glass.is_not_null()),
        Some(false) => q = q.filter(audit_events::break_glass.is_null()),
        None => {}
    }
    if let Some(v) = f.before_seq {
        q = q.filter(audit_events::seq.lt(v));
    }
    let rows: Vec<Row> = q.order(audit_events::seq.desc()).limit(limit).load(conn)?;
    Ok(rows.into_iter().map(Row::into_chained).collect())
}

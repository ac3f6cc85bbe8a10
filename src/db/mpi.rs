//! Queries of the master patient index.

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::AggregateExpressionMethods;
use std::collections::{HashMap, HashSet};

use super::schema::{
    blocking_keys, identities, identity_history, match_decisions, match_reviews, non_matches,
    source_identifiers, source_records,
};
use super::{prepared, DbConn};
use crate::error::Result;
use crate::mpi::normalize::{key_id, KeyId};
use diesel::sql_types::{BigInt, Double, Nullable, Text};

#[derive(Debug, Clone, Queryable, QueryableByName)]
#[diesel(table_name = source_records)]
pub struct SourceRow {
    pub id: i64,
    pub org_id: String,
    pub system: String,
    pub value: String,
    pub enterprise_id: i64,
    pub status: String,
    pub replaced_by: Option<i64>,
    pub link_kind: String,
    pub version: i64,
    pub resource: String,
    pub family: Option<String>,
    pub given: Option<String>,
    pub family_phonetic: Option<String>,
    pub given_phonetic: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    pub postcode: Option<String>,
    pub phone: Option<String>,
    pub demographics: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// What the person's consent hides (see `db::consent::refresh_hides`).
    pub consent_hides: String,
}

/// The searchable and matchable content of a source record.
#[derive(Debug, Clone, AsChangeset, Insertable)]
#[diesel(table_name = source_records)]
pub struct SourceContent {
    pub resource: String,
    pub family: Option<String>,
    pub given: Option<String>,
    pub family_phonetic: Option<String>,
    pub given_phonetic: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    pub postcode: Option<String>,
    pub phone: Option<String>,
    pub demographics: String,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable)]
pub struct IdentityRow {
    pub id: i64,
    pub status: String,
    pub merged_into: Option<i64>,
    pub golden: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Queryable)]
pub struct ReviewRow {
    pub id: i64,
    pub source_a: i64,
    pub source_b: i64,
    pub kind: String,
    pub score: f64,
    pub breakdown: String,
    pub status: String,
    pub created_at: i64,
    pub resolved_at: Option<i64>,
    pub resolved_by: Option<String>,
}

#[derive(Debug, Clone, Queryable)]
pub struct HistoryRow {
    pub id: i64,
    pub enterprise_id: i64,
    pub action: String,
    pub detail: String,
    pub actor: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Queryable)]
pub struct DecisionRow {
    pub id: i64,
    pub source_id: i64,
    pub candidate_id: Option<i64>,
    pub outcome: String,
    pub score: Option<f64>,
    pub breakdown: String,
    pub created_at: i64,
}

pub fn find_source(conn: &mut DbConn, system: &str, value: &str) -> Result<Option<SourceRow>> {
    Ok(source_records::table
        .filter(source_records::system.eq(system))
        .filter(source_records::value.eq(value))
        .first(conn)
        .optional()?)
}

pub fn get_source(conn: &mut DbConn, id: i64) -> Result<Option<SourceRow>> {
    Ok(source_records::table.find(id).first(conn).optional()?)
}

pub fn get_sources(conn: &mut DbConn, ids: &[i64]) -> Result<Vec<SourceRow>> {
    if conn.is_sqlite() {
        // The ids as one JSON array: the statement stays prepared, whatever their number.
        return Ok(prepared::sql(
            "SELECT * FROM source_records WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
        )
        .bind::<Text, _>(json_array(ids)?)
        .load(conn)?);
    }
    Ok(source_records::table
        .filter(source_records::id.eq_any(ids))
        .order(source_records::id.asc())
        .load(conn)?)
}

/// A JSON array, for SQLite's `json_each(?)`: a list bound as one value keeps the statement
/// prepared (an `IN (?, ?, …)` list is parsed again for every length).
fn json_array<T: serde::Serialize>(values: &[T]) -> Result<String> {
    serde_json::to_string(values)
        .map_err(|e| crate::error::Error::internal(format!("JSON array for a lookup: {e}")))
}

pub fn insert_identity(conn: &mut DbConn, now: i64) -> Result<i64> {
    Ok(diesel::insert_into(identities::table)
        .values((
            identities::status.eq("active"),
            identities::golden.eq("{}"),
            identities::created_at.eq(now),
            identities::updated_at.eq(now),
        ))
        .returning(identities::id)
        .get_result(conn)?)
}

pub fn get_identity(conn: &mut DbConn, id: i64) -> Result<Option<IdentityRow>> {
    Ok(identities::table.find(id).first(conn).optional()?)
}

pub fn get_identities(conn: &mut DbConn, ids: &[i64]) -> Result<Vec<IdentityRow>> {
    Ok(identities::table
        .filter(identities::id.eq_any(ids))
        .load(conn)?)
}

pub fn set_golden(conn: &mut DbConn, id: i64, golden: &str, now: i64) -> Result<()> {
    set_goldens(conn, &[(id, golden.to_owned())], now)
}

/// `set_golden` for many identities: on PostgreSQL one statement (a round trip each was most
/// of a linking load's time there), on SQLite one statement kept prepared.
pub fn set_goldens(conn: &mut DbConn, goldens: &[(i64, String)], now: i64) -> Result<()> {
    if goldens.is_empty() {
        return Ok(());
    }
    match conn {
        DbConn::Postgresql(pg) => {
            let (ids, texts): (Vec<i64>, Vec<&str>) =
                goldens.iter().map(|(id, g)| (*id, g.as_str())).unzip();
            prepared::sql(
                "UPDATE identities AS i SET golden = v.golden, updated_at = ? \
                 FROM unnest(?, ?) AS v(id, golden) WHERE i.id = v.id",
            )
            .bind::<BigInt, _>(now)
            .bind::<diesel::sql_types::Array<BigInt>, _>(ids)
            .bind::<diesel::sql_types::Array<Text>, _>(texts)
            .execute(pg)?;
        }
        DbConn::Sqlite(_) => {
            for (id, golden) in goldens {
                prepared::sql("UPDATE identities SET golden = ?, updated_at = ? WHERE id = ?")
                    .bind::<Text, _>(golden)
                    .bind::<BigInt, _>(now)
                    .bind::<BigInt, _>(*id)
                    .execute(conn)?;
            }
        }
    }
    Ok(())
}

pub fn set_identity_status(
    conn: &mut DbConn,
    id: i64,
    status: &str,
    merged_into: Option<i64>,
    now: i64,
) -> Result<()> {
    diesel::update(identities::table.find(id))
        .set((
            identities::status.eq(status),
            identities::merged_into.eq(merged_into),
            identities::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn insert_source(
    conn: &mut DbConn,
    org_id: &str,
    system: &str,
    value: &str,
    enterprise_id: i64,
    link_kind: &str,
    content: &SourceContent,
    now: i64,
) -> Result<i64> {
    Ok(diesel::insert_into(source_records::table)
        .values((
            source_records::org_id.eq(org_id),
            source_records::system.eq(system),
            source_records::value.eq(value),
            source_records::enterprise_id.eq(enterprise_id),
            source_records::status.eq("active"),
            source_records::link_kind.eq(link_kind),
            source_records::version.eq(1i64),
            source_records::created_at.eq(now),
            content,
        ))
        .returning(source_records::id)
        .get_result(conn)?)
}

pub fn update_source_content(conn: &mut DbConn, id: i64, content: &SourceContent) -> Result<()> {
    diesel::update(source_records::table.find(id))
        .set((
            content,
            source_records::version.eq(source_records::version + 1i64),
            source_records::status.eq("active"),
            source_records::replaced_by.eq(None::<i64>),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn set_source_identity(
    conn: &mut DbConn,
    id: i64,
    enterprise_id: i64,
    link_kind: &str,
) -> Result<()> {
    diesel::update(source_records::table.find(id))
        .set((
            source_records::enterprise_id.eq(enterprise_id),
            source_records::link_kind.eq(link_kind),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn set_source_status(
    conn: &mut DbConn,
    id: i64,
    status: &str,
    replaced_by: Option<i64>,
    now: i64,
) -> Result<()> {
    diesel::update(source_records::table.find(id))
        .set((
            source_records::status.eq(status),
            source_records::replaced_by.eq(replaced_by),
            source_records::updated_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

/// Active source records of an identity.
pub fn members(conn: &mut DbConn, enterprise_id: i64) -> Result<Vec<SourceRow>> {
    Ok(source_records::table
        .filter(source_records::enterprise_id.eq(enterprise_id))
        .filter(source_records::status.eq("active"))
        .order(source_records::id.asc())
        .load(conn)?)
}

/// Active source records of several identities.
pub fn members_of(conn: &mut DbConn, enterprise_ids: &[i64]) -> Result<Vec<SourceRow>> {
    Ok(source_records::table
        .filter(source_records::enterprise_id.eq_any(enterprise_ids))
        .filter(source_records::status.eq("active"))
        .order(source_records::id.asc())
        .load(conn)?)
}

/// Replaced source records that point into an identity (their identifiers still resolve there).
pub fn retired_members_of(conn: &mut DbConn, enterprise_ids: &[i64]) -> Result<Vec<SourceRow>> {
    Ok(source_records::table
        .filter(source_records::enterprise_id.eq_any(enterprise_ids))
        .filter(source_records::status.eq("replaced"))
        .load(conn)?)
}

pub fn replace_identifiers(
    conn: &mut DbConn,
    source_id: i64,
    ids: &[(String, String)],
) -> Result<()> {
    diesel::delete(source_identifiers::table.filter(source_identifiers::source_id.eq(source_id)))
        .execute(conn)?;
    for (system, value) in ids {
        diesel::insert_into(source_identifiers::table)
            .values((
                source_identifiers::system.eq(system),
                source_identifiers::value.eq(value),
                source_identifiers::source_id.eq(source_id),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Every identifier of `records` — (id, system, value) of each, as its row holds it — by
/// record and system: the one each is stored under and those filed in `source_identifiers`.
pub fn identifiers_of(
    conn: &mut DbConn,
    records: &[(i64, &str, &str)],
) -> Result<Vec<(i64, String, String)>> {
    let ids: Vec<i64> = records.iter().map(|r| r.0).collect();
    let mut out: Vec<(i64, String, String)> = source_identifiers::table
        .filter(source_identifiers::source_id.eq_any(&ids))
        .select((
            source_identifiers::source_id,
            source_identifiers::system,
            source_identifiers::value,
        ))
        .load(conn)?;
    out.extend(
        records
            .iter()
            .map(|(id, system, value)| (*id, system.to_string(), value.to_string())),
    );
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Source records carrying an identifier (any status).
pub fn sources_with_identifier(conn: &mut DbConn, system: &str, value: &str) -> Result<Vec<i64>> {
    Ok(source_identifiers::table
        .filter(source_identifiers::system.eq(system))
        .filter(source_identifiers::value.eq(value))
        .select(source_identifiers::source_id)
        .load(conn)?)
}

pub fn system_in_use(conn: &mut DbConn, system: &str) -> Result<bool> {
    let n: i64 = source_identifiers::table
        .filter(source_identifiers::system.eq(system))
        .count()
        .get_result(conn)?;
    Ok(n > 0)
}

/// Moves a record from its `old` blocking keys to `new` ones, touching only the difference.
/// Keys are deleted by primary key (key, source_id), so no index on source_id is needed.
pub fn update_blocking_keys(
    conn: &mut DbConn,
    source_id: i64,
    old: &[KeyId],
    new: &[KeyId],
) -> Result<()> {
    let gone: Vec<KeyId> = old.iter().copied().filter(|k| !new.contains(k)).collect();
    if !gone.is_empty() {
        diesel::delete(
            blocking_keys::table
                .filter(blocking_keys::key.eq_any(gone))
                .filter(blocking_keys::source_id.eq(source_id)),
        )
        .execute(conn)?;
    }
    for key in new.iter().filter(|k| !old.contains(k)) {
        diesel::insert_into(blocking_keys::table)
            .values((
                blocking_keys::key.eq(key),
                blocking_keys::source_id.eq(source_id),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Text keys read at a time by `rekey_blocking_keys`.
pub const REKEY_PAGE: i64 = 50_000;

/// Moves the blocking keys filed as text before key ids (migration `2026-11-25-000009`, which
/// renamed their table `blocking_keys_text`) to their ids (`normalize::key_id`) and drops the
/// text table, in one transaction, reading `page` keys at a time along its primary key; run
/// right after the migrations. Does nothing when there is no text table. Returns the number
/// of keys moved.
pub fn rekey_blocking_keys(conn: &mut DbConn, page: i64) -> Result<usize> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    #[derive(QueryableByName)]
    struct TextKey {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        source_id: i64,
    }
    let probe = if conn.is_sqlite() {
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'blocking_keys_text'"
    } else {
        "SELECT count(*) AS n FROM information_schema.tables \
         WHERE table_name = 'blocking_keys_text' AND table_schema = current_schema()"
    };
    let pending = |c: &mut DbConn| -> Result<bool> {
        let found: Count = diesel::sql_query(probe).get_result(c)?;
        Ok(found.n > 0)
    };
    if !pending(conn)? {
        return Ok(0);
    }
    // Holding the write lock from the start, and looking again: another process starting at
    // the same time (`hie serve` and `hie import` on one SQLite file) may have moved them.
    super::write_tx(conn, |c| {
        if !pending(c)? {
            return Ok(0);
        }
        let mut moved = 0;
        // Past the last row read, by row value: both backends walk the primary key from there
        // (an OR of the two columns made PostgreSQL scan from the start for every page).
        let (mut key, mut source_id) = (String::new(), i64::MIN);
        loop {
            let rows: Vec<TextKey> = match &mut *c {
                DbConn::Sqlite(c) => diesel::sql_query(
                    "SELECT key, source_id FROM blocking_keys_text \
                     WHERE (key, source_id) > (?, ?) ORDER BY key, source_id LIMIT ?",
                )
                .bind::<Text, _>(&key)
                .bind::<BigInt, _>(source_id)
                .bind::<BigInt, _>(page)
                .load(c)?,
                DbConn::Postgresql(c) => diesel::sql_query(
                    "SELECT key, source_id FROM blocking_keys_text \
                     WHERE (key, source_id) > ($1, $2) ORDER BY key, source_id LIMIT $3",
                )
                .bind::<Text, _>(&key)
                .bind::<BigInt, _>(source_id)
                .bind::<BigInt, _>(page)
                .load(c)?,
            };
            let Some(last) = rows.last() else {
                break;
            };
            (key, source_id) = (last.key.clone(), last.source_id);
            let mut ids: Vec<(KeyId, i64)> =
                rows.iter().map(|r| (key_id(&r.key), r.source_id)).collect();
            ids.sort_unstable();
            ids.dedup();
            moved += rows.len();
            for chunk in ids.chunks(ROWS_PER_INSERT) {
                let values: Vec<_> = chunk
                    .iter()
                    .map(|(k, id)| (blocking_keys::key.eq(*k), blocking_keys::source_id.eq(*id)))
                    .collect();
                // Two texts of one record with one hash: filed once.
                match &mut *c {
                    DbConn::Sqlite(c) => {
                        for v in values {
                            diesel::insert_or_ignore_into(blocking_keys::table)
                                .values(v)
                                .execute(c)?;
                        }
                    }
                    DbConn::Postgresql(c) => {
                        diesel::insert_into(blocking_keys::table)
                            .values(values)
                            .on_conflict_do_nothing()
                            .execute(c)?;
                    }
                }
            }
        }
        c.batch_execute("DROP TABLE blocking_keys_text")?;
        Ok(moved)
    })
}

/// Records filed under one blocking key read at most: a crowded key (a common surname and
/// birth year) adds nothing past this that the record's other keys do not find.
pub const BUCKET_READ: i64 = 256;

/// Active records sharing blocking keys with a record, ranked by `rank_candidates`, at most
/// `limit`.
pub fn candidates(
    conn: &mut DbConn,
    keys: &[KeyId],
    exclude: Option<i64>,
    limit: i64,
    crowded: usize,
) -> Result<Vec<CandidateRow>> {
    let mut buckets = buckets(conn, keys)?;
    for ids in &mut buckets {
        ids.retain(|id| Some(*id) != exclude);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let ids = rank_candidates(&buckets, limit, crowded);
    // What matching reads of a candidate, not the whole row (its Patient resource is most of it).
    let mut rows = matchable(conn, &ids)?;
    rows.sort_by_key(|r| ids.iter().position(|id| *id == r.0));
    Ok(rows)
}

/// Per key, the records filed under it, newest first, at most `BUCKET_READ`: each key walked
/// along the primary key, so a crowded key costs BUCKET_READ entries and no more.
fn buckets(conn: &mut DbConn, keys: &[KeyId]) -> Result<Vec<Vec<i64>>> {
    if let DbConn::Postgresql(pg) = conn {
        // All keys in one round trip (a `$match` has ten).
        #[derive(QueryableByName)]
        struct Filed {
            #[diesel(sql_type = BigInt)]
            key: i64,
            #[diesel(sql_type = BigInt)]
            source_id: i64,
        }
        let rows: Vec<Filed> = prepared::sql(
            "SELECT k.key, b.source_id FROM unnest(?) AS k(key) CROSS JOIN LATERAL \
             (SELECT source_id FROM blocking_keys WHERE key = k.key \
              ORDER BY source_id DESC LIMIT ?) AS b",
        )
        .bind::<diesel::sql_types::Array<BigInt>, _>(keys)
        .bind::<BigInt, _>(BUCKET_READ)
        .load(pg)?;
        let mut filed: HashMap<KeyId, Vec<i64>> = HashMap::new();
        for r in rows {
            filed.entry(r.key).or_default().push(r.source_id);
        }
        for ids in filed.values_mut() {
            ids.sort_unstable_by(|a, b| b.cmp(a));
        }
        return Ok(keys
            .iter()
            .map(|k| filed.get(k).cloned().unwrap_or_default())
            .collect());
    }
    keys.iter()
        .map(|key| {
            Ok(blocking_keys::table
                .filter(blocking_keys::key.eq(key))
                .order(blocking_keys::source_id.desc())
                .select(blocking_keys::source_id)
                .limit(BUCKET_READ)
                .load(conn)?)
        })
        .collect()
}

/// Records filed under `key`, at most `limit`.
pub fn filed_under(conn: &mut DbConn, key: KeyId, limit: i64) -> Result<Vec<i64>> {
    Ok(blocking_keys::table
        .filter(blocking_keys::key.eq(key))
        .select(blocking_keys::source_id)
        .limit(limit)
        .load(conn)?)
}

/// When the feed decides (and `hie import`, which decides alike), buckets holding more records
/// than this are crowded. At a million people a single shared key with a bucket of 9–32 — a
/// sound-alike surname and birth year, a common given and family name — brought most of the
/// ~25 candidates a record had, and half of the matcher's CPU; they made no link at 1M or on
/// FEBRL (the same links without them), and the review items they made were, in a sample,
/// same-name people born years apart. Was 32. `hie mpi estimate` samples pairs the same way,
/// so the weights are fitted on the pairs the feed scores.
pub const CROWDED: usize = 8;

/// For `$match`, which decides nothing: an ER's partial or mistyped demographics may share a
/// single common key with the person sought, and a few more candidates to score cost a query
/// little.
pub const CROWDED_FOR_SEARCH: usize = 32;

/// Candidates from the buckets of a record's blocking keys (record ids, larger = newer): those
/// sharing more keys first, then the newest, at most `limit`. A record that shares a single
/// key with the incoming one, and that key is crowded, is not a candidate: in a region of a
/// million people "same sounding surname, same birth year" alone is no lead, and scoring every
/// such record is what made matching slow at scale. Any second shared key makes it one.
pub fn rank_candidates<B: AsRef<[i64]>>(buckets: &[B], limit: usize, crowded: usize) -> Vec<i64> {
    // FNV rather than SipHash for the ids (the matcher's hottest maps, here and in
    // `bulk::gather`): 3 % of the matcher's CPU in the 1M import. The keys are record ids and
    // blocking-key hashes, written by authenticated members only.
    let ids: usize = buckets.iter().map(|b| b.as_ref().len()).sum();
    let mut found: fnv::FnvHashMap<i64, (usize, bool)> =
        fnv::FnvHashMap::with_capacity_and_hasher(ids, Default::default());
    for bucket in buckets {
        let bucket = bucket.as_ref();
        let crowded = bucket.len() > crowded;
        for id in bucket {
            let e = found.entry(*id).or_insert((0, true));
            e.0 += 1;
            e.1 &= crowded;
        }
    }
    let mut ranked: Vec<(usize, i64)> = found
        .into_iter()
        .filter(|(_, (shared, crowded_only))| *shared > 1 || !crowded_only)
        .map(|(id, (shared, _))| (shared, id))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.truncate(limit);
    ranked.into_iter().map(|(_, id)| id).collect()
}

pub fn non_matches_of(conn: &mut DbConn, source_id: i64) -> Result<HashSet<i64>> {
    let a: Vec<i64> = non_matches::table
        .filter(non_matches::source_a.eq(source_id))
        .select(non_matches::source_b)
        .load(conn)?;
    let b: Vec<i64> = non_matches::table
        .filter(non_matches::source_b.eq(source_id))
        .select(non_matches::source_a)
        .load(conn)?;
    Ok(a.into_iter().chain(b).collect())
}

fn ordered(a: i64, b: i64) -> (i64, i64) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

pub fn insert_non_match(conn: &mut DbConn, a: i64, b: i64, now: i64) -> Result<()> {
    let (a, b) = ordered(a, b);
    let exists: i64 = non_matches::table
        .filter(non_matches::source_a.eq(a))
        .filter(non_matches::source_b.eq(b))
        .count()
        .get_result(conn)?;
    if exists == 0 {
        diesel::insert_into(non_matches::table)
            .values((
                non_matches::source_a.eq(a),
                non_matches::source_b.eq(b),
                non_matches::created_at.eq(now),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// Queues a review unless the pair already has one. Returns whether it was queued.
pub fn insert_review(
    conn: &mut DbConn,
    a: i64,
    b: i64,
    kind: &str,
    score: f64,
    breakdown: &str,
    now: i64,
) -> Result<bool> {
    let (a, b) = ordered(a, b);
    let exists: i64 = match_reviews::table
        .filter(match_reviews::source_a.eq(a))
        .filter(match_reviews::source_b.eq(b))
        .count()
        .get_result(conn)?;
    if exists > 0 {
        return Ok(false);
    }
    diesel::insert_into(match_reviews::table)
        .values((
            match_reviews::source_a.eq(a),
            match_reviews::source_b.eq(b),
            match_reviews::kind.eq(kind),
            match_reviews::score.eq(score),
            match_reviews::breakdown.eq(breakdown),
            match_reviews::status.eq("open"),
            match_reviews::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(true)
}

pub fn reviews(
    conn: &mut DbConn,
    status: &str,
    after_id: i64,
    limit: i64,
) -> Result<Vec<ReviewRow>> {
    Ok(match_reviews::table
        .filter(match_reviews::status.eq(status))
        .filter(match_reviews::id.gt(after_id))
        .order(match_reviews::id.asc())
        .limit(limit)
        .load(conn)?)
}

pub fn count_reviews(conn: &mut DbConn, status: &str) -> Result<i64> {
    Ok(match_reviews::table
        .filter(match_reviews::status.eq(status))
        .count()
        .get_result(conn)?)
}

pub fn get_review(conn: &mut DbConn, id: i64) -> Result<Option<ReviewRow>> {
    Ok(match_reviews::table.find(id).first(conn).optional()?)
}

pub fn resolve_review(conn: &mut DbConn, id: i64, status: &str, by: &str, now: i64) -> Result<()> {
    diesel::update(match_reviews::table.find(id))
        .set((
            match_reviews::status.eq(status),
            match_reviews::resolved_at.eq(Some(now)),
            match_reviews::resolved_by.eq(Some(by)),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn insert_decision(
    conn: &mut DbConn,
    source_id: i64,
    candidate_id: Option<i64>,
    outcome: &str,
    score: Option<f64>,
    breakdown: &str,
    now: i64,
) -> Result<()> {
    diesel::insert_into(match_decisions::table)
        .values((
            match_decisions::source_id.eq(source_id),
            match_decisions::candidate_id.eq(candidate_id),
            match_decisions::outcome.eq(outcome),
            match_decisions::score.eq(score),
            match_decisions::breakdown.eq(breakdown),
            match_decisions::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn decisions(conn: &mut DbConn, source_id: i64) -> Result<Vec<DecisionRow>> {
    Ok(match_decisions::table
        .filter(match_decisions::source_id.eq(source_id))
        .order(match_decisions::id.asc())
        .load(conn)?)
}

pub fn insert_history(
    conn: &mut DbConn,
    enterprise_id: i64,
    action: &str,
    detail: &str,
    actor: Option<&str>,
    now: i64,
) -> Result<()> {
    diesel::insert_into(identity_history::table)
        .values((
            identity_history::enterprise_id.eq(enterprise_id),
            identity_history::action.eq(action),
            identity_history::detail.eq(detail),
            identity_history::actor.eq(actor),
            identity_history::created_at.eq(now),
        ))
        .execute(conn)?;
    Ok(())
}

pub fn history(conn: &mut DbConn, enterprise_id: i64) -> Result<Vec<HistoryRow>> {
    Ok(identity_history::table
        .filter(identity_history::enterprise_id.eq(enterprise_id))
        .order(identity_history::id.asc())
        .load(conn)?)
}

/// PDQm criteria over active source records; every given criterion must hold.
#[derive(Debug, Clone, Default)]
pub struct PdqCriteria {
    pub family_prefix: Option<String>,
    pub family_exact: Option<String>,
    pub family_phonetic: Option<String>,
    pub given_prefix: Option<String>,
    pub given_exact: Option<String>,
    pub given_phonetic: Option<String>,
    pub birth_date_from: Option<String>,
    pub birth_date_to: Option<String>,
    pub gender: Option<String>,
    pub postcode: Option<String>,
    pub phone: Option<String>,
    /// Restrict to these source records (from an identifier search).
    pub source_ids: Option<Vec<i64>>,
    /// Leave out the people whose consent hides them from this requester.
    pub hidden_from: Option<HiddenFrom>,
}

impl PdqCriteria {
    /// Restricts the search to `ids` (and to the records it was restricted to before).
    pub fn narrow_to(&mut self, ids: Vec<i64>) {
        self.source_ids = Some(match self.source_ids.take() {
            Some(prev) => prev.into_iter().filter(|x| ids.contains(x)).collect(),
            None => ids,
        });
    }
}

/// Consent, as PDQm applies it in SQL: people with an active directive that hides them from
/// `org`, and (unless break-the-glass overrides it) people who opted out.
#[derive(Debug, Clone, Default)]
pub struct HiddenFrom {
    pub org: String,
    pub opted_out: bool,
}

/// The values starting with `prefix`, as a range an index walks: `[prefix, prefix + U+10FFFF)`
/// in byte order. `LIKE 'prefix%'` could not use the name and postcode indexes on either
/// backend — SQLite's `LIKE` ignores case, so its index is no help, and PostgreSQL uses one
/// for `LIKE` only under the C collation — so PDQm's `family=`, `given=` and
/// `address-postalcode=` read the whole table (0.47 s at 1M patients on each backend). The
/// columns compare bytes on both (SQLite's BINARY; `COLLATE "C"` on PostgreSQL, migration
/// 000013), where byte order is code point order: every value with the prefix sorts at or
/// after it and before it followed by the last code point, which no normalised value holds.
pub fn prefix_range(prefix: &str) -> (String, String) {
    (prefix.to_string(), format!("{prefix}{}", char::MAX))
}

fn pdq_query<'a>(c: &'a PdqCriteria) -> source_records::BoxedQuery<'a, super::MultiBackend> {
    let mut q = source_records::table
        .filter(source_records::status.eq("active"))
        .into_boxed();
    if let Some(v) = &c.family_prefix {
        let (from, to) = prefix_range(v);
        q = q.filter(
            source_records::family
                .ge(from)
                .and(source_records::family.lt(to)),
        );
    }
    if let Some(v) = &c.family_exact {
        q = q.filter(source_records::family.eq(v));
    }
    if let Some(v) = &c.family_phonetic {
        q = q.filter(source_records::family_phonetic.eq(v));
    }
    if let Some(v) = &c.given_prefix {
        let (from, to) = prefix_range(v);
        q = q.filter(
            source_records::given
                .ge(from)
                .and(source_records::given.lt(to)),
        );
    }
    if let Some(v) = &c.given_exact {
        q = q.filter(source_records::given.eq(v));
    }
    if let Some(v) = &c.given_phonetic {
        q = q.filter(source_records::given_phonetic.eq(v));
    }
    if let Some(v) = &c.birth_date_from {
        q = q.filter(source_records::birth_date.ge(v));
    }
    if let Some(v) = &c.birth_date_to {
        q = q.filter(source_records::birth_date.lt(v));
    }
    if let Some(v) = &c.gender {
        q = q.filter(source_records::gender.eq(v));
    }
    if let Some(v) = &c.postcode {
        let (from, to) = prefix_range(v);
        q = q.filter(
            source_records::postcode
                .ge(from)
                .and(source_records::postcode.lt(to)),
        );
    }
    if let Some(v) = &c.phone {
        q = q.filter(source_records::phone.eq(v));
    }
    if let Some(ids) = &c.source_ids {
        q = q.filter(source_records::id.eq_any(ids.clone()));
    }
    if let Some(h) = &c.hidden_from {
        if h.opted_out {
            q = q.filter(source_records::consent_hides.ne("*"));
        }
        if !h.org.is_empty() {
            q = q.filter(diesel::dsl::not(
                source_records::consent_hides.like(format!("%,{},%", h.org)),
            ));
        }
    }
    q
}

/// Enterprise ids of the people matching, ordered, one page; and how many people match.
pub fn pdq_search(
    conn: &mut DbConn,
    c: &PdqCriteria,
    offset: i64,
    limit: i64,
) -> Result<(Vec<i64>, i64)> {
    let total: i64 = pdq_query(c)
        .select(diesel::dsl::count(source_records::enterprise_id).aggregate_distinct())
        .first(conn)?;
    let ids: Vec<i64> = pdq_query(c)
        .select(source_records::enterprise_id)
        .distinct()
        .order(source_records::enterprise_id.asc())
        .offset(offset)
        .limit(limit)
        .load(conn)?;
    Ok((ids, total))
}

pub fn count_active_sources(conn: &mut DbConn) -> Result<i64> {
    Ok(source_records::table
        .filter(source_records::status.eq("active"))
        .count()
        .get_result(conn)?)
}

/// Open review items: (potential matches across members, potential duplicates within one).
pub fn review_queue_kinds(conn: &mut DbConn) -> Result<(i64, i64)> {
    let count = |conn: &mut DbConn, kind: &str| -> Result<i64> {
        Ok(match_reviews::table
            .filter(match_reviews::status.eq("open"))
            .filter(match_reviews::kind.eq(kind))
            .count()
            .get_result(conn)?)
    };
    Ok((
        count(conn, "potential-match")?,
        count(conn, "potential-duplicate")?,
    ))
}

// ---- Bulk loading: set-at-a-time reads and multi-row writes (see `mpi::bulk`). ----

/// Rows per multi-row INSERT: well under SQLite's 32,766 and PostgreSQL's 65,535 bound
/// parameters for the widest table.
const ROWS_PER_INSERT: usize = 500;
/// Values per `IN (…)` list.
const VALUES_PER_LOOKUP: usize = 5000;

/// Which of `values` are already stored under `system` (any status).
pub fn existing_values(
    conn: &mut DbConn,
    system: &str,
    values: &[&str],
) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    if conn.is_sqlite() {
        #[derive(QueryableByName)]
        struct Value {
            #[diesel(sql_type = Text)]
            value: String,
        }
        let found: Vec<Value> = prepared::sql(
            "SELECT value FROM source_records \
             WHERE system = ? AND value IN (SELECT value FROM json_each(?))",
        )
        .bind::<Text, _>(system)
        .bind::<Text, _>(json_array(values)?)
        .load(conn)?;
        out.extend(found.into_iter().map(|v| v.value));
        return Ok(out);
    }
    for chunk in values.chunks(VALUES_PER_LOOKUP) {
        let found: Vec<String> = source_records::table
            .filter(source_records::system.eq(system))
            .filter(source_records::value.eq_any(chunk))
            .select(source_records::value)
            .load(conn)?;
        out.extend(found);
    }
    Ok(out)
}

/// What matching a feed batch reads first: the newest record's id, which of the batch's
/// identifier values are stored, and the records filed under each of its keys.
pub struct FirstReads {
    pub newest: i64,
    pub existing: HashSet<String>,
    pub hits: Vec<(KeyId, i64)>,
}

/// PostgreSQL: `FirstReads` in one statement — one snapshot, one round trip (three before; a
/// small feed batch's reads are mostly round trips). For at most `VALUES_PER_LOOKUP` values
/// and keys, else None: an import's batches read as before.
pub fn first_reads(
    conn: &mut DbConn,
    system: &str,
    values: &[&str],
    keys: &[KeyId],
) -> Result<Option<FirstReads>> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(None);
    };
    if values.len() > VALUES_PER_LOOKUP || keys.len() > VALUES_PER_LOOKUP {
        return Ok(None);
    }
    #[derive(QueryableByName)]
    struct Read {
        #[diesel(sql_type = diesel::sql_types::Integer)]
        kind: i32,
        #[diesel(sql_type = BigInt)]
        a: i64,
        #[diesel(sql_type = BigInt)]
        b: i64,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        v: Option<String>,
    }
    let rows: Vec<Read> = prepared::sql(
        "SELECT 0 AS kind, COALESCE(MAX(id), 0) AS a, 0::bigint AS b, NULL::text AS v \
         FROM source_records \
         UNION ALL SELECT 1, 0, 0, value FROM source_records WHERE system = ? AND value = ANY(?) \
         UNION ALL SELECT 2, key, source_id, NULL FROM blocking_keys WHERE key = ANY(?)",
    )
    .bind::<Text, _>(system)
    .bind::<diesel::sql_types::Array<Text>, _>(values)
    .bind::<diesel::sql_types::Array<BigInt>, _>(keys)
    .load(pg)?;
    let mut out = FirstReads {
        newest: 0,
        existing: HashSet::new(),
        hits: Vec::with_capacity(rows.len()),
    };
    for r in rows {
        match (r.kind, r.v) {
            (0, _) => out.newest = r.a,
            (1, Some(v)) => {
                out.existing.insert(v);
            }
            _ => out.hits.push((r.a, r.b)),
        }
    }
    Ok(Some(out))
}

/// (position in `keys`, source id) of every record filed under one of `keys`. On SQLite the
/// keys go in as one JSON array and come back as their positions: a batch's lookup returns
/// millions of rows at 1M patients.
pub fn key_hits(conn: &mut DbConn, keys: &[KeyId]) -> Result<Vec<(usize, i64)>> {
    #[derive(QueryableByName)]
    struct Hit {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = BigInt)]
        id: i64,
    }
    let mut out = Vec::new();
    // Looked up in key order: each lookup then walks down next to the one before, through
    // pages already in the CPU's caches and the database's, not to a random leaf. (PostgreSQL
    // sorts each statement's array itself, but a statement's share of a batch's keys in their
    // own order spans the whole index: 250 MB at 1M records, past the 128 MB of buffers it
    // has as installed.)
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_unstable_by_key(|&i| keys[i]);
    if conn.is_sqlite() {
        for chunk in order.chunks(VALUES_PER_LOOKUP) {
            let sorted: Vec<KeyId> = chunk.iter().map(|&i| keys[i]).collect();
            // CROSS JOIN keeps the array as the outer loop: one index lookup per key.
            let rows: Vec<Hit> = prepared::sql(
                "SELECT CAST(j.key AS INTEGER) AS n, b.source_id AS id \
                 FROM json_each(?) AS j CROSS JOIN blocking_keys AS b ON b.key = j.value",
            )
            .bind::<Text, _>(json_array(&sorted)?)
            .load(conn)?;
            out.extend(rows.into_iter().filter_map(|h| {
                let n = usize::try_from(h.n).ok()?;
                Some((*chunk.get(n)?, h.id))
            }));
        }
        return Ok(out);
    }
    for chunk in order.chunks(VALUES_PER_LOOKUP) {
        let sorted: Vec<KeyId> = chunk.iter().map(|&i| keys[i]).collect();
        let rows: Vec<(KeyId, i64)> = blocking_keys::table
            .filter(blocking_keys::key.eq_any(&sorted))
            .select((blocking_keys::key, blocking_keys::source_id))
            .load(conn)?;
        out.extend(rows.into_iter().filter_map(|(k, id)| {
            let at = sorted.binary_search(&k).ok()?;
            Some((chunk[at], id))
        }));
    }
    Ok(out)
}

/// What matching reads of a stored record: (id, member, identity, demographics as stored).
pub type CandidateRow = (i64, String, i64, String);

/// (id, org, identity, demographics) of the active records among `ids`.
pub fn matchable(conn: &mut DbConn, ids: &[i64]) -> Result<Vec<CandidateRow>> {
    let mut out = Vec::new();
    if ids.is_empty() {
        return Ok(out);
    }
    if conn.is_sqlite() {
        #[derive(QueryableByName)]
        struct Matchable {
            #[diesel(sql_type = BigInt)]
            id: i64,
            #[diesel(sql_type = Text)]
            org_id: String,
            #[diesel(sql_type = BigInt)]
            enterprise_id: i64,
            #[diesel(sql_type = Text)]
            demographics: String,
        }
        for chunk in ids.chunks(VALUES_PER_LOOKUP) {
            let rows: Vec<Matchable> = prepared::sql(
                "SELECT id, org_id, enterprise_id, demographics FROM source_records \
                 WHERE id IN (SELECT value FROM json_each(?)) AND status = 'active'",
            )
            .bind::<Text, _>(json_array(chunk)?)
            .load(conn)?;
            out.extend(
                rows.into_iter()
                    .map(|r| (r.id, r.org_id, r.enterprise_id, r.demographics)),
            );
        }
        return Ok(out);
    }
    for chunk in ids.chunks(VALUES_PER_LOOKUP) {
        let rows: Vec<CandidateRow> = source_records::table
            .filter(source_records::id.eq_any(chunk))
            .filter(source_records::status.eq("active"))
            .select((
                source_records::id,
                source_records::org_id,
                source_records::enterprise_id,
                source_records::demographics,
            ))
            .load(conn)?;
        out.extend(rows);
    }
    Ok(out)
}

/// Upkeep between a bulk load's transactions (`hie import`; each holds one or more batches).
///
/// SQLite: once the write-ahead log file has passed `LOAD_WAL_BYTES`, it is checkpointed
/// and started over after each transaction (`RESTART`, waiting for the matcher's read of
/// the next batch to end). The log only starts over by itself when every frame has been
/// copied and no reader is in it as the writer begins; a load's writer begins the next
/// transaction as soon as it commits, with the matcher always reading, so the log could grow
/// for the whole load (up to 2.6 GB for the first 833k records of the 1M benchmark, against a
/// 1.5 GB database): disk an operator did not expect. Below the bound nothing waits.
/// At the load's end the log is emptied (`finish`).
///
/// PostgreSQL:
/// - Statistics: a load into empty tables leaves PostgreSQL planning with the statistics of an
///   empty table (sequential scans for every candidate lookup), so the tables are analysed
///   again each time they have doubled since (ANALYZE of 833k records: ~1 s). A load into
///   tables already analysed at their size (a second member's) analyses nothing.
/// - Visibility: the blocking keys written so far are marked visible to every transaction
///   (`VACUUM` sets their pages' bits in the visibility map) after every transaction, so that
///   looking keys up reads the index alone: otherwise each record found by key also visits
///   its table page, and at 1M patients that was two thirds of a batch's key lookups (89 ms
///   against 36 ms for 5,000 keys). Only pages not yet marked are read, a batch's few
///   thousand. Autovacuum does both too, but only once a table has grown by a fifth, and not
///   at all where it is off. The vacuum is skipped if another holds the table.
pub struct LoadUpkeep {
    /// Records in the tables when they were last analysed (PostgreSQL's estimate).
    analysed_at: f64,
    /// Records this load has written since.
    since: u64,
    /// SQLite: the write-ahead log's file, and its size past which it is started over.
    wal: Option<std::path::PathBuf>,
    wal_limit: u64,
}

/// The size of its write-ahead log file past which a bulk load on SQLite starts the log over
/// after every transaction (`LoadUpkeep`).
const LOAD_WAL_BYTES: u64 = 1 << 30;

impl LoadUpkeep {
    pub fn new(conn: &mut DbConn) -> Result<LoadUpkeep> {
        #[derive(QueryableByName)]
        struct Estimate {
            #[diesel(sql_type = diesel::sql_types::Double)]
            n: f64,
        }
        #[derive(QueryableByName)]
        struct File {
            #[diesel(sql_type = Text)]
            file: String,
        }
        let wal = match conn {
            DbConn::Sqlite(c) => {
                diesel::sql_query("SELECT file FROM pragma_database_list WHERE name = 'main'")
                    .get_result::<File>(c)
                    .ok()
                    .filter(|f| !f.file.is_empty())
                    .map(|f| format!("{}-wal", f.file).into())
            }
            DbConn::Postgresql(_) => None,
        };
        let analysed_at = match conn {
            DbConn::Sqlite(_) => 0.0,
            // -1 where never analysed.
            DbConn::Postgresql(pg) => {
                prepared::sql(
                    "SELECT GREATEST(reltuples, 0)::float8 AS n FROM pg_class \
                 WHERE oid = 'source_records'::regclass",
                )
                .get_result::<Estimate>(pg)?
                .n
            }
        };
        Ok(LoadUpkeep {
            analysed_at,
            since: 0,
            wal,
            wal_limit: LOAD_WAL_BYTES,
        })
    }

    /// After the load's last transaction, SQLite: the write-ahead log is checkpointed and
    /// truncated to nothing (`TRUNCATE`). The last commit's own checkpoint has usually copied
    /// every frame already, so this is mostly the truncation (0.1–0.2 s at 1M). Left as it
    /// was, the log outlived the command at full size: the next process to open the database
    /// read all of it back before its first query (~1 s for the 780 MB of the 1M benchmark's
    /// first member: the linking member's start) and then copied every frame into the file
    /// again, the log's index having been rebuilt without the record of what was copied. Busy
    /// (a server's reader past the busy timeout) is a warning, not a failure: the load is
    /// committed and the log is emptied later.
    pub fn finish(&mut self, conn: &mut DbConn) {
        if let DbConn::Sqlite(c) = conn {
            if let Err(e) = c.batch_execute("PRAGMA wal_checkpoint(TRUNCATE)") {
                tracing::warn!(error = %e, "WAL checkpoint at the end of an import failed");
            }
        }
    }

    /// After a transaction of `records` committed; `deferred`: while the load's indexes are
    /// (`defer_load_indexes`).
    pub fn written(&mut self, conn: &mut DbConn, records: u64, deferred: bool) -> Result<()> {
        let pg = match conn {
            DbConn::Postgresql(pg) => pg,
            DbConn::Sqlite(c) => {
                let size = self.wal.as_ref().and_then(|w| std::fs::metadata(w).ok());
                if size.map_or(0, |m| m.len()) > self.wal_limit {
                    // Busy (a reader held on past the busy timeout) is a row, not an error:
                    // the log then grows until the next transaction's checkpoint.
                    if let Err(e) = c.batch_execute("PRAGMA wal_checkpoint(RESTART)") {
                        tracing::warn!(error = %e, "WAL checkpoint after an import transaction failed");
                    }
                }
                return Ok(());
            }
        };
        self.since += records;
        if deferred {
            return Ok(());
        }
        pg.batch_execute(VACUUM_KEYS)?;
        if self.since as f64 >= self.analysed_at.max(1.0) {
            pg.batch_execute(ANALYZE_LOAD)?;
            self.analysed_at += self.since as f64;
            self.since = 0;
        }
        Ok(())
    }
}

/// What an initial load on PostgreSQL builds once at its end rather than entry by entry
/// (`defer_load_indexes`), as the migrations create it: (name, table, kind, definition).
/// - The indexes only PDQm reads — a person searched by name, phonetic family name, birth
///   date, postcode. Every record written adds an entry at a random place in each: a fifth
///   of a bulk load's writing backend (48–50 s of CPU for 833k records with them, 37–39 s
///   without, their build afterwards included: 2.1 s for all five).
/// - The blocking keys' primary key, the index matching reads candidates by: ten entries a
///   record at random places, the load's largest index (410 MB at 833k records). An initial
///   load matches from memory (`mpi::bulk::Matcher::resident`) and reads none of it.
/// - `source_records`' foreign keys, checked row by row by a trigger that looks up and locks
///   the identity and the organisation (a seventh of the writing backend's time, perf).
///   Added back, each is checked in one join.
/// - The shared identifiers' primary key (an SSN a record: one entry at a random place, 3.8 of
///   the writer's 18 s of statements at 833k). Their index by record, which grows at its end,
///   stays: an update on the online path replaces a record's identifiers by it.
static LOAD_DEFERRED: [(&str, &str, Deferred, &str); 9] = [
    (
        "source_records_family",
        "source_records",
        Deferred::Index,
        "(family)",
    ),
    (
        "source_records_given",
        "source_records",
        Deferred::Index,
        "(given)",
    ),
    (
        "source_records_family_phonetic",
        "source_records",
        Deferred::Index,
        "(family_phonetic)",
    ),
    (
        "source_records_birth_date",
        "source_records",
        Deferred::Index,
        "(birth_date)",
    ),
    (
        "source_records_postcode",
        "source_records",
        Deferred::Index,
        "(postcode)",
    ),
    (
        "blocking_keys_pkey",
        "blocking_keys",
        Deferred::Constraint,
        "PRIMARY KEY (key, source_id)",
    ),
    (
        "source_identifiers_pkey",
        "source_identifiers",
        Deferred::Constraint,
        "PRIMARY KEY (system, value, source_id)",
    ),
    (
        "source_records_enterprise_id_fkey",
        "source_records",
        Deferred::Constraint,
        "FOREIGN KEY (enterprise_id) REFERENCES identities(id)",
    ),
    (
        "source_records_org_id_fkey",
        "source_records",
        Deferred::Constraint,
        "FOREIGN KEY (org_id) REFERENCES organizations(id)",
    ),
];

#[derive(Clone, Copy, PartialEq)]
enum Deferred {
    Index,
    Constraint,
}

/// The migrations' advisory lock (`db::migrate`): index changes wait for one another. For a
/// transaction, or held by the session until unlocked.
const SCHEMA_LOCK: &str = "SELECT pg_advisory_xact_lock(727274)";
const SCHEMA_LOCK_SESSION: &str = "SELECT pg_advisory_lock(727274)";
const SCHEMA_UNLOCK_SESSION: &str = "SELECT pg_advisory_unlock(727274)";

/// PostgreSQL, before `hie import` loads: when no record is stored yet (an initial load), drops
/// what only readers need (`LOAD_DEFERRED`: PDQm's indexes, the blocking keys' and shared
/// identifiers' primary keys, `source_records`' foreign keys), which `restore_load_indexes`
/// builds at the load's end — the PostgreSQL manual's way of populating a database — or as
/// soon as the load reads the database. Meanwhile a running broker's searches and matches
/// read whole tables (slow, not wrong) and its writes are not checked against the foreign
/// keys or the primary keys (it writes none that would fail them; adding them back checks
/// every row). Returns whether it dropped them. SQLite: nothing (there they cost the load
/// little).
pub fn defer_load_indexes(conn: &mut DbConn) -> Result<bool> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(false);
    };
    pg.transaction(|pg| {
        pg.batch_execute(SCHEMA_LOCK)?;
        if !prepared::sql(NO_RECORDS).get_result::<Empty>(pg)?.empty {
            return Ok(false);
        }
        for deferred in &LOAD_DEFERRED {
            pg.batch_execute(&deferred_ddl(deferred, false))?;
        }
        Ok(true)
    })
}

/// PostgreSQL: builds whatever of `LOAD_DEFERRED` is missing — after a load that deferred it,
/// when such a load goes on to read the database, and at every start (`db::migrate`), so that
/// a load stopped midway leaves nothing missing past the next command — then refreshes the
/// tables' statistics (a load that deferred them skipped it: `LoadUpkeep`). Returns how many
/// it built.
///
/// With a `helper` connection the work runs in two lanes at once, one a core: the blocking
/// keys' primary key (half of it all) on `conn`; `source_records`' indexes and foreign keys
/// and the identifiers' key on the helper. No table is in both, and each lane commits on its
/// own rather than one waiting for the other with its locks held: a running broker's write
/// between the two (holding `source_records`, waiting for `blocking_keys`) would then wait on
/// both, a cycle through this process that PostgreSQL could not see. Meanwhile the session
/// holds the migrations' lock, so another restore waits until both lanes are done.
pub fn restore_load_indexes(conn: &mut DbConn, helper: Option<&mut DbConn>) -> Result<usize> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok(0);
    };
    let Some(DbConn::Postgresql(helper)) = helper else {
        let built = pg.transaction(|pg| {
            pg.batch_execute(SCHEMA_LOCK)?;
            let missing = missing_deferred(pg)?;
            build_deferred(pg, &missing)?;
            Ok::<_, crate::error::Error>(missing.len())
        })?;
        if built > 0 {
            // Statements of their own: VACUUM runs outside any transaction.
            pg.batch_execute(VACUUM_KEYS)?;
            pg.batch_execute(ANALYZE_LOAD)?;
        }
        return Ok(built);
    };
    pg.batch_execute(SCHEMA_LOCK_SESSION)?;
    let built = (|| -> Result<usize> {
        let missing = missing_deferred(pg)?;
        if missing.is_empty() {
            return Ok(0);
        }
        let (here, there): (Vec<_>, Vec<_>) = missing
            .iter()
            .partition(|(_, table, ..)| *table == "blocking_keys");
        std::thread::scope(|scope| {
            let lane = scope.spawn(|| {
                helper.transaction(|h| build_deferred(h, &there))?;
                helper.batch_execute(ANALYZE_RECORDS)
            });
            let mine = pg
                .transaction(|pg| build_deferred(pg, &here))
                .and_then(|_| pg.batch_execute(VACUUM_KEYS))
                .and_then(|_| pg.batch_execute(ANALYZE_KEYS));
            let other = lane
                .join()
                .map_err(|_| crate::error::Error::internal("an index build failed"))?;
            mine?;
            other?;
            Ok(missing.len())
        })
    })();
    let unlocked = pg.batch_execute(SCHEMA_UNLOCK_SESSION);
    let built = built?;
    unlocked?;
    Ok(built)
}

/// Which of `LOAD_DEFERRED` are not there.
fn missing_deferred(
    pg: &mut diesel::PgConnection,
) -> QueryResult<Vec<&'static (&'static str, &'static str, Deferred, &'static str)>> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let present: Vec<Name> = diesel::sql_query(
        "SELECT indexname AS name FROM pg_indexes WHERE schemaname = current_schema() \
         UNION ALL SELECT conname FROM pg_constraint \
         WHERE connamespace = current_schema()::regnamespace",
    )
    .load(pg)?;
    Ok(LOAD_DEFERRED
        .iter()
        .filter(|(name, ..)| !present.iter().any(|p| p.name == *name))
        .collect())
}

/// Builds `deferred` (of `LOAD_DEFERRED`) in the transaction `pg` is in.
fn build_deferred(
    pg: &mut diesel::PgConnection,
    deferred: &[&(&str, &str, Deferred, &str)],
) -> QueryResult<()> {
    if deferred.is_empty() {
        return Ok(());
    }
    // Sorted in memory rather than in files at 1M records (the default is 64 MB): the
    // blocking keys' 8.3M entries at 833k took 2.6 s with 1 GB, 3.3 s with 256 MB.
    pg.batch_execute("SET LOCAL maintenance_work_mem = '1GB'")?;
    for d in deferred {
        pg.batch_execute(&deferred_ddl(d, true))?;
    }
    Ok(())
}

/// The statement that builds (`build`) or drops one of `LOAD_DEFERRED`.
fn deferred_ddl(
    (name, table, kind, definition): &(&str, &str, Deferred, &str),
    build: bool,
) -> String {
    match (kind, build) {
        (Deferred::Index, true) => format!("CREATE INDEX {name} ON {table} {definition}"),
        (Deferred::Index, false) => format!("DROP INDEX IF EXISTS {name}"),
        (Deferred::Constraint, true) => {
            format!("ALTER TABLE {table} ADD CONSTRAINT {name} {definition}")
        }
        (Deferred::Constraint, false) => {
            format!("ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
        }
    }
}

/// What a load on PostgreSQL keeps up as it grows (`LoadUpkeep`): the blocking keys'
/// visibility map (their reads are index-only scans) and the statistics the planner reads
/// candidates by.
const VACUUM_KEYS: &str = "VACUUM (SKIP_LOCKED) blocking_keys";
const ANALYZE_LOAD: &str = "ANALYZE blocking_keys, source_records, source_identifiers, identities";
/// `ANALYZE_LOAD` in two halves, for two connections.
const ANALYZE_KEYS: &str = "ANALYZE blocking_keys";
const ANALYZE_RECORDS: &str = "ANALYZE source_records, source_identifiers, identities";

/// Tables whose ids a bulk load assigns itself.
#[derive(Debug, Clone, Copy)]
pub enum IdTable {
    Identities,
    SourceRecords,
}

impl IdTable {
    fn name(self) -> &'static str {
        match self {
            IdTable::Identities => "identities",
            IdTable::SourceRecords => "source_records",
        }
    }
}

#[derive(QueryableByName)]
struct NextId {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Whether no source record is stored (`NO_RECORDS`).
#[derive(QueryableByName)]
struct Empty {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    empty: bool,
}

const NO_RECORDS: &str = "SELECT NOT EXISTS (SELECT 1 FROM source_records) AS empty";

/// Whether the index holds no source record (before an initial load).
pub fn holds_no_records(conn: &mut DbConn) -> Result<bool> {
    Ok(prepared::sql(NO_RECORDS).get_result::<Empty>(conn)?.empty)
}

/// The id the last row of `table` was given, as `allocate_ids` sees it: the next allocation
/// starts right after it unless another writer takes ids first.
pub fn newest_id(conn: &mut DbConn, table: IdTable) -> Result<i64> {
    let t = table.name();
    // Formatted, yet the same text for each table: prepared once per table.
    let q = if conn.is_sqlite() {
        format!(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{t}'), 0), \
             COALESCE((SELECT MAX(id) FROM {t}), 0)) AS n"
        )
    } else {
        format!("SELECT COALESCE(MAX(id), 0) AS n FROM {t}")
    };
    Ok(prepared::sql(&q).get_result::<NextId>(conn)?.n)
}

#[derive(QueryableByName)]
struct DataVersion {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    data_version: i64,
}

/// SQLite's `PRAGMA data_version` of this connection: it changes when another connection
/// commits.
pub fn data_version(conn: &mut DbConn) -> Result<i64> {
    Ok(prepared::sql("PRAGMA data_version")
        .get_result::<DataVersion>(conn)?
        .data_version)
}

/// `n` fresh ids for rows inserted with explicit ids, ascending. On SQLite this runs inside the
/// write transaction (no other writer); AUTOINCREMENT's counter follows the explicit ids. On
/// PostgreSQL the ids come from the table's sequence, as a single-row insert's would; the
/// sequence is looked up once per statement (a scalar subquery), not once per id: per id, the
/// catalog lookup made an import's 50,000 ids take 130 ms, against 15 ms.
pub fn allocate_ids(conn: &mut DbConn, table: IdTable, n: usize) -> Result<Vec<i64>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let t = table.name();
    if conn.is_sqlite() {
        let base = newest_id(conn, table)?;
        Ok((base + 1..=base + n as i64).collect())
    } else {
        let n = i64::try_from(n)
            .map_err(|_| crate::error::Error::internal("too many ids asked for".to_string()))?;
        let mut ids: Vec<i64> = prepared::sql(
            "SELECT nextval((SELECT pg_get_serial_sequence(?, 'id')::regclass)) AS n \
             FROM generate_series(1, ?)",
        )
        .bind::<Text, _>(t)
        .bind::<BigInt, _>(n)
        .load::<NextId>(conn)?
        .into_iter()
        .map(|r| r.n)
        .collect();
        ids.sort_unstable();
        Ok(ids)
    }
}

/// `allocate_ids` for `records` source records and `identities` identities at once: on
/// PostgreSQL one round trip for both sequences.
pub fn allocate_record_and_identity_ids(
    conn: &mut DbConn,
    records: usize,
    identities: usize,
) -> Result<(Vec<i64>, Vec<i64>)> {
    let DbConn::Postgresql(pg) = conn else {
        return Ok((
            allocate_ids(conn, IdTable::SourceRecords, records)?,
            allocate_ids(conn, IdTable::Identities, identities)?,
        ));
    };
    #[derive(QueryableByName)]
    struct Allocated {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        record: bool,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let count = |n: usize| {
        i64::try_from(n)
            .map_err(|_| crate::error::Error::internal("too many ids asked for".to_string()))
    };
    let rows: Vec<Allocated> = prepared::sql(
        "SELECT true AS record, \
         nextval((SELECT pg_get_serial_sequence('source_records', 'id')::regclass)) AS n \
         FROM generate_series(1, ?) \
         UNION ALL \
         SELECT false, nextval((SELECT pg_get_serial_sequence('identities', 'id')::regclass)) \
         FROM generate_series(1, ?)",
    )
    .bind::<BigInt, _>(count(records)?)
    .bind::<BigInt, _>(count(identities)?)
    .load(pg)?;
    let (mut sids, mut eids) = (Vec::with_capacity(records), Vec::with_capacity(identities));
    for r in rows {
        match r.record {
            true => sids.push(r.n),
            false => eids.push(r.n),
        }
    }
    sids.sort_unstable();
    eids.sort_unstable();
    Ok((sids, eids))
}

/// A source record written by a bulk load, with the id it was allocated.
#[derive(Debug, Clone)]
pub struct NewSource {
    pub id: i64,
    pub org_id: String,
    pub system: String,
    pub value: String,
    pub enterprise_id: i64,
    pub status: String,
    pub link_kind: String,
    pub version: i64,
    pub resource: String,
    pub family: Option<String>,
    pub given: Option<String>,
    pub family_phonetic: Option<String>,
    pub given_phonetic: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    pub postcode: Option<String>,
    pub phone: Option<String>,
    pub demographics: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl NewSource {
    /// The row as stored once inserted (no consent restrictions of its own).
    pub fn stored(&self) -> SourceRow {
        SourceRow {
            id: self.id,
            org_id: self.org_id.clone(),
            system: self.system.clone(),
            value: self.value.clone(),
            enterprise_id: self.enterprise_id,
            status: self.status.clone(),
            replaced_by: None,
            link_kind: self.link_kind.clone(),
            version: self.version,
            resource: self.resource.clone(),
            family: self.family.clone(),
            given: self.given.clone(),
            family_phonetic: self.family_phonetic.clone(),
            given_phonetic: self.given_phonetic.clone(),
            birth_date: self.birth_date.clone(),
            gender: self.gender.clone(),
            postcode: self.postcode.clone(),
            phone: self.phone.clone(),
            demographics: self.demographics.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            consent_hides: String::new(),
        }
    }
}

/// A decision of a bulk load.
#[derive(Debug, Clone)]
pub struct NewDecision {
    pub source_id: i64,
    pub candidate_id: Option<i64>,
    pub outcome: String,
    pub score: Option<f64>,
    pub breakdown: String,
    pub created_at: i64,
}

/// A review queued by a bulk load (the pair is new, so it cannot be queued already).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = match_reviews)]
pub struct NewReview {
    pub source_a: i64,
    pub source_b: i64,
    pub kind: String,
    pub score: f64,
    pub breakdown: String,
    pub status: String,
    pub created_at: i64,
}

impl NewReview {
    pub fn new(a: i64, b: i64, kind: &str, score: f64, breakdown: String, now: i64) -> NewReview {
        let (source_a, source_b) = ordered(a, b);
        NewReview {
            source_a,
            source_b,
            kind: kind.into(),
            score,
            breakdown,
            status: "open".into(),
            created_at: now,
        }
    }
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = identity_history, treat_none_as_default_value = false)]
pub struct NewHistory {
    pub enterprise_id: i64,
    pub action: String,
    pub detail: String,
    pub actor: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewIdentity {
    pub id: i64,
    pub status: String,
    pub merged_into: Option<i64>,
    pub golden: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Everything a bulk load writes, inserted table by table with multi-row statements. Index
/// entries (identifiers, blocking keys) are sorted first, so each index page is visited once.
#[derive(Debug, Default)]
pub struct BulkRows {
    pub identities: Vec<NewIdentity>,
    pub sources: Vec<NewSource>,
    pub identifiers: Vec<(String, String, i64)>,
    pub keys: Vec<(KeyId, i64)>,
    pub decisions: Vec<NewDecision>,
    pub reviews: Vec<NewReview>,
    pub history: Vec<NewHistory>,
}

pub fn insert_bulk(conn: &mut DbConn, mut rows: BulkRows) -> Result<()> {
    rows.identifiers.sort_unstable();
    rows.identifiers.dedup();
    rows.keys.sort_unstable();
    rows.keys.dedup();
    let c = match conn {
        DbConn::Postgresql(pg) if rows.sources.len() >= COPY_FROM => {
            return insert_bulk_copy(pg, &rows)
        }
        DbConn::Postgresql(pg) => return insert_bulk_pg(pg, &rows),
        DbConn::Sqlite(c) => c,
    };
    prepared::insert_rows(c, &rows.identities)?;
    prepared::insert_rows(c, &rows.sources)?;
    prepared::insert_rows(c, &rows.identifiers)?;
    prepared::insert_rows(c, &rows.keys)?;
    prepared::insert_rows(c, &rows.decisions)?;
    prepared::insert_rows(c, &rows.reviews)?;
    prepared::insert_rows(c, &rows.history)?;
    Ok(())
}

/// Pushes a row's binds, of the given SQL types, separated by `, ` (`prepared::Row`).
macro_rules! push_binds {
    ($out:expr; $first_ty:ty: $first:expr $(, $ty:ty: $value:expr)* $(,)?) => {{
        $out.push_bind_param::<$first_ty, _>($first)?;
        $(
            $out.push_sql(", ");
            $out.push_bind_param::<$ty, _>($value)?;
        )*
        Ok(())
    }};
}

type SqliteAst<'a, 'b> = diesel::query_builder::AstPass<'a, 'b, diesel::sqlite::Sqlite>;

impl prepared::Row for NewIdentity {
    const INSERT: &'static str =
        "INSERT INTO identities (id, status, merged_into, golden, created_at, updated_at) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.id, Text: &self.status, Nullable<BigInt>: &self.merged_into,
            Text: &self.golden, BigInt: &self.created_at, BigInt: &self.updated_at)
    }
}

impl prepared::Row for NewSource {
    const INSERT: &'static str = "INSERT INTO source_records (id, org_id, system, value, \
        enterprise_id, status, link_kind, version, resource, family, given, family_phonetic, \
        given_phonetic, birth_date, gender, postcode, phone, demographics, created_at, \
        updated_at) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.id, Text: &self.org_id, Text: &self.system,
            Text: &self.value, BigInt: &self.enterprise_id, Text: &self.status,
            Text: &self.link_kind, BigInt: &self.version, Text: &self.resource,
            Nullable<Text>: &self.family, Nullable<Text>: &self.given,
            Nullable<Text>: &self.family_phonetic, Nullable<Text>: &self.given_phonetic,
            Nullable<Text>: &self.birth_date, Nullable<Text>: &self.gender,
            Nullable<Text>: &self.postcode, Nullable<Text>: &self.phone,
            Text: &self.demographics, BigInt: &self.created_at, BigInt: &self.updated_at)
    }
}

/// A source identifier: system, value, source record.
impl prepared::Row for (String, String, i64) {
    const INSERT: &'static str =
        "INSERT INTO source_identifiers (system, value, source_id) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; Text: &self.0, Text: &self.1, BigInt: &self.2)
    }
}

/// A blocking key: key id, source record.
impl prepared::Row for (KeyId, i64) {
    const INSERT: &'static str = "INSERT INTO blocking_keys (key, source_id) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.0, BigInt: &self.1)
    }
}

impl prepared::Row for NewDecision {
    const INSERT: &'static str = "INSERT INTO match_decisions (source_id, candidate_id, outcome, \
        score, breakdown, created_at) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.source_id, Nullable<BigInt>: &self.candidate_id,
            Text: &self.outcome, Nullable<Double>: &self.score, Text: &self.breakdown,
            BigInt: &self.created_at)
    }
}

impl prepared::Row for NewReview {
    const INSERT: &'static str = "INSERT INTO match_reviews (source_a, source_b, kind, score, \
        breakdown, status, created_at) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.source_a, BigInt: &self.source_b, Text: &self.kind,
            Double: &self.score, Text: &self.breakdown, Text: &self.status,
            BigInt: &self.created_at)
    }
}

impl prepared::Row for NewHistory {
    const INSERT: &'static str = "INSERT INTO identity_history (enterprise_id, action, detail, \
        actor, created_at) VALUES ";
    fn binds<'b>(&'b self, out: &mut SqliteAst<'_, 'b>) -> QueryResult<()> {
        push_binds!(out; BigInt: &self.enterprise_id, Text: &self.action, Text: &self.detail,
            Nullable<Text>: &self.actor, BigInt: &self.created_at)
    }
}

/// Records from which a bulk write on PostgreSQL sends its rows by `COPY` (`insert_bulk_copy`)
/// rather than in one statement (`insert_bulk_pg`): five round trips instead of one, worth it
/// for a load's batches, not for the feed's few records.
const COPY_FROM: usize = 32;

/// PostgreSQL, a load's batch: each table's rows by `COPY … FROM STDIN (FORMAT binary)`, in
/// the order the foreign keys need. Against `insert_bulk_pg`'s `INSERT … SELECT FROM
/// unnest(…)`, the server neither builds the arrays nor stores every row in a tuple store
/// before inserting it, and fills each table page in one step (one write-ahead-log record a
/// page, not a row).
fn insert_bulk_copy(pg: &mut diesel::PgConnection, rows: &BulkRows) -> Result<()> {
    use super::schema::{identities as i, match_decisions as d, source_records as s};
    let mut b = CopyRows::new();
    for r in &rows.identities {
        b.row(6)
            .int(r.id)
            .text(&r.status)
            .opt_int(r.merged_into)
            .text(&r.golden);
        b.int(r.created_at).int(r.updated_at);
    }
    b.send(
        pg,
        i::table,
        (
            i::id,
            i::status,
            i::merged_into,
            i::golden,
            i::created_at,
            i::updated_at,
        ),
    )?;
    for r in &rows.sources {
        b.row(20)
            .int(r.id)
            .text(&r.org_id)
            .text(&r.system)
            .text(&r.value);
        b.int(r.enterprise_id)
            .text(&r.status)
            .text(&r.link_kind)
            .int(r.version);
        b.text(&r.resource).opt_text(&r.family).opt_text(&r.given);
        b.opt_text(&r.family_phonetic)
            .opt_text(&r.given_phonetic)
            .opt_text(&r.birth_date);
        b.opt_text(&r.gender)
            .opt_text(&r.postcode)
            .opt_text(&r.phone);
        b.text(&r.demographics).int(r.created_at).int(r.updated_at);
    }
    b.send(
        pg,
        s::table,
        (
            s::id,
            s::org_id,
            s::system,
            s::value,
            s::enterprise_id,
            s::status,
            s::link_kind,
            s::version,
            s::resource,
            s::family,
            s::given,
            s::family_phonetic,
            s::given_phonetic,
            s::birth_date,
            s::gender,
            s::postcode,
            s::phone,
            s::demographics,
            s::created_at,
            s::updated_at,
        ),
    )?;
    for (system, value, source) in &rows.identifiers {
        b.row(3).text(system).text(value).int(*source);
    }
    b.send(
        pg,
        source_identifiers::table,
        (
            source_identifiers::system,
            source_identifiers::value,
            source_identifiers::source_id,
        ),
    )?;
    for (key, source) in &rows.keys {
        b.row(2).int(*key).int(*source);
    }
    b.send(
        pg,
        blocking_keys::table,
        (blocking_keys::key, blocking_keys::source_id),
    )?;
    for r in &rows.decisions {
        b.row(6)
            .int(r.source_id)
            .opt_int(r.candidate_id)
            .text(&r.outcome);
        b.opt_float(r.score).text(&r.breakdown).int(r.created_at);
    }
    b.send(
        pg,
        d::table,
        (
            d::source_id,
            d::candidate_id,
            d::outcome,
            d::score,
            d::breakdown,
            d::created_at,
        ),
    )?;
    // A link's history row each: as many as the records, for a member whose records link.
    for h in &rows.history {
        b.row(5)
            .int(h.enterprise_id)
            .text(&h.action)
            .text(&h.detail)
            .opt_text(&h.actor)
            .int(h.created_at);
    }
    b.send(
        pg,
        identity_history::table,
        (
            identity_history::enterprise_id,
            identity_history::action,
            identity_history::detail,
            identity_history::actor,
            identity_history::created_at,
        ),
    )?;
    insert_reviews_pg(pg, &rows.reviews)
}

/// Rare rows of a bulk write: a review (a multi-row statement suffices).
fn insert_reviews_pg(pg: &mut diesel::PgConnection, reviews: &[NewReview]) -> Result<()> {
    for c in reviews.chunks(ROWS_PER_INSERT) {
        diesel::insert_into(match_reviews::table)
            .values(c)
            .execute(pg)?;
    }
    Ok(())
}

/// Rare rows of a small bulk write (a review, a link's or a merge's history): multi-row
/// statements suffice.
fn insert_rare_pg(pg: &mut diesel::PgConnection, rows: &BulkRows) -> Result<()> {
    insert_reviews_pg(pg, &rows.reviews)?;
    for c in rows.history.chunks(ROWS_PER_INSERT) {
        diesel::insert_into(identity_history::table)
            .values(c)
            .execute(pg)?;
    }
    Ok(())
}

/// Rows in `COPY`'s binary format: a header, then each row as its field count and each field
/// as its length (-1: NULL) and its bytes in network order.
struct CopyRows(Vec<u8>);

const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

impl CopyRows {
    fn new() -> CopyRows {
        CopyRows(COPY_HEADER.to_vec())
    }

    fn row(&mut self, fields: i16) -> &mut Self {
        self.0.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // A field is at most 1 GB in PostgreSQL; a longer one is refused by the server.
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    fn null(&mut self) -> &mut Self {
        self.0.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    fn int(&mut self, v: i64) -> &mut Self {
        self.field(&v.to_be_bytes())
    }

    fn opt_int(&mut self, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    fn opt_float(&mut self, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.field(&v.to_bits().to_be_bytes()),
            None => self.null(),
        }
    }

    fn text(&mut self, v: &str) -> &mut Self {
        self.field(v.as_bytes())
    }

    fn opt_text(&mut self, v: &Option<String>) -> &mut Self {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// Sends the rows written since the header into `columns` of `table` (nothing if none),
    /// and starts over.
    fn send<T, C>(&mut self, pg: &mut diesel::PgConnection, table: T, columns: C) -> Result<()>
    where
        T: diesel::Table,
        C: diesel::pg::CopyTarget<Table = T>,
    {
        use diesel::pg::CopyFormat;
        if self.0.len() > COPY_HEADER.len() {
            self.0.extend_from_slice(&(-1i16).to_be_bytes());
            let data = &self.0;
            diesel::copy_from(table)
                .from_raw_data(columns, |w| {
                    w.write_all(data)
                        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))
                })
                .with_format(CopyFormat::Binary)
                .execute(pg)?;
        }
        self.0.truncate(COPY_HEADER.len());
        Ok(())
    }
}

/// PostgreSQL: the rows of every table in one statement, one round trip: an `INSERT … SELECT
/// FROM unnest(…)` per table, of a column array per column, the first four as data-modifying
/// `WITH` parts (their foreign keys are checked at the statement's end, all rows in). The text
/// is the same for any number of rows (none included), so it is parsed and planned once per
/// connection — a multi-row `VALUES` list per table was parsed anew every time, a third of a
/// small feed batch's statement time — and there is no limit of 65,535 binds to chunk under.
fn insert_bulk_pg(pg: &mut diesel::PgConnection, rows: &BulkRows) -> Result<()> {
    use diesel::sql_types::{Array, Double, Nullable};
    type Texts = Array<Text>;
    type MaybeTexts = Array<Nullable<Text>>;
    type Ints = Array<BigInt>;
    type MaybeInts = Array<Nullable<BigInt>>;
    fn col<'a, T: 'a, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Vec<U> {
        rows.iter().map(f).collect()
    }
    let (i, s, n, k, d) = (
        &rows.identities,
        &rows.sources,
        &rows.identifiers,
        &rows.keys,
        &rows.decisions,
    );
    prepared::sql(
        "WITH i AS (INSERT INTO identities (id, status, merged_into, golden, created_at, \
         updated_at) SELECT * FROM unnest(?, ?, ?, ?, ?, ?)), \
         s AS (INSERT INTO source_records (id, org_id, system, value, enterprise_id, status, \
         link_kind, version, resource, family, given, family_phonetic, given_phonetic, \
         birth_date, gender, postcode, phone, demographics, created_at, updated_at) \
         SELECT * FROM unnest(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)), \
         n AS (INSERT INTO source_identifiers (system, value, source_id) \
         SELECT * FROM unnest(?, ?, ?)), \
         k AS (INSERT INTO blocking_keys (key, source_id) SELECT * FROM unnest(?, ?)) \
         INSERT INTO match_decisions (source_id, candidate_id, outcome, score, breakdown, \
         created_at) SELECT * FROM unnest(?, ?, ?, ?, ?, ?)",
    )
    .bind::<Ints, _>(col(i, |i| i.id))
    .bind::<Texts, _>(col(i, |i| i.status.as_str()))
    .bind::<MaybeInts, _>(col(i, |i| i.merged_into))
    .bind::<Texts, _>(col(i, |i| i.golden.as_str()))
    .bind::<Ints, _>(col(i, |i| i.created_at))
    .bind::<Ints, _>(col(i, |i| i.updated_at))
    .bind::<Ints, _>(col(s, |s| s.id))
    .bind::<Texts, _>(col(s, |s| s.org_id.as_str()))
    .bind::<Texts, _>(col(s, |s| s.system.as_str()))
    .bind::<Texts, _>(col(s, |s| s.value.as_str()))
    .bind::<Ints, _>(col(s, |s| s.enterprise_id))
    .bind::<Texts, _>(col(s, |s| s.status.as_str()))
    .bind::<Texts, _>(col(s, |s| s.link_kind.as_str()))
    .bind::<Ints, _>(col(s, |s| s.version))
    .bind::<Texts, _>(col(s, |s| s.resource.as_str()))
    .bind::<MaybeTexts, _>(col(s, |s| s.family.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.given.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.family_phonetic.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.given_phonetic.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.birth_date.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.gender.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.postcode.as_deref()))
    .bind::<MaybeTexts, _>(col(s, |s| s.phone.as_deref()))
    .bind::<Texts, _>(col(s, |s| s.demographics.as_str()))
    .bind::<Ints, _>(col(s, |s| s.created_at))
    .bind::<Ints, _>(col(s, |s| s.updated_at))
    .bind::<Texts, _>(col(n, |n| n.0.as_str()))
    .bind::<Texts, _>(col(n, |n| n.1.as_str()))
    .bind::<Ints, _>(col(n, |n| n.2))
    .bind::<Ints, _>(col(k, |k| k.0))
    .bind::<Ints, _>(col(k, |k| k.1))
    .bind::<Ints, _>(col(d, |d| d.source_id))
    .bind::<MaybeInts, _>(col(d, |d| d.candidate_id))
    .bind::<Texts, _>(col(d, |d| d.outcome.as_str()))
    .bind::<Array<Nullable<Double>>, _>(col(d, |d| d.score))
    .bind::<Texts, _>(col(d, |d| d.breakdown.as_str()))
    .bind::<Ints, _>(col(d, |d| d.created_at))
    .execute(pg)?;
    insert_rare_pg(pg, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_sharing_more_keys_rank_first_and_crowded_keys_alone_find_nobody() {
        let crowded: Vec<i64> = (100..140).collect();
        let buckets = vec![crowded.clone(), vec![7, 120], vec![7, 9]];
        let ranked = rank_candidates(&buckets, 10, CROWDED_FOR_SEARCH);
        // 7 shares two keys, 120 shares the crowded key and another, 9 one uncrowded key;
        // the rest of the crowded bucket is no lead.
        assert_eq!(ranked, vec![120, 7, 9]);
        assert_eq!(rank_candidates(&buckets, 1, CROWDED_FOR_SEARCH), vec![120]);
        let small = vec![vec![1, 2, 3]];
        assert_eq!(rank_candidates(&small, 10, CROWDED), vec![3, 2, 1]);
        // A bucket of ten (a common name): crowded when the feed decides, not for `$match`.
        let common = vec![(200..210).collect::<Vec<i64>>(), vec![7]];
        assert_eq!(rank_candidates(&common, 20, CROWDED), vec![7]);
        assert_eq!(rank_candidates(&common, 20, CROWDED_FOR_SEARCH).len(), 11);
    }

    /// The bulk rows' `INSERT` texts (`prepared::Row`) name their columns in the order their
    /// binds are pushed: every field, each a value no other field has, reads back in place.
    #[test]
    fn bulk_rows_on_sqlite_read_back_field_for_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::db::Db::open(&crate::config::DatabaseConfig {
            url: format!("sqlite://{}", dir.path().join("hie.db").display()),
            pool_size: 1,
            connect_timeout_ms: 5_000,
            busy_timeout_ms: 5_000,
        })
        .expect("open");
        let mut conn = db.get().expect("connection");
        conn.batch_execute(
            "INSERT INTO organizations (id, name, org_type, status, created_at, updated_at) \
             VALUES ('org-a', 'Org A', 'hospital', 'active', 1, 1)",
        )
        .expect("organisation");
        let text = |s: &str| Some(s.to_string());
        let source = NewSource {
            id: 7,
            org_id: "org-a".into(),
            system: "urn:mrn".into(),
            value: "MRN-7".into(),
            enterprise_id: 3,
            status: "active".into(),
            link_kind: "new".into(),
            version: 2,
            resource: r#"{"resourceType":"Patient"}"#.into(),
            family: text("family"),
            given: text("given"),
            family_phonetic: text("FML"),
            given_phonetic: text("JFN"),
            birth_date: text("1970-02-03"),
            gender: text("female"),
            postcode: text("12345"),
            phone: text("5550100"),
            demographics: r#"{"family":"family"}"#.into(),
            created_at: 11,
            updated_at: 12,
        };
        let rows = BulkRows {
            identities: vec![NewIdentity {
                id: 3,
                status: "active".into(),
                merged_into: Some(2),
                golden: r#"{"golden":true}"#.into(),
                created_at: 21,
                updated_at: 22,
            }],
            sources: vec![source.clone()],
            identifiers: vec![("urn:ssn".into(), "123-45-6789".into(), 7)],
            keys: vec![(4242, 7)],
            decisions: vec![NewDecision {
                source_id: 7,
                candidate_id: Some(5),
                outcome: "linked".into(),
                score: Some(17.5),
                breakdown: "[breakdown]".into(),
                created_at: 31,
            }],
            reviews: vec![NewReview::new(
                9,
                7,
                "potential-match",
                8.5,
                "[pair]".into(),
                41,
            )],
            history: vec![NewHistory {
                enterprise_id: 3,
                action: "link".into(),
                detail: "{detail}".into(),
                actor: text("operator"),
                created_at: 51,
            }],
        };
        crate::db::write_tx(&mut conn, |c| insert_bulk(c, rows)).expect("insert");
        let stored = get_source(&mut conn, 7).expect("read").expect("the record");
        assert_eq!(format!("{stored:?}"), format!("{:?}", source.stored()));
        let identity = get_identity(&mut conn, 3)
            .expect("read")
            .expect("the identity");
        assert_eq!(
            (
                identity.status.as_str(),
                identity.merged_into,
                identity.golden.as_str()
            ),
            ("active", Some(2), r#"{"golden":true}"#)
        );
        assert_eq!((identity.created_at, identity.updated_at), (21, 22));
        assert_eq!(
            sources_with_identifier(&mut conn, "urn:ssn", "123-45-6789").expect("read"),
            vec![7]
        );
        assert_eq!(filed_under(&mut conn, 4242, 10).expect("read"), vec![7]);
        let d = &decisions(&mut conn, 7).expect("read")[0];
        assert_eq!(
            (
                d.candidate_id,
                d.outcome.as_str(),
                d.score,
                d.breakdown.as_str(),
                d.created_at
            ),
            (Some(5), "linked", Some(17.5), "[breakdown]", 31)
        );
        let r = &reviews(&mut conn, "open", 0, 10).expect("read")[0];
        assert_eq!(
            (
                r.source_a,
                r.source_b,
                r.kind.as_str(),
                r.score,
                r.breakdown.as_str()
            ),
            (7, 9, "potential-match", 8.5, "[pair]")
        );
        assert_eq!((r.status.as_str(), r.created_at), ("open", 41));
        let h = &history(&mut conn, 3).expect("read")[0];
        assert_eq!(
            (
                h.action.as_str(),
                h.detail.as_str(),
                h.actor.as_deref(),
                h.created_at
            ),
            ("link", "{detail}", Some("operator"), 51)
        );
    }

    #[test]
    fn a_load_past_its_bound_starts_the_write_ahead_log_over_and_its_end_empties_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("load.db");
        let mut conn = DbConn::Sqlite(
            diesel::SqliteConnection::establish(&path.to_string_lossy()).expect("open"),
        );
        conn.batch_execute(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; CREATE TABLE t (x BLOB)",
        )
        .expect("schema");
        let wal = || std::fs::metadata(dir.path().join("load.db-wal")).map_or(0, |m| m.len());
        let batch = |conn: &mut DbConn| {
            conn.batch_execute(
                "WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n WHERE k < 200) \
                 INSERT INTO t SELECT randomblob(1000) FROM n",
            )
            .expect("batch");
        };
        let mut upkeep = LoadUpkeep::new(&mut conn).expect("upkeep");
        assert_eq!(
            upkeep.wal.as_deref(),
            Some(dir.path().join("load.db-wal").as_path())
        );
        // Below the bound the log grows as SQLite lets it.
        batch(&mut conn);
        upkeep.written(&mut conn, 200, false).expect("upkeep");
        let first = wal();
        batch(&mut conn);
        let grown = wal();
        assert!(grown > first, "{grown} > {first}");
        // Past it, each batch's frames go to the start of the log again.
        upkeep.wal_limit = 0;
        upkeep.written(&mut conn, 200, false).expect("upkeep");
        batch(&mut conn);
        upkeep.written(&mut conn, 200, false).expect("upkeep");
        batch(&mut conn);
        assert_eq!(wal(), grown);
        // At the load's end the log is emptied, its rows in the file.
        upkeep.finish(&mut conn);
        assert_eq!(wal(), 0);
        let rows: i64 = diesel::dsl::sql::<BigInt>("SELECT count(*) FROM t")
            .get_result(&mut conn)
            .expect("count");
        assert_eq!(rows, 800);
    }
}

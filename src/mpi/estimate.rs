//! Estimates Fellegi–Sunter m/u probabilities from the loaded data with the EM algorithm
//! (conditional independence of fields), over candidate pairs found by blocking.

use std::collections::BTreeMap;

use super::normalize::Demographics;
use super::score::{self, TermFrequencies, Weights, TERM_FREQUENCY_FIELDS};
use super::Candidate;
use crate::db::mpi as store;
use crate::db::DbConn;
use crate::error::Result;

/// Comparison levels of one pair: (field, level) for each field present on both sides.
type Vector = Vec<(String, String)>;

fn pairs(conn: &mut DbConn, w: &Weights, sample: i64) -> Result<Vec<Vector>> {
    use crate::db::schema::source_records;
    use diesel::prelude::*;
    let rows: Vec<store::SourceRow> = source_records::table
        .filter(source_records::status.eq("active"))
        .order(source_records::id.asc())
        .limit(sample)
        .load(conn)?;
    let mut out = Vec::new();
    for r in &rows {
        let Ok(a) = serde_json::from_str::<Demographics>(&r.demographics) else {
            continue;
        };
        for c in Candidate::of_rows(store::candidates(
            conn,
            &a.key_ids(),
            Some(r.id),
            50,
            store::CROWDED,
        )?) {
            if c.id < r.id {
                continue;
            }
            let s = score::score(&a, &c.demo, w);
            out.push(
                s.fields
                    .into_iter()
                    .map(|f| (f.field.into_owned(), f.level.into_owned()))
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Runs EM starting from `start`; returns the estimated weights and the match proportion.
pub fn estimate(
    conn: &mut DbConn,
    start: &Weights,
    sample: i64,
    iterations: usize,
) -> Result<(Weights, f64, usize)> {
    let vectors = pairs(conn, start, sample)?;
    let mut table = start.table().clone();
    let mut p: f64 = 0.1;
    for _ in 0..iterations {
        let mut m_num: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut u_num: BTreeMap<(String, String), f64> = BTreeMap::new();
        let mut m_den: BTreeMap<String, f64> = BTreeMap::new();
        let mut u_den: BTreeMap<String, f64> = BTreeMap::new();
        let mut g_sum = 0.0;
        for v in &vectors {
            let (mut lm, mut lu) = (p.ln(), (1.0 - p).ln());
            for (f, l) in v {
                if let Some((m, u)) = table.get(f).and_then(|t| t.get(l)) {
                    lm += m.ln();
                    lu += u.ln();
                }
            }
            let g = 1.0 / (1.0 + (lu - lm).exp());
            g_sum += g;
            for (f, l) in v {
                *m_num.entry((f.clone(), l.clone())).or_default() += g;
                *u_num.entry((f.clone(), l.clone())).or_default() += 1.0 - g;
                *m_den.entry(f.clone()).or_default() += g;
                *u_den.entry(f.clone()).or_default() += 1.0 - g;
            }
        }
        if vectors.is_empty() {
            break;
        }
        p = (g_sum / vectors.len() as f64).clamp(1e-6, 1.0 - 1e-6);
        for (field, levels) in table.iter_mut() {
            for (level, (m, u)) in levels.iter_mut() {
                let key = (field.clone(), level.clone());
                if let (Some(md), Some(ud)) = (m_den.get(field), u_den.get(field)) {
                    if *md > 0.0 {
                        *m = (m_num.get(&key).copied().unwrap_or(0.0) / md).clamp(1e-6, 1.0 - 1e-6);
                    }
                    if *ud > 0.0 {
                        *u = (u_num.get(&key).copied().unwrap_or(0.0) / ud).clamp(1e-7, 1.0 - 1e-6);
                    }
                }
            }
        }
    }
    Ok((Weights::from_table(table), p, vectors.len()))
}

/// Fewest records holding a name for its share to be trusted.
const TERM_FREQUENCY_MIN_RECORDS: i64 = 5;

/// The share of active records holding each name that is common enough to matter: held by at
/// least `TERM_FREQUENCY_MIN_RECORDS` records and by a larger share than the field's `u` for
/// an exact agreement (rarer names keep the plain weight). At most `limit` per field, the most
/// common first.
pub fn term_frequencies(conn: &mut DbConn, w: &Weights, limit: i64) -> Result<TermFrequencies> {
    use crate::db::schema::source_records::dsl as sr;
    use diesel::dsl::count_star;
    use diesel::prelude::*;
    let mut out = TermFrequencies::new();
    for field in TERM_FREQUENCY_FIELDS {
        let Some((_, u)) = w.table().get(field).and_then(|l| l.get("exact")).copied() else {
            continue;
        };
        // The number of records holding a name, and the names held by enough of them.
        macro_rules! counts {
            ($column:expr) => {{
                let named = sr::source_records
                    .filter(sr::status.eq("active"))
                    .filter($column.is_not_null());
                let total: i64 = named.count().get_result(conn)?;
                let rows: Vec<(Option<String>, i64)> = named
                    .group_by($column)
                    .select(($column, count_star()))
                    .having(count_star().ge(TERM_FREQUENCY_MIN_RECORDS))
                    .order(count_star().desc())
                    .limit(limit)
                    .load(conn)?;
                (total, rows)
            }};
        }
        let (total, rows) = if field == "given" {
            counts!(sr::given)
        } else {
            counts!(sr::family)
        };
        let common: BTreeMap<String, f64> = rows
            .into_iter()
            .filter_map(|(name, n)| Some((name?, n as f64 / total.max(1) as f64)))
            .filter(|(_, share)| *share > u && *share < 1.0)
            .collect();
        if !common.is_empty() {
            out.insert(field.to_string(), common);
        }
    }
    Ok(out)
}

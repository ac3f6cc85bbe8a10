//! Fixed SQL that diesel keeps prepared.
//!
//! Diesel prepares a statement once and reuses it only when its text cannot vary: never for
//! `sql_query`, an `UPDATE`, an `IN (…)` list or a multi-row `INSERT`. Each of those is parsed
//! and planned again on every call — on SQLite 11 % of the HTTP feed's writer thread went to
//! parsing, and on PostgreSQL an unprepared statement is a round trip of its own. A
//! [`Prepared`] is SQL text with `?` where its binds go (written as `$1`, `$2`… on PostgreSQL)
//! and is cached by that text, like any other statement.

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::sqlite::{Sqlite, SqliteConnection};
use diesel::QueryResult;
use std::marker::PhantomData;

/// SQL text with `?` for each bind, in order. Rows load as `QueryableByName`.
#[derive(Debug, Clone, Copy)]
pub struct Prepared<'a, B> {
    sql: &'a str,
    binds: B,
}

/// `sql` with no binds.
pub fn sql(sql: &str) -> Prepared<'_, ()> {
    Prepared { sql, binds: () }
}

impl<'a, B> Prepared<'a, B> {
    /// Adds the next bind, of SQL type `ST`.
    pub fn bind<ST, U>(self, value: U) -> Prepared<'a, (B, Bind<ST, U>)> {
        Prepared {
            sql: self.sql,
            binds: (self.binds, Bind(value, PhantomData)),
        }
    }
}

/// One bind value of SQL type `ST`.
#[derive(Debug, Clone, Copy)]
pub struct Bind<ST, U>(U, PhantomData<ST>);

/// The binds of a [`Prepared`], pushed in order, each after the SQL text before it.
pub trait Binds<DB: Backend> {
    fn walk<'b>(
        &'b self,
        parts: &mut std::str::Split<'_, char>,
        out: &mut AstPass<'_, 'b, DB>,
    ) -> QueryResult<()>;
}

impl<DB: Backend> Binds<DB> for () {
    fn walk<'b>(
        &'b self,
        _: &mut std::str::Split<'_, char>,
        _: &mut AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        Ok(())
    }
}

impl<DB, ST, U> Binds<DB> for Bind<ST, U>
where
    DB: Backend + HasSqlType<ST>,
    U: ToSql<ST, DB>,
{
    fn walk<'b>(
        &'b self,
        parts: &mut std::str::Split<'_, char>,
        out: &mut AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        let before = parts.next().ok_or_else(mismatch)?;
        out.push_sql(before);
        out.push_bind_param::<ST, U>(&self.0)
    }
}

impl<DB: Backend, A: Binds<DB>, B: Binds<DB>> Binds<DB> for (A, B) {
    fn walk<'b>(
        &'b self,
        parts: &mut std::str::Split<'_, char>,
        out: &mut AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        self.0.walk(parts, out)?;
        self.1.walk(parts, out)
    }
}

fn mismatch() -> diesel::result::Error {
    diesel::result::Error::QueryBuilderError("prepared SQL: binds and `?` do not match".into())
}

impl<B, DB: Backend> QueryFragment<DB> for Prepared<'_, B>
where
    B: Binds<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        let mut parts = self.sql.split('?');
        self.binds.walk(&mut parts, &mut out)?;
        let rest = parts.next().ok_or_else(mismatch)?;
        if parts.next().is_some() {
            return Err(mismatch());
        }
        out.push_sql(rest);
        Ok(())
    }
}

// Not a static query id: the statement cache then keys the statement by its SQL text.
impl<B> QueryId for Prepared<'_, B> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<B> Query for Prepared<'_, B> {
    type SqlType = Untyped;
}

impl<B, Conn> diesel::RunQueryDsl<Conn> for Prepared<'_, B> {}

/// Rows a multi-row `INSERT` writes at a time (`insert_rows`).
pub const ROWS_AT_A_TIME: usize = 64;

/// A row a bulk load inserts into SQLite with `insert_rows`.
pub trait Row {
    /// `INSERT INTO table (column, …) VALUES `: the binds follow in the same order.
    const INSERT: &'static str;
    /// Pushes the row's binds, separated by `, `.
    fn binds<'b>(&'b self, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()>;
}

/// One multi-row `INSERT`, kept prepared by its text: the same for every call of the same
/// number of rows. With a statement of its own for each row, SQLite ran a whole statement's
/// set-up and tear-down per row — its cursors opened, the root pages fetched and released
/// again — and diesel looked the statement up in its cache, ~20 times per record a bulk load
/// writes.
struct Rows<'a, R>(&'a [R]);

impl<R: Row> QueryFragment<Sqlite> for Rows<'_, R> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
        out.push_sql(R::INSERT);
        for (n, row) in self.0.iter().enumerate() {
            out.push_sql(if n == 0 { "(" } else { ", (" });
            row.binds(&mut out)?;
            out.push_sql(")");
        }
        Ok(())
    }
}

// Keyed by its text, as `Prepared` is.
impl<R> QueryId for Rows<'_, R> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<R, Conn> diesel::RunQueryDsl<Conn> for Rows<'_, R> {}

/// Inserts `rows`, [`ROWS_AT_A_TIME`] per statement and the rest one at a time: two
/// statement texts per table, each prepared once per connection.
pub fn insert_rows<R: Row>(conn: &mut SqliteConnection, rows: &[R]) -> QueryResult<()> {
    let whole = rows.len() - rows.len() % ROWS_AT_A_TIME;
    let (chunks, rest) = rows.split_at(whole);
    for chunk in chunks.chunks(ROWS_AT_A_TIME).chain(rest.chunks(1)) {
        diesel::RunQueryDsl::execute(Rows(chunk), conn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::{Connection, SimpleConnection};
    use diesel::sql_types::{BigInt, Text};
    use diesel::{QueryableByName, RunQueryDsl};

    #[derive(QueryableByName, Debug, PartialEq)]
    struct Pair {
        #[diesel(sql_type = BigInt)]
        n: i64,
        #[diesel(sql_type = Text)]
        s: String,
    }

    #[test]
    fn binds_fill_the_question_marks_in_order_and_a_mismatch_is_an_error() {
        let mut c = SqliteConnection::establish(":memory:").expect("sqlite");
        let rows: Vec<Pair> = sql("SELECT ? + 1 AS n, ? AS s")
            .bind::<BigInt, _>(41)
            .bind::<Text, _>("x")
            .load(&mut c)
            .expect("query");
        assert_eq!(
            rows,
            vec![Pair {
                n: 42,
                s: "x".into()
            }]
        );
        let too_few = sql("SELECT ? AS n, ? AS s")
            .bind::<BigInt, _>(1)
            .load::<Pair>(&mut c);
        assert!(too_few.is_err());
        let too_many = sql("SELECT 1 AS n, 'a' AS s")
            .bind::<BigInt, _>(1)
            .load::<Pair>(&mut c);
        assert!(too_many.is_err());
    }

    impl Row for Pair {
        const INSERT: &'static str = "INSERT INTO pairs (n, s) VALUES ";
        fn binds<'b>(&'b self, out: &mut AstPass<'_, 'b, Sqlite>) -> QueryResult<()> {
            out.push_bind_param::<BigInt, _>(&self.n)?;
            out.push_sql(", ");
            out.push_bind_param::<Text, _>(&self.s)
        }
    }

    #[test]
    fn rows_go_in_whole_statements_then_one_at_a_time_all_in_order() {
        let mut c = SqliteConnection::establish(":memory:").expect("sqlite");
        c.batch_execute(
            "CREATE TABLE pairs (k INTEGER PRIMARY KEY, n BIGINT NOT NULL, s TEXT NOT NULL)",
        )
        .expect("table");
        let pairs = |range: std::ops::Range<i64>| -> Vec<Pair> {
            range
                .map(|n| Pair {
                    n,
                    s: format!("row {n}"),
                })
                .collect()
        };
        // Two whole statements and three rows alone; then fewer rows than one statement holds.
        let first = 2 * ROWS_AT_A_TIME as i64 + 3;
        insert_rows(&mut c, &pairs(0..first)).expect("insert");
        insert_rows(&mut c, &pairs(first..first + 5)).expect("insert");
        insert_rows(&mut c, &pairs(0..0)).expect("nothing");
        let stored: Vec<Pair> = sql("SELECT n, s FROM pairs ORDER BY k")
            .load(&mut c)
            .expect("rows");
        assert_eq!(stored, pairs(0..first + 5));
        // A refused row fails the call.
        c.batch_execute("CREATE UNIQUE INDEX pairs_n ON pairs (n)")
            .expect("index");
        assert!(insert_rows(&mut c, &pairs(first..first + ROWS_AT_A_TIME as i64)).is_err());
    }
}

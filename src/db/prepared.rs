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

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::Connection;
    use diesel::sql_types::{BigInt, Text};
    use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};

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
}

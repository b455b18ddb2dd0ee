//! One PostgreSQL transaction that carries an operation's own writes and its record.
//!
//! Invariants: an [`OpenTx`] is a `BEGIN` on a connection taken from the pool; unless it is
//! committed, dropping it discards the connection (closing it rolls the transaction back on
//! the server), so a pooled connection is never handed out inside a transaction. The record's
//! row is locked (`FOR UPDATE`) when read, so no other writer changes it until the commit; an
//! absent record has no row to lock, so the final write is an upsert fenced on what was read,
//! and a concurrent insert makes it report `false` (the caller rolls back and looks again).

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{big, digest, pg_error, PgEngine, RecordRow};
use crate::error::Error;
use crate::format::record::ClaimToken;

/// What ends an operation's session state.
const RESET_SESSION: &str = "SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP";

/// An open transaction of the store's.
pub(crate) struct OpenTx<'e> {
    engine: &'e PgEngine,
    /// Invariant: `Some` until committed or dropped.
    client: Option<deadpool_postgres::Client>,
}

impl PgEngine {
    /// Begins a transaction on a pooled connection.
    pub(crate) fn begin(&self) -> Result<OpenTx<'_>, Error> {
        let client = self.run(async {
            let client = self.shared.client().await?;
            client.batch_execute("BEGIN").await.map_err(pg_error)?;
            Ok(client)
        })?;
        Ok(OpenTx {
            engine: self,
            client: Some(client),
        })
    }
}

impl OpenTx<'_> {
    fn client(&self) -> &deadpool_postgres::Client {
        // Invariant: only commit (which consumes self) and Drop take the client.
        self.client
            .as_ref()
            .expect("an open transaction has its connection")
    }

    /// Reads `key`'s record and locks its row until the transaction ends; with it, whether
    /// it is a Pending record whose lease still runs (by the database's clock).
    pub(crate) fn lock_record(&self, key: &[u8]) -> Result<Option<(Vec<u8>, bool)>, Error> {
        let s = &self.engine.shared;
        let client = self.client();
        self.engine.run(async {
            let statement = client.prepare_cached(&s.sql.lock).await.map_err(pg_error)?;
            let row = client
                .query_opt(&statement, &[&s.scope, &key])
                .await
                .map_err(pg_error)?;
            Ok(row.map(|r| (r.get(0), r.get::<_, Option<bool>>(1).unwrap_or(false))))
        })
    }

    /// A fresh epoch, on this transaction's connection (the pool may have no other); the
    /// epochs' lock is then held until the transaction ends.
    pub(crate) fn fresh_epoch(&self, floor: u64) -> Result<u64, Error> {
        let client = self.client();
        self.engine.run(async {
            super::schema::next_epoch(&***client, &self.engine.shared.sql, floor).await
        })
    }

    /// Removes the steps of `key`'s life `life` (an expired life that this write replaces).
    pub(crate) fn delete_steps(&self, key: &[u8], life: ClaimToken) -> Result<(), Error> {
        let s = &self.engine.shared;
        let client = self.client();
        self.engine.run(async {
            client
                .execute(
                    &s.sql.delete_steps,
                    &[&s.scope, &key, &big(life.epoch), &big(life.sequence)],
                )
                .await
                .map_err(pg_error)?;
            Ok(())
        })
    }

    /// Writes `record` for `key` if its record is still `expected` (None: absent).
    pub(crate) fn put(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        record: &[u8],
    ) -> Result<bool, Error> {
        let s = &self.engine.shared;
        s.forget_cached(key);
        let row = RecordRow::of(key, record)?;
        let expected_digest = expected.map(digest);
        let client = self.client();
        self.engine.run(async {
            let statement = client.prepare_cached(&s.sql.put).await.map_err(pg_error)?;
            let mut params = row.params(&s.scope, &key).to_vec();
            params.push(&expected_digest);
            let written = client
                .query_opt(&statement, &params)
                .await
                .map_err(pg_error)?;
            Ok(written.is_some())
        })
    }

    /// Runs `statement` (no parameters: savepoints and the like).
    pub(crate) fn batch(&self, statement: &str) -> Result<(), Error> {
        let client = self.client();
        self.engine
            .run(async { client.batch_execute(statement).await.map_err(pg_error) })
    }

    /// Commits; the connection goes back to the pool.
    pub(crate) fn commit(mut self) -> Result<(), Error> {
        let client = self.client();
        // Sent together (one round trip, run in order): the commit, then the end of whatever
        // session state the operation set (SET, LISTEN, locks, temporary tables), so the
        // connection goes back to the pool as it came.
        let (committed, reset) = self.engine.run(async {
            Ok(tokio::join!(
                client.batch_execute("COMMIT"),
                client.batch_execute(RESET_SESSION)
            ))
        })?;
        committed.map_err(pg_error)?;
        if reset.is_ok() {
            drop(self.client.take());
        }
        // Otherwise Drop discards the connection, whatever state it is in.
        Ok(())
    }

    /// The view the operation writes through.
    pub(crate) fn user(&self) -> PgTx<'_> {
        PgTx { tx: self }
    }
}

impl Drop for OpenTx<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Not committed: closing the connection rolls the transaction back.
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The transaction an operation of [`PgStore::execute_once_in_tx`](crate::PgStore::execute_once_in_tx)
/// writes in: its statements commit together with the operation's recorded outcome, or not at
/// all. A statement's failure is an [`Error::Storage`] whose
/// [`StorageError::get_ref`](crate::StorageError::get_ref) downcasts to the
/// [`tokio_postgres::Error`] (for its SQLSTATE).
pub struct PgTx<'t> {
    tx: &'t OpenTx<'t>,
}

impl std::fmt::Debug for PgTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTx").finish_non_exhaustive()
    }
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

/// Statements that would end or split the store's transaction: refused in [`PgTx`].
const TRANSACTION_CONTROL: [&str; 9] = [
    "BEGIN",
    "START",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    "SAVEPOINT",
    "RELEASE",
    "PREPARE",
];

/// Refuses a statement that controls the transaction (its first word, any case).
fn check_statement(statement: &str) -> Result<(), Error> {
    let first = statement
        .trim_start_matches(|c: char| c.is_whitespace() || c == '(' || c == ';')
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    match TRANSACTION_CONTROL
        .iter()
        .any(|word| word.eq_ignore_ascii_case(first))
    {
        true => Err(Error::InvalidConfig(
            "an operation must not control the store's transaction (BEGIN, COMMIT, ROLLBACK, \
             SAVEPOINT...): its writes commit with the outcome",
        )),
        false => Ok(()),
    }
}

impl PgTx<'_> {
    fn run<T: Send>(
        &self,
        f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send,
    ) -> Result<T, Error> {
        self.tx.engine.run(async { f.await.map_err(pg_error) })
    }

    /// Runs a statement; returns the number of rows it changed.
    ///
    /// # Errors
    /// [`Error::Storage`] with the server's error; the operation should return an error then
    /// (the transaction is aborted until it does, and its writes are rolled back).
    /// [`Error::InvalidConfig`] for a statement that controls the transaction (`BEGIN`,
    /// `COMMIT`, `ROLLBACK`, `SAVEPOINT`...): nothing is sent.
    pub fn execute(&mut self, statement: &str, params: Params<'_>) -> Result<u64, Error> {
        check_statement(statement)?;
        let client = self.tx.client();
        self.run(async { client.execute(statement, params).await })
    }

    /// Runs a query; returns its rows.
    ///
    /// # Errors
    /// As [`PgTx::execute`].
    pub fn query(&mut self, statement: &str, params: Params<'_>) -> Result<Vec<Row>, Error> {
        check_statement(statement)?;
        let client = self.tx.client();
        self.run(async { client.query(statement, params).await })
    }

    /// Runs a query that returns at most one row.
    ///
    /// # Errors
    /// As [`PgTx::execute`], and an error if it returns more than one row.
    pub fn query_opt(&mut self, statement: &str, params: Params<'_>) -> Result<Option<Row>, Error> {
        check_statement(statement)?;
        let client = self.tx.client();
        self.run(async { client.query_opt(statement, params).await })
    }

    /// Runs a query that returns exactly one row.
    ///
    /// # Errors
    /// As [`PgTx::execute`], and an error unless it returns exactly one row.
    pub fn query_one(&mut self, statement: &str, params: Params<'_>) -> Result<Row, Error> {
        check_statement(statement)?;
        let client = self.tx.client();
        self.run(async { client.query_one(statement, params).await })
    }

    /// Runs statements separated by semicolons, without parameters.
    ///
    /// # Errors
    /// As [`PgTx::execute`].
    pub fn batch_execute(&mut self, statements: &str) -> Result<(), Error> {
        for statement in statements.split(';') {
            check_statement(statement)?;
        }
        let client = self.tx.client();
        self.run(async { client.batch_execute(statements).await })
    }
}

#[cfg(test)]
mod tests {
    use super::check_statement;

    #[test]
    fn transaction_control_is_refused_and_everything_else_passes() {
        for refused in [
            "COMMIT",
            " commit;",
            "rollback to savepoint x",
            "BEGIN",
            "End",
            "(SAVEPOINT s)",
        ] {
            assert!(check_statement(refused).is_err(), "{refused}");
        }
        for fine in [
            "UPDATE stock SET n = n - 1",
            "select 1",
            "INSERT INTO commits VALUES (1)",
            "",
        ] {
            assert!(check_statement(fine).is_ok(), "{fine}");
        }
    }
}

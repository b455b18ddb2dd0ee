//! The read lane: a connection of the engine's own that carries its record reads, many at once.
//!
//! Invariants:
//! - only reads go down the lane: statements that probe the primary key (one key, or a batch
//!   of them) and commit nothing, so the lane needs no transaction state and a read never waits
//!   for another caller's commit;
//! - the lane is shared: callers send their reads on it without waiting for each other's answers
//!   (tokio-postgres pipelines them; PostgreSQL answers a connection's statements in order, and
//!   the client hands each answer to the caller whose statement it is). Several reads then
//!   share a round trip and a server wake-up, where pooled connections would take one each;
//! - a lost connection is replaced by the next read (one connect at a time). A read that
//!   finds the lane's connection lost is sent once more on a new one: a read changes nothing,
//!   so sending it again is safe, and a lane that sat idle while the server closed it costs no
//!   caller an error. Any other error is the caller's;
//! - the lane's connections are made and driven on the engine's runtime, whichever runtime the
//!   read runs on (see `connect`), and end with it;
//! - the lane is only ever read by futures that are polled to their end: a connection stops
//!   reading its socket while one answer waits for a receiver that is not polled, which would
//!   hold up every read behind it, so async callers' reads run in tasks of the engine's
//!   runtime (`ops::get_op`), never in the caller's own future.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_postgres::{Client, Config, Row, Statement};

use super::connect::connect_on;
use super::pg_error;
use super::schema::Statements;
use crate::error::{Error, StorageKind};

/// One connection that carries reads, with the reads' statements prepared on it.
struct LaneConnection {
    client: Client,
    get: Statement,
    get_batch: Statement,
}

/// A read the lane carries: one key's record, or several keys' in one statement.
#[derive(Clone, Copy)]
enum Read<'a> {
    One(&'a [u8]),
    Many(&'a [&'a [u8]]),
}

/// The engine's read lane: one connection, and how to make a new one when it is lost.
///
/// One, not one per worker of the engine's runtime: measured on 2 cores, replays at 1 to 64
/// threads, one lane ran 1.1-1.3x as fast as two (taken in turn or least busy first) at every
/// thread count. One backend that finds a run of pipelined reads waiting answers them in one
/// wake-up and one write; two share the same reads and wake twice as often. At most
/// [`READS_IN_FLIGHT`](super::batched::READS_IN_FLIGHT) read statements are in flight, and a
/// crowd shares batch statements, so one connection is not a bottleneck.
pub(crate) struct ReadLane {
    /// The connection in use, if one was made and has not been seen lost.
    current: Mutex<Option<Arc<LaneConnection>>>,
    /// Held while a new connection is made, so one connect serves every read that found none.
    connecting: tokio::sync::Mutex<()>,
    config: Config,
    runtime: tokio::runtime::Handle,
}

impl ReadLane {
    /// A lane connecting with `config` (the pool's, so sessions are set up alike), made and
    /// driven on `runtime`. Nothing connects until the first read.
    pub(crate) fn new(config: Config, runtime: tokio::runtime::Handle) -> Self {
        Self {
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            config,
            runtime,
        }
    }

    /// `key`'s record in `scope`, if it has one, read on the lane.
    ///
    /// # Errors
    /// [`Error::Storage`] if the read failed (on a second connection, if the first was lost),
    /// or no lane could be connected.
    pub(crate) async fn get(
        &self,
        sql: &Statements,
        scope: &str,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut rows = self.read(sql, scope, Read::One(key)).await?;
        Ok(rows.pop().map(|r| r.get(0)))
    }

    /// The records of `keys` in `scope` (`None` where a key has none), in the order of `keys`,
    /// read in one statement on the lane. A key given twice gets its record twice.
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub(crate) async fn get_many(
        &self,
        sql: &Statements,
        scope: &str,
        keys: &[&[u8]],
    ) -> Result<Vec<Option<Vec<u8>>>, Error> {
        let rows = self.read(sql, scope, Read::Many(keys)).await?;
        let found: HashMap<Vec<u8>, Vec<u8>> = rows
            .into_iter()
            .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
            .collect();
        Ok(keys.iter().map(|k| found.get(*k).cloned()).collect())
    }

    /// Sends `read` in `scope` on the lane, and once more on a new connection if the lane's
    /// was lost.
    async fn read(&self, sql: &Statements, scope: &str, read: Read<'_>) -> Result<Vec<Row>, Error> {
        let mut sent_before = false;
        loop {
            let lane = self.connection(sql).await?;
            let sent = match read {
                Read::One(key) => lane.client.query(&lane.get, &[&scope, &key]).await,
                Read::Many(keys) => lane.client.query(&lane.get_batch, &[&scope, &keys]).await,
            };
            match sent.map_err(pg_error) {
                Ok(rows) => return Ok(rows),
                Err(Error::Storage(e)) if e.kind() == StorageKind::Connection && !sent_before => {
                    self.forget(&lane);
                    sent_before = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The lane's connection, if it has one that is not closed.
    fn open_connection(&self) -> Option<Arc<LaneConnection>> {
        self.current
            .lock()
            .as_ref()
            .filter(|lane| !lane.client.is_closed())
            .map(Arc::clone)
    }

    /// Forgets `lost` if it is still the lane's connection.
    fn forget(&self, lost: &Arc<LaneConnection>) {
        let mut current = self.current.lock();
        if current.as_ref().is_some_and(|lane| Arc::ptr_eq(lane, lost)) {
            *current = None;
        }
    }

    /// The lane's connection, made now if it has none.
    async fn connection(&self, sql: &Statements) -> Result<Arc<LaneConnection>, Error> {
        if let Some(lane) = self.open_connection() {
            return Ok(lane);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(lane) = self.open_connection() {
            return Ok(lane);
        }
        let lane = Arc::new(self.connect(sql).await?);
        *self.current.lock() = Some(Arc::clone(&lane));
        Ok(lane)
    }

    async fn connect(&self, sql: &Statements) -> Result<LaneConnection, Error> {
        let (client, _driver) = connect_on(&self.runtime, self.config.clone())
            .await
            .map_err(pg_error)?;
        let get = client.prepare(&sql.get).await.map_err(pg_error)?;
        let get_batch = client.prepare(&sql.get_batch).await.map_err(pg_error)?;
        Ok(LaneConnection {
            client,
            get,
            get_batch,
        })
    }
}

#[cfg(test)]
mod tests {
    //! A read whose lane is lost under it is sent again on a new connection, and lanes live on
    //! the engine's runtime, not the caller's. Needs `IDEMSTORE_TEST_POSTGRES`.

    use super::*;
    use crate::engine::postgres::fixtures::{drop_schema, engine, record};
    use crate::engine::postgres::PgEngine;
    use crate::engine::Engine;
    use crate::format::record::RecordState;

    /// An engine in a fresh schema named after `test`, whose key `k` holds a Pending record
    /// (returned), and one lane beside the engine's own; `None` without a test server.
    fn one_lane_over_k(test: &str) -> Option<(PgEngine, String, ReadLane, Vec<u8>)> {
        let schema = format!("unit_lanes_{test}_{}", std::process::id());
        let engine = engine(&schema, 2)?;
        let pending = record(RecordState::Pending, 7);
        assert!(engine.claim(b"k", None, pending.clone()).expect("claim"));
        let url = std::env::var("IDEMSTORE_TEST_POSTGRES").expect("the engine opened on it");
        let config = url.parse().expect("a connection string");
        let lanes = ReadLane::new(config, engine.bridge.handle());
        Some((engine, schema, lanes, pending))
    }

    #[test]
    fn a_read_queued_behind_its_lanes_end_is_sent_again_on_a_new_connection() {
        let Some((engine, schema, lanes, pending)) = one_lane_over_k("lost") else {
            return;
        };
        let s = &engine.shared;
        let (killed, read) = engine
            .run(async {
                let lane = lanes.connection(&s.sql).await?;
                // The lane's backend ends itself; the read is pipelined right behind that
                // statement, on the same connection, so the server never answers it there.
                let kill = lane
                    .client
                    .simple_query("SELECT pg_terminate_backend(pg_backend_pid())");
                let read = lanes.get(&s.sql, &s.scope, b"k");
                let (killed, read) = tokio::join!(kill, read);
                Ok((killed.is_err(), read))
            })
            .expect("the lane connects");
        assert!(killed, "the terminating statement ends its own connection");
        assert_eq!(read.expect("the read is sent again"), Some(pending));
        let lane = lanes.open_connection().expect("a new lane");
        assert!(!lane.client.is_closed());
        drop_schema(&engine, &schema);
    }

    #[test]
    fn a_lane_made_by_a_read_on_another_runtime_outlives_that_runtime() {
        let Some((engine, schema, lanes, pending)) = one_lane_over_k("runtime") else {
            return;
        };
        let s = &engine.shared;
        let callers = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let read = callers.block_on(lanes.get(&s.sql, &s.scope, b"k"));
        assert_eq!(read.expect("read"), Some(pending.clone()));
        drop(callers);
        let lane = lanes
            .open_connection()
            .expect("the lane's connection is driven by the engine's runtime");
        assert!(!lane.client.is_closed());
        let again = engine.run(lanes.get(&s.sql, &s.scope, b"k"));
        assert_eq!(again.expect("read"), Some(pending));
        let same = lanes.open_connection().expect("the lane");
        assert!(Arc::ptr_eq(&lane, &same), "no reconnect was needed");
        drop_schema(&engine, &schema);
    }
}

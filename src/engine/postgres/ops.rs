//! The engine's operations: each one asynchronous at heart (the async driver awaits it), and
//! synchronous through the bridge (the sync driver blocks on it).
//!
//! Invariants: as in the module above; each operation is one statement (one round trip),
//! except a holder write that a waiter marked, which sends its notification after it.

// Futures are returned as `impl Future + Send` on purpose: declared `Send` where every
// lifetime is concrete, they stay provably `Send` inside the callers' futures (an `async fn`'s
// would be re-proven there, which the compiler cannot do across its generic lifetimes).
#![allow(clippy::manual_async_fn)]

use std::time::Duration;

use super::batch::{closed, BatchKind, Batcher, Turn};
use super::batched::{
    claim_on, finish_on, ClaimRequest, Claims, OutcomeRequest, ReadRequest, Reads,
};
use super::own::{OwnConnection, Taken};
use super::{
    big, columns, digest, listen, millis, pg_error, prepared, schema, Param, PgEngine, RecordRow,
};
use crate::engine::{ClaimOrGet, Engine, Held, RecordIter};
use crate::error::{Error, StorageKind};
use crate::format::record::ClaimToken;

/// Records are read a page at a time, in key order.
const PAGE: i64 = 512;

/// Who drives a statement's future: a sync call's thread, which polls it to its end (with the
/// own connection that thread drives, if it took one: see `own`), or an async call, whose
/// future may be left unpolled at any await or dropped.
#[derive(Clone, Copy)]
pub(crate) enum Caller<'c> {
    Sync(Option<&'c OwnConnection>),
    Async,
}

impl PgEngine {
    /// `key`'s record. A sync caller (`caller`) sends a lone read from its own future, which
    /// its thread drives to the end; an async caller's future may sit unpolled at any await,
    /// so its read goes in a task of the engine's runtime: a shared lane is never held up by
    /// an answer nobody reads, and the read's place in flight is never kept by a future nobody
    /// polls.
    pub(crate) async fn get_op(
        &self,
        key: &[u8],
        caller: Caller<'_>,
    ) -> Result<Option<Vec<u8>>, Error> {
        let s = &self.shared;
        let ticket = s.cache.as_ref().map(|cache| cache.ticket(key));
        let request = ReadRequest { key: key.to_vec() };
        let read = match s.reads.turn(&self.shared, |s| &s.reads, request) {
            Turn::Queued(queued) => queued.answer().await,
            Turn::Alone(place, request) => match caller {
                Caller::Async => place.send(request).await,
                // Dropping this future stops nothing that matters; the place in flight is
                // held until the read ends.
                // A sync caller's read goes down the lane even when it holds an own
                // connection: pipelined there, a crowd's reads share server wake-ups (measured
                // at 64 threads, own connections for reads ran 0.6x as fast; at one, the same).
                Caller::Sync(_) => Reads::run_one(s, &request).await,
            },
        };
        if let (Some(cache), Some(ticket), Ok(Some(bytes))) = (&s.cache, ticket, &read) {
            cache.keep(key, bytes, ticket);
        }
        read
    }

    async fn page_op(&self, after: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Error> {
        let s = &self.shared;
        let client = s.client().await?;
        let rows = client
            .query(&s.sql.page, &[&s.scope, &after, &PAGE])
            .await
            .map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, Vec<u8>>(1)))
            .collect())
    }

    async fn claim_op(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        pending: Vec<u8>,
    ) -> Result<bool, Error> {
        let _forgetting = self.shared.forgetting(key);
        let s = &self.shared;
        let claim = NewClaim::of(key, pending, s.lease)?;
        let Some(expected) = expected else {
            return self.claim_absent(key, claim, Caller::Async).await;
        };
        // A takeover of the exact record read. As a claim of an absent key, the statement runs
        // in a task of the engine's runtime, so a caller dropped while it is on its way cannot
        // stop it half-way, and a takeover written for a caller that has gone has its lease
        // ended as it lands.
        let claim_digest = claim.digest.clone();
        let expected_digest = digest(expected);
        let shared = std::sync::Arc::clone(&self.shared);
        let request = ClaimRequest {
            key: key.to_vec(),
            claim,
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.bridge.spawn(async move {
            let takeover = take_over(&shared, &request, &expected_digest);
            let taken = super::bounded(shared.io_timeout, takeover).await;
            if let Err(Ok(true)) = reply.send(taken) {
                Claims::unanswered(&shared, request, true);
            }
        });
        let taken = answer.await.unwrap_or_else(|_| Err(closed()))?;
        if taken {
            s.leases.hold(key, claim_digest);
        }
        Ok(taken)
    }

    /// Claims `key`, which has no record: whether the claim was inserted (batched with other
    /// callers' claims when some are on their way). The statement runs in a task of the
    /// engine's runtime, never in this future: a caller dropped while its claim is on its way
    /// (an async call cancelled, a timeout) cannot stop the statement half-way, and a claim
    /// written for a caller that has gone has its lease ended as soon as it lands. Except a
    /// sync caller's lone claim on its own connection, which its thread drives until it is
    /// answered or the I/O timeout cuts it off (a claim that lands after that is left to its
    /// lease, as one cut off inside such a task is).
    async fn claim_absent(
        &self,
        key: &[u8],
        claim: NewClaim,
        caller: Caller<'_>,
    ) -> Result<bool, Error> {
        let s = &self.shared;
        let claim_digest = claim.digest.clone();
        let request = ClaimRequest {
            key: key.to_vec(),
            claim,
        };
        let inserted = match (s.claims.turn(&self.shared, |s| &s.claims, request), caller) {
            (Turn::Queued(queued), _) => queued.answer().await?,
            (Turn::Alone(_place, request), Caller::Sync(Some(own))) => {
                let statement = own.statement(&s.sql.claim_new).await?;
                own.drive(claim_on(s, own.client(), &statement, &request))
                    .await?
            }
            (Turn::Alone(place, request), _) => place.send(request).await?,
        };
        if inserted {
            s.leases.hold(key, claim_digest);
        }
        Ok(inserted)
    }

    async fn claim_or_get_op(
        &self,
        key: &[u8],
        pending: Vec<u8>,
        caller: Caller<'_>,
    ) -> Result<Option<ClaimOrGet<Vec<u8>>>, Error> {
        let s = &self.shared;
        let claim = NewClaim::of(key, pending, s.lease)?;
        // The plain insert first: the cheapest statement for the new keys this way is chosen
        // for; a key that turns out to be taken is read in a second statement (None if its
        // record went meanwhile: the caller looks again), which may keep what it reads.
        let inserted = {
            let _forgetting = self.shared.forgetting(key);
            self.claim_absent(key, claim, caller).await?
        };
        if inserted {
            s.first.saw(false);
            return Ok(Some(ClaimOrGet::Claimed));
        }
        s.first.saw(true);
        Ok(self.get_op(key, caller).await?.map(ClaimOrGet::Existing))
    }

    /// Writes the holder's outcome (`record`), or releases its claim (`None`). With a replay
    /// cache, the key is forgotten before the statement and the outcome kept once it has
    /// landed, under a ticket taken before it was sent: a removal of the key by this engine in
    /// the meantime forgets it after, and the outcome is not kept. Anything else forgets the key
    /// again.
    async fn finish_op(
        &self,
        held: &Held<'_>,
        record: Option<&[u8]>,
        caller: Caller<'_>,
    ) -> Result<bool, Error> {
        let Some(cache) = &self.shared.cache else {
            return self.finish_statement(held, record, caller).await;
        };
        cache.forget(held.key);
        let ticket = cache.ticket(held.key);
        let finished = self.finish_statement(held, record, caller).await;
        let kept = match (&finished, record) {
            (Ok(true), Some(bytes)) => cache.keep(held.key, bytes, ticket),
            _ => false,
        };
        if !kept {
            cache.forget(held.key);
        }
        finished
    }

    /// As [`finish_op`](Self::finish_op), without the cache. An outcome goes as a claim does
    /// (see [`claim_absent`](Self::claim_absent)).
    async fn finish_statement(
        &self,
        held: &Held<'_>,
        record: Option<&[u8]>,
        caller: Caller<'_>,
    ) -> Result<bool, Error> {
        let s = &self.shared;
        let held_digest = digest(held.record);
        // Whatever happens below, the holder is done with its claim: stop renewing it.
        s.leases.let_go(held.key, &held_digest);
        let key = held.key;
        let Some(bytes) = record else {
            let client = s.client().await?;
            let statement = prepared(&client, &s.sql.release).await?;
            let row = client
                .query_opt(&statement, &[&s.scope, &key, &held_digest])
                .await
                .map_err(pg_error)?;
            return Ok(match row {
                Some(row) => {
                    if row.get::<_, bool>(0) {
                        s.notify(&client, key).await;
                    }
                    true
                }
                None => false,
            });
        };
        let request = OutcomeRequest::of(key, bytes, held_digest)?;
        match (
            s.outcomes.turn(&self.shared, |s| &s.outcomes, request),
            caller,
        ) {
            (Turn::Queued(queued), _) => queued.answer().await,
            (Turn::Alone(_place, request), Caller::Sync(Some(own))) => {
                let statement = own.statement(&s.sql.finish).await?;
                own.drive(finish_on(s, own.client(), &statement, &request))
                    .await
            }
            (Turn::Alone(place, request), _) => place.send(request).await,
        }
    }

    async fn write_step_op(&self, held: &Held<'_>, index: u32, step: &[u8]) -> Result<bool, Error> {
        let s = &self.shared;
        let held_digest = digest(held.record);
        let index = i32::try_from(index).map_err(|_| Error::InvalidConfig("too many steps"))?;
        let client = s.client().await?;
        let statement = prepared(&client, &s.sql.write_step).await?;
        let row = client
            .query_opt(
                &statement,
                &[
                    &s.scope,
                    &held.key,
                    &held_digest,
                    &big(held.life.epoch),
                    &big(held.life.sequence),
                    &index,
                    &step,
                ],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.is_some())
    }

    async fn steps_op(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let s = &self.shared;
        let client = s.client().await?;
        let statement = prepared(&client, &s.sql.steps).await?;
        let rows = client
            .query(
                &statement,
                &[&s.scope, &key, &big(life.epoch), &big(life.sequence)],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, i32>(0) as u32, r.get::<_, Vec<u8>>(1)))
            .collect())
    }

    async fn remove_record_op(&self, key: &[u8], expected: &[u8]) -> Result<bool, Error> {
        let _forgetting = self.shared.forgetting(key);
        let s = &self.shared;
        let expected_digest = digest(expected);
        let client = s.client().await?;
        let statement = prepared(&client, &s.sql.remove).await?;
        let row = client
            .query_opt(&statement, &[&s.scope, &key, &expected_digest])
            .await
            .map_err(pg_error)?;
        match row {
            Some(row) => {
                // A holder in this process whose record went stops renewing it.
                s.leases.let_go(key, &expected_digest);
                if row.get::<_, bool>(0) {
                    s.notify(&client, key).await;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn import_op(
        &self,
        key: &[u8],
        record: &[u8],
        steps: &[(u32, Vec<u8>)],
    ) -> Result<bool, Error> {
        let _forgetting = self.shared.forgetting(key);
        let s = &self.shared;
        let row = RecordRow::of(key, record)?;
        let indexes: Vec<i32> = steps
            .iter()
            .map(|(i, _)| i32::try_from(*i))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::InvalidConfig("too many steps"))?;
        let bodies: Vec<&[u8]> = steps.iter().map(|(_, b)| b.as_slice()).collect();
        let client = s.client().await?;
        let statement = prepared(&client, &s.sql.import).await?;
        let mut params = row.params(&s.scope, &key).to_vec();
        params.extend([&indexes as Param<'_>, &bodies]);
        let written = client
            .query_one(&statement, &params)
            .await
            .map_err(pg_error)?;
        Ok(written.get::<_, i64>(0) == 1)
    }

    async fn holder_live_op(&self, key: &[u8], claim: ClaimToken) -> bool {
        let s = &self.shared;
        let live = async {
            let client = s.client().await?;
            let statement = prepared(&client, &s.sql.holder_live).await?;
            let row = client
                .query_opt(
                    &statement,
                    &[&s.scope, &key, &big(claim.epoch), &big(claim.sequence)],
                )
                .await
                .map_err(pg_error)?;
            Ok::<_, Error>(row.and_then(|r| r.get::<_, Option<bool>>(0)))
        };
        match self.timed(live).await {
            // No row: the claim is no longer Pending (finished, removed, taken over). Not an
            // orphan: answer "live", so the caller waits a moment and reads the record again.
            Ok(live) => live.unwrap_or(true),
            Err(e) => {
                // Unknown: treat it as live. Waiting is bounded; a takeover would not be.
                tracing::warn!(error = %e, "could not read a claim's lease; treating it as live");
                true
            }
        }
    }

    /// Marks `key`'s Pending claim `claim` as waited for; false if it is no longer Pending.
    async fn mark_waiting_op(&self, key: &[u8], claim: ClaimToken) -> Result<bool, Error> {
        let s = &self.shared;
        let client = s.client().await?;
        let statement = prepared(&client, &s.sql.mark_waiting).await?;
        let row = client
            .query_opt(
                &statement,
                &[&s.scope, &key, &big(claim.epoch), &big(claim.sequence)],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.is_some())
    }

    /// Waits up to `max` for a notification about `key` (see `listen`); returns at once if
    /// the claim is no longer Pending.
    pub(crate) async fn wait_for_holder_op(&self, key: &[u8], claim: ClaimToken, max: Duration) {
        let s = &self.shared;
        let waiter = s.hub.register(listen::tag(&s.scope, key));
        match self.timed(self.mark_waiting_op(key, claim)).await {
            Ok(false) => {}
            Ok(true) => waiter.wait_async(max.min(listen::POLL)).await,
            Err(_) => tokio::time::sleep(max.min(listen::POLL)).await,
        }
    }

    async fn fresh_epoch_op(&self, floor: u64) -> Result<u64, Error> {
        let mut client = self.shared.client().await?;
        schema::next_epoch_alone(&mut client, &self.shared.sql, floor).await
    }

    async fn due_op(
        &self,
        now_ms: u64,
        after: Option<(u64, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let s = &self.shared;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // No cursor: before every entry (expiry times are not negative).
        let (after_ms, after_key) = after.map_or((-1, &[][..]), |(t, k)| (millis(t), k));
        let client = s.client().await?;
        let rows = client
            .query(
                &s.sql.due,
                &[&s.scope, &millis(now_ms), &limit, &after_ms, &after_key],
            )
            .await
            .map_err(pg_error)?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, Vec<u8>>(1)))
            .collect())
    }

    async fn sweep_op(&self, now_ms: u64, limit: usize) -> Result<u64, Error> {
        let s = &self.shared;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = s.client().await?;
        let row = client
            .query_one(&s.sql.sweep, &[&s.scope, &millis(now_ms), &limit])
            .await
            .map_err(pg_error)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn flush_op(&self) -> Result<(), Error> {
        let mut client = self.shared.client().await?;
        // A synchronous commit that writes a commit record flushes the WAL up to it, and so
        // every earlier (asynchronous) commit.
        let tx = client.transaction().await.map_err(pg_error)?;
        tx.batch_execute("SET LOCAL synchronous_commit = on; SELECT txid_current();")
            .await
            .map_err(pg_error)?;
        tx.commit().await.map_err(pg_error)
    }

    /// Ends the lease of `held` now (its holder gave up), in the background. The claim
    /// statement itself may still be on its way (its caller was dropped while it waited on
    /// another transaction's row, for at most [`LOCK_WAIT`](super::LOCK_WAIT)), so the lease
    /// is ended again once such a wait is surely over; ending a lease that is not there, or
    /// not this claim's, changes nothing.
    fn end_lease_now(&self, held: &Held<'_>) {
        let shared = std::sync::Arc::clone(&self.shared);
        let (key, held_digest) = (held.key.to_vec(), digest(held.record));
        self.bridge.spawn(async move {
            let end = || async {
                let client = shared.client().await?;
                client
                    .execute(&shared.sql.end_lease, &[&shared.scope, &key, &held_digest])
                    .await
                    .map_err(pg_error)
            };
            for pause in [Duration::ZERO, super::LOCK_WAIT * 2, Duration::from_secs(1)] {
                tokio::time::sleep(pause).await;
                match end().await {
                    Ok(ended) if ended > 0 => return,
                    // Not there yet, or its row locked by another transaction for a while.
                    Ok(_) => {}
                    Err(Error::Storage(e)) if e.kind() == StorageKind::Busy => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "could not end an interrupted claim's lease; it runs out");
                        return;
                    }
                }
            }
        });
    }
}

/// Takes `request.key` over (`claim_over`) from the exact record whose digest is `expected`:
/// whether this claim replaced it.
async fn take_over(
    s: &super::Shared,
    request: &ClaimRequest,
    expected: &Vec<u8>,
) -> Result<bool, Error> {
    let client = s.client().await?;
    let statement = prepared(&client, &s.sql.claim_over).await?;
    let key = request.key.as_slice();
    let mut params = request.claim.params(&s.scope, &key).to_vec();
    params.push(expected);
    let row = client
        .query_opt(&statement, &params)
        .await
        .map_err(pg_error)?;
    Ok(row.is_some())
}

/// A Pending record about to be claimed, with what its claim statements bind.
pub(crate) struct NewClaim {
    pub(crate) pending: Vec<u8>,
    pub(crate) digest: Vec<u8>,
    pub(crate) columns: super::Columns,
    lease_ms: f64,
}

impl NewClaim {
    pub(crate) fn of(key: &[u8], pending: Vec<u8>, lease: Duration) -> Result<Self, Error> {
        Ok(Self {
            columns: columns(key, &pending)?,
            digest: digest(&pending),
            pending,
            lease_ms: lease.as_millis() as f64,
        })
    }

    /// `$1` to `$10` of every claim statement (schema.rs).
    pub(crate) fn params<'a>(&'a self, scope: &'a String, key: &'a &'a [u8]) -> [Param<'a>; 10] {
        let c = &self.columns;
        [
            scope,
            key,
            &self.pending,
            &self.digest,
            &c.expires_ms,
            &c.claim.0,
            &c.claim.1,
            &c.life.0,
            &c.life.1,
            &self.lease_ms,
        ]
    }
}

impl PgEngine {
    /// An own connection for a sync call whose statement goes through `batcher`, unless that
    /// statement would queue for a batch now (it would not use the connection).
    fn own_for<K: BatchKind>(&self, batcher: &Batcher<K>) -> Option<Taken<'_>> {
        if batcher.busy() {
            return None;
        }
        self.shared.own.take()
    }
}

/// Runs `op` again while a row it needs stays locked by another transaction: a holder's own
/// write is refused only by fencing or a failure, never by a passing lock (the caller bounds
/// the whole by the I/O timeout).
pub(crate) async fn retry_busy<T, F, Fut>(mut op: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    loop {
        match op().await {
            Err(Error::Storage(e)) if e.kind() == StorageKind::Busy => continue,
            done => return done,
        }
    }
}

impl Engine for PgEngine {
    type Bytes = Vec<u8>;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.run(self.get_op(key, Caller::Sync(None)))
    }

    fn records(&self) -> RecordIter<'_, Vec<u8>> {
        let mut after: Vec<u8> = Vec::new();
        let mut page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)> = Vec::new().into_iter();
        let mut done = false;
        Box::new(std::iter::from_fn(move || loop {
            if let Some(item) = page.next() {
                return Some(Ok(item));
            }
            if done {
                return None;
            }
            match self.run(self.page_op(&after)) {
                Ok(rows) => {
                    done = (rows.len() as i64) < PAGE;
                    if let Some((last, _)) = rows.last() {
                        after = last.clone();
                    }
                    page = rows.into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }))
    }

    fn claim(&self, key: &[u8], expected: Option<&[u8]>, pending: Vec<u8>) -> Result<bool, Error> {
        self.run(self.claim_op(key, expected, pending))
    }

    fn finish(&self, held: &Held<'_>, record: Option<Vec<u8>>) -> Result<bool, Error> {
        let own = self.own_for(&self.shared.outcomes);
        let caller = Caller::Sync(own.as_deref());
        let op = retry_busy(|| self.finish_op(held, record.as_deref(), caller));
        self.run_sync(own.as_deref(), op)
    }

    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<bool, Error> {
        self.run(retry_busy(|| self.write_step_op(held, index, &step)))
    }

    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        self.run(self.steps_op(key, life))
    }

    fn remove_record(
        &self,
        key: &[u8],
        expected: &[u8],
        _steps_of: Option<ClaimToken>,
    ) -> Result<bool, Error> {
        // The statement removes the steps of the record's own life, whatever it is.
        self.run(retry_busy(|| self.remove_record_op(key, expected)))
    }

    fn import_record(
        &self,
        key: &[u8],
        record: &[u8],
        _life: ClaimToken,
        steps: &[(u32, Vec<u8>)],
    ) -> Result<bool, Error> {
        // The statement stores the steps under the record's own life.
        self.run(self.import_op(key, record, steps))
    }

    fn size_on_disk(&self) -> Result<Option<u64>, Error> {
        let s = &self.shared;
        self.run(async {
            let client = s.client().await?;
            let row = client.query_one(&s.sql.size, &[]).await.map_err(pg_error)?;
            Ok(u64::try_from(row.get::<_, i64>(0)).ok())
        })
    }

    fn index_expiry(&self, _expires_ms: u64, _key: &[u8]) -> Result<(), Error> {
        // The expiry column is the index: written with the record, in the same statement.
        Ok(())
    }

    fn due_expiries(
        &self,
        now_ms: u64,
        after: Option<(u64, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        self.run(self.due_op(now_ms, after, limit))
    }

    fn unindex_expiries(&self, _entries: &[(u64, Vec<u8>)]) -> Result<(), Error> {
        Ok(())
    }

    fn sweep_batch(&self, now_ms: u64, limit: usize) -> Option<Result<u64, Error>> {
        Some(self.run(self.sweep_op(now_ms, limit)))
    }

    fn wait_durable(&self) -> Result<(), Error> {
        // Each statement committed before it returned (synchronously, unless relaxed).
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        self.run(self.flush_op())
    }

    fn holder_live(&self, key: &[u8], claim: ClaimToken, running_here: bool) -> bool {
        running_here
            || self
                .run(async { Ok(self.holder_live_op(key, claim).await) })
                .unwrap_or(true)
    }

    fn wait_for_holder(&self, key: &[u8], claim: ClaimToken, max: Duration) {
        let waited = self.run(async {
            self.wait_for_holder_op(key, claim, max).await;
            Ok(())
        });
        if waited.is_err() {
            std::thread::sleep(max.min(listen::POLL));
        }
    }

    fn abandon(&self, held: &Held<'_>) {
        self.shared.leases.let_go(held.key, &digest(held.record));
    }

    fn interrupted(&self, held: &Held<'_>) {
        self.abandon(held);
        self.end_lease_now(held);
    }

    fn fresh_epoch(&self, floor: u64) -> Result<u64, Error> {
        self.run(self.fresh_epoch_op(floor))
    }

    fn get_async<'a>(
        &'a self,
        key: &'a [u8],
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, Error>> + Send + 'a {
        self.timed(self.get_op(key, Caller::Async))
    }

    fn claim_async<'a>(
        &'a self,
        key: &'a [u8],
        expected: Option<&'a [u8]>,
        pending: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        self.timed(self.claim_op(key, expected, pending))
    }

    fn finish_async<'a>(
        &'a self,
        held: &'a Held<'a>,
        record: Option<Vec<u8>>,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            self.timed(retry_busy(|| {
                self.finish_op(held, record.as_deref(), Caller::Async)
            }))
            .await
        }
    }

    fn write_step_async<'a>(
        &'a self,
        held: &'a Held<'a>,
        index: u32,
        step: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            self.timed(retry_busy(|| self.write_step_op(held, index, &step)))
                .await
        }
    }

    fn steps_async<'a>(
        &'a self,
        key: &'a [u8],
        life: ClaimToken,
    ) -> impl std::future::Future<Output = Result<Vec<(u32, Vec<u8>)>, Error>> + Send + 'a {
        self.timed(self.steps_op(key, life))
    }

    fn remove_record_async<'a>(
        &'a self,
        key: &'a [u8],
        expected: &'a [u8],
        _steps_of: Option<ClaimToken>,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        self.timed(retry_busy(|| self.remove_record_op(key, expected)))
    }

    fn holder_live_async<'a>(
        &'a self,
        key: &'a [u8],
        claim: ClaimToken,
        running_here: bool,
    ) -> impl std::future::Future<Output = bool> + Send + 'a {
        async move { running_here || self.holder_live_op(key, claim).await }
    }

    fn wait_for_holder_async<'a>(
        &'a self,
        key: &'a [u8],
        claim: ClaimToken,
        max: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        self.wait_for_holder_op(key, claim, max)
    }

    fn fresh_epoch_async(
        &self,
        floor: u64,
    ) -> impl std::future::Future<Output = Result<u64, Error>> + Send + '_ {
        self.timed(self.fresh_epoch_op(floor))
    }

    fn durability_blocks(&self) -> bool {
        false
    }

    fn visible_before_durable(&self) -> bool {
        // Under synchronous commits another session sees a row only after its commit record
        // is flushed; under relaxed commits replays do not wait for durability anyway.
        false
    }

    fn claims_first(&self) -> bool {
        self.shared.first.claim_first()
    }

    fn reads_in_place(&self) -> bool {
        false
    }

    fn cached(&self, key: &[u8]) -> Option<std::sync::Arc<[u8]>> {
        self.shared.cache.as_ref()?.get(key)
    }

    fn forget_cached(&self, key: &[u8]) {
        self.shared.forget_cached(key);
    }

    fn note_first_look(&self, found: bool) {
        self.shared.first.saw(found);
    }

    fn claim_or_get(
        &self,
        key: &[u8],
        pending: Vec<u8>,
    ) -> Result<Option<ClaimOrGet<Vec<u8>>>, Error> {
        let own = self.own_for(&self.shared.claims);
        let op = self.claim_or_get_op(key, pending, Caller::Sync(own.as_deref()));
        self.run_sync(own.as_deref(), op)
    }

    fn claim_or_get_async<'a>(
        &'a self,
        key: &'a [u8],
        pending: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Option<ClaimOrGet<Vec<u8>>>, Error>> + Send + 'a
    {
        self.timed(self.claim_or_get_op(key, pending, Caller::Async))
    }
}

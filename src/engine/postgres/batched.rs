//! The statements that are batched (see `batch`): new claims, holders' outcomes and reads, each
//! answering every request exactly as its one-row statement would.
//!
//! Invariants: a batched claim inserts only where the key has no row (never an upsert), and a
//! batched outcome is fenced on the holder's exact Pending record, as their one-row statements
//! are; a request is answered from the row of its own key only (the batch's keys are
//! distinct); a claim whose caller has gone by the time it is answered has its lease ended at
//! once, so the key is free for the next caller, never held until the lease runs out.

// Futures are returned as `impl Future + Send`, as the trait declares them (see ops.rs).
#![allow(clippy::manual_async_fn)]

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

use super::batch::BatchKind;
use super::ops::{retry_busy, NewClaim};
use super::{columns, digest, listen, pg_error, prepared, Columns, RecordRow, Shared};
use crate::error::Error;

/// How many claims may be in flight before callers queue: a few callers never wait for each
/// other, a crowd shares statements and commits (measured on 2 cores at 4 to 64 threads: 4 did
/// better than 1, 2, 8 and 16).
pub(crate) const CLAIMS_IN_FLIGHT: usize = 4;

/// How many outcomes may be in flight before callers queue (fewer if the pool is smaller: each
/// one in flight alone holds a pooled connection). Measured on 2 cores, new keys at 16 and 64
/// threads: 16 ran as fast as never batching at 16 threads and 1.1-1.5x as fast at 64; 4 and 8
/// batched too early, 0.8-0.9x at 16 threads. (With the batch's cached generic plan, which
/// scanned the scope to lock its rows, any batching ran at half speed.)
pub(crate) const OUTCOMES_IN_FLIGHT: usize = 16;

/// How many reads may be in flight before callers queue: reads commit nothing and the lanes
/// pipeline them, so many run side by side before sharing a statement pays (measured on 2
/// cores, replays at 16 and 64 threads: 16 did better than 8, which batched at 16 threads and
/// ran 0.75x as fast there, and than 32, which batched too late at 64 threads and ran 0.55x).
pub(crate) const READS_IN_FLIGHT: usize = 16;

/// A new claim: its key and its Pending record.
pub(crate) struct ClaimRequest {
    pub key: Vec<u8>,
    pub claim: NewClaim,
}

/// New claims: the answer is whether the claim was inserted (false: the key has a record).
pub(crate) struct Claims;

impl BatchKind for Claims {
    type Request = ClaimRequest;
    type Answer = bool;

    fn key(request: &ClaimRequest) -> &[u8] {
        &request.key
    }

    fn bytes(request: &ClaimRequest) -> usize {
        request.key.len() + request.claim.pending.len()
    }

    fn run<'a>(
        shared: &'a Shared,
        requests: &'a [ClaimRequest],
    ) -> impl std::future::Future<Output = Result<Vec<bool>, Error>> + Send + 'a {
        async move {
            let mut keys = Vec::with_capacity(requests.len());
            let (mut records, mut digests) = (Vec::new(), Vec::new());
            let (mut expires, mut ce, mut cs, mut le, mut ls) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for r in requests {
                let c = &r.claim;
                keys.push(r.key.as_slice());
                records.push(c.pending.as_slice());
                digests.push(c.digest.as_slice());
                expires.push(c.columns.expires_ms);
                ce.push(c.columns.claim.0);
                cs.push(c.columns.claim.1);
                le.push(c.columns.life.0);
                ls.push(c.columns.life.1);
            }
            let lease_ms = shared.lease.as_millis() as f64;
            let client = shared.client().await?;
            let statement = prepared(&client, &shared.sql.claim_new_batch).await?;
            let rows = client
                .query(
                    &statement,
                    &[
                        &shared.scope,
                        &lease_ms,
                        &keys,
                        &records,
                        &digests,
                        &expires,
                        &ce,
                        &cs,
                        &le,
                        &ls,
                    ],
                )
                .await
                .map_err(pg_error)?;
            let inserted: std::collections::HashSet<Vec<u8>> =
                rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
            Ok(keys.iter().map(|k| inserted.contains(*k)).collect())
        }
    }

    fn run_one<'a>(
        s: &'a Shared,
        request: &'a ClaimRequest,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        async move {
            let client = s.client().await?;
            let statement = prepared(&client, &s.sql.claim_new).await?;
            claim_on(s, &client, &statement, request).await
        }
    }

    fn unanswered(shared: &Arc<Shared>, request: ClaimRequest, claimed: bool) {
        if !claimed {
            return;
        }
        // Nobody will run this claim: end its lease, so the next caller takes it over (again
        // while another transaction holds its row for a while, within the I/O timeout).
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let end = retry_busy(|| async {
                let client = shared.client().await?;
                client
                    .execute(
                        &shared.sql.end_lease,
                        &[&shared.scope, &request.key, &request.claim.digest],
                    )
                    .await
                    .map_err(pg_error)
            });
            if let Err(e) = super::bounded(shared.io_timeout, end).await {
                tracing::debug!(error = %e, "could not end an abandoned claim's lease; it runs out");
            }
        });
    }
}

/// A holder's outcome: its key, the record to write (with its digest and the columns derived
/// from it, made by the caller, so a record that cannot be written fails only its own call)
/// and the digest of the holder's Pending record.
pub(crate) struct OutcomeRequest {
    pub key: Vec<u8>,
    pub record: Vec<u8>,
    pub digest: Vec<u8>,
    pub columns: Columns,
    pub held_digest: Vec<u8>,
}

impl OutcomeRequest {
    /// The request to write `record` over the Pending record whose digest is `held_digest`.
    ///
    /// # Errors
    /// [`Error::CorruptRecord`] if `record`'s header does not decode.
    pub(crate) fn of(key: &[u8], record: &[u8], held_digest: Vec<u8>) -> Result<Self, Error> {
        Ok(Self {
            key: key.to_vec(),
            record: record.to_vec(),
            digest: digest(record),
            columns: columns(key, record)?,
            held_digest,
        })
    }
}

/// Holders' outcomes: the answer is whether the outcome was written (false: fenced out).
pub(crate) struct Outcomes;

impl BatchKind for Outcomes {
    type Request = OutcomeRequest;
    type Answer = bool;

    fn key(request: &OutcomeRequest) -> &[u8] {
        &request.key
    }

    fn bytes(request: &OutcomeRequest) -> usize {
        request.key.len() + request.record.len()
    }

    fn run<'a>(
        shared: &'a Shared,
        requests: &'a [OutcomeRequest],
    ) -> impl std::future::Future<Output = Result<Vec<bool>, Error>> + Send + 'a {
        async move {
            let mut keys = Vec::with_capacity(requests.len());
            let (mut records, mut digests, mut held) = (Vec::new(), Vec::new(), Vec::new());
            let (mut states, mut expires, mut ce, mut cs, mut le, mut ls) = (
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            );
            for r in requests {
                let c = &r.columns;
                keys.push(r.key.as_slice());
                records.push(r.record.as_slice());
                digests.push(r.digest.as_slice());
                held.push(r.held_digest.as_slice());
                states.push(c.state);
                expires.push(c.expires_ms);
                ce.push(c.claim.0);
                cs.push(c.claim.1);
                le.push(c.life.0);
                ls.push(c.life.1);
            }
            let client = shared.client().await?;
            // Sent unnamed (parsed, planned and run in one round trip), so the server plans it
            // for this batch's scope every time: a cached generic plan, made without knowing
            // the scope, may scan the whole scope for the rows to lock (design §13).
            let (bytes, int8) = (Type::BYTEA_ARRAY, Type::INT8_ARRAY);
            let rows = client
                .query_typed(
                    &shared.sql.finish_batch,
                    &[
                        (&shared.scope, Type::TEXT),
                        (&keys, bytes.clone()),
                        (&records, bytes.clone()),
                        (&digests, bytes.clone()),
                        (&states, Type::INT2_ARRAY),
                        (&expires, int8.clone()),
                        (&ce, int8.clone()),
                        (&cs, int8.clone()),
                        (&le, int8.clone()),
                        (&ls, int8),
                        (&held, bytes),
                    ],
                )
                .await
                .map_err(pg_error)?;
            let written: HashMap<Vec<u8>, bool> = rows
                .iter()
                .map(|r| (r.get::<_, Vec<u8>>(0), r.get::<_, bool>(1)))
                .collect();
            let waited: Vec<String> = written
                .iter()
                .filter(|(_, waiters)| **waiters)
                .map(|(key, _)| listen::tag_text(&listen::tag(&shared.scope, key)))
                .collect();
            if !waited.is_empty() {
                shared.notify_all(&client, &waited).await;
            }
            Ok(keys.iter().map(|k| written.contains_key(*k)).collect())
        }
    }

    fn run_one<'a>(
        s: &'a Shared,
        request: &'a OutcomeRequest,
    ) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'a {
        // A holder's own write is refused only by fencing or a failure, never by a lock
        // another transaction holds for a while: it goes again until the lock is gone (the
        // caller bounds the whole by the I/O timeout).
        retry_busy(move || async move {
            let client = s.client().await?;
            let statement = prepared(&client, &s.sql.finish).await?;
            finish_on(s, &client, &statement, request).await
        })
    }
}

/// Sends `request`'s claim (`statement`: the one-row `claim_new`) on `client`: whether it
/// was inserted.
pub(crate) async fn claim_on(
    s: &Shared,
    client: &Client,
    statement: &Statement,
    request: &ClaimRequest,
) -> Result<bool, Error> {
    let key = request.key.as_slice();
    let row = client
        .query_opt(statement, &request.claim.params(&s.scope, &key))
        .await
        .map_err(pg_error)?;
    Ok(row.is_some())
}

/// Sends `request`'s outcome (`statement`: the one-row `finish`) on `client`, and tells the
/// key's waiters if one marked it: whether it was written (false: fenced out).
pub(crate) async fn finish_on(
    s: &Shared,
    client: &Client,
    statement: &Statement,
    request: &OutcomeRequest,
) -> Result<bool, Error> {
    let row = RecordRow {
        record: &request.record,
        digest: request.digest.clone(),
        columns: request.columns,
    };
    let key = request.key.as_slice();
    let mut params = row.params(&s.scope, &key).to_vec();
    params.push(&request.held_digest);
    let written = client
        .query_opt(statement, &params)
        .await
        .map_err(pg_error)?;
    let Some(written) = written else {
        return Ok(false);
    };
    if written.get::<_, bool>(0) {
        s.notify(client, key).await;
    }
    Ok(true)
}

/// A read of one key's record.
pub(crate) struct ReadRequest {
    pub key: Vec<u8>,
}

/// Reads: the answer is the key's record, if it has one. Reads for one key in one batch (a
/// crowd retrying it) share the row read once.
pub(crate) struct Reads;

impl BatchKind for Reads {
    type Request = ReadRequest;
    type Answer = Option<Vec<u8>>;

    const SHARES_ANSWERS: bool = true;

    fn run_one<'a>(
        s: &'a Shared,
        request: &'a ReadRequest,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, Error>> + Send + 'a {
        s.lane.get(&s.sql, &s.scope, &request.key)
    }

    fn key(request: &ReadRequest) -> &[u8] {
        &request.key
    }

    fn run<'a>(
        s: &'a Shared,
        requests: &'a [ReadRequest],
    ) -> impl std::future::Future<Output = Result<Vec<Option<Vec<u8>>>, Error>> + Send + 'a {
        async move {
            let keys: Vec<&[u8]> = requests.iter().map(|r| r.key.as_slice()).collect();
            s.lane.get_many(&s.sql, &s.scope, &keys).await
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each batched statement answers every request as its one-row statement would: claims
    //! only where no row is, outcomes only over the holder's exact Pending record, reads from
    //! each key's own row. Needs `IDEMSTORE_TEST_POSTGRES`.

    use super::*;
    use crate::engine::postgres::fixtures::{drop_schema, engine, record};
    use crate::engine::postgres::ops::NewClaim;
    use crate::engine::Engine;
    use crate::format::record::RecordState;
    use std::time::Duration;

    fn claim(key: &[u8], token: u64) -> ClaimRequest {
        ClaimRequest {
            key: key.to_vec(),
            claim: NewClaim::of(
                key,
                record(RecordState::Pending, token),
                Duration::from_secs(30),
            )
            .expect("a valid record"),
        }
    }

    /// The plan a server caches for the batched read, on a table with no statistics yet:
    /// one primary-key probe per key, never a scan of the scope (which `key = ANY($2)` got).
    #[test]
    fn a_batch_of_reads_probes_each_key_in_a_cached_generic_plan() {
        let schema = format!("unit_batched_plan_{}", std::process::id());
        let Some(engine) = engine(&schema, 2) else {
            return;
        };
        let url = std::env::var("IDEMSTORE_TEST_POSTGRES").expect("the engine opened on it");
        let (get_batch, table) = (engine.shared.sql.get_batch.clone(), schema.clone());
        let plan = engine
            .run(async move {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(pg_error)?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!(
                        "INSERT INTO {table}.records (scope, key, record, digest, state, \
                             expires_ms, claim_epoch, claim_seq, life_epoch, life_seq) \
                         SELECT '', ('k' || g)::bytea, '\\x00', '\\x00', 1, g, 1, g, 1, g \
                         FROM generate_series(1, 5000) AS g; \
                         SET plan_cache_mode = force_generic_plan; \
                         PREPARE reads(text, bytea[]) AS {get_batch}"
                    ))
                    .await
                    .map_err(pg_error)?;
                let rows = client
                    .simple_query("EXPLAIN EXECUTE reads('', ARRAY['k1'::bytea, 'k2'::bytea])")
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .iter()
                    .filter_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join("\n"))
            })
            .expect("the plan");
        assert!(plan.contains("records_pkey"), "{plan}");
        assert!(
            !plan.contains("Bitmap") && !plan.contains("Seq Scan on records"),
            "{plan}"
        );
        drop_schema(&engine, &schema);
    }

    #[test]
    fn batched_statements_answer_each_request_as_its_own_statement_would() {
        let schema = format!("unit_batched_{}", std::process::id());
        let Some(engine) = engine(&schema, 4) else {
            return;
        };
        let s = &engine.shared;
        // "a" is taken before the batch: only "b" and "c" are claimed by it.
        let pending_a = record(RecordState::Pending, 1);
        assert!(engine
            .claim(b"a", None, pending_a.clone())
            .expect("claim a"));
        let claimed = engine
            .run(Claims::run(
                s,
                &[claim(b"a", 2), claim(b"b", 3), claim(b"c", 4)],
            ))
            .expect("the batch runs");
        assert_eq!(claimed, vec![false, true, true]);
        assert_eq!(engine.get(b"a").expect("read"), Some(pending_a.clone()));

        // "b" is taken over by another holder; the batch of outcomes writes "a" and "c" only.
        let pending_b = record(RecordState::Pending, 3);
        let pending_c = record(RecordState::Pending, 4);
        engine.lapse_leases().expect("lapse");
        let taker = record(RecordState::Pending, 9);
        assert!(engine
            .claim(b"b", Some(&pending_b), taker.clone())
            .expect("takeover"));
        let done = |key: &[u8], token: u64, held: &[u8]| {
            OutcomeRequest::of(key, &record(RecordState::Completed, token), digest(held))
                .expect("a valid record")
        };
        let written = engine
            .run(Outcomes::run(
                s,
                &[
                    done(b"a", 1, &pending_a),
                    done(b"b", 3, &pending_b),
                    done(b"c", 4, &pending_c),
                ],
            ))
            .expect("the batch runs");
        assert_eq!(written, vec![true, false, true]);

        // A batch of reads, one key twice (they share its row) and one with no record.
        let read = engine
            .run(Reads::run(
                s,
                &[b"c", &b"b"[..], b"zz", b"a", b"c"].map(|key| ReadRequest { key: key.to_vec() }),
            ))
            .expect("the batch runs");
        let completed = |token| Some(record(RecordState::Completed, token));
        assert_eq!(
            read,
            vec![completed(4), Some(taker), None, completed(1), completed(4)]
        );
        drop_schema(&engine, &schema);
    }

    #[test]
    fn a_crowd_claiming_one_key_gets_one_claim() {
        let schema = format!("unit_batched_crowd_{}", std::process::id());
        let Some(engine) = engine(&schema, 4) else {
            return;
        };
        // Distinct keys and one shared key, from many threads at once: the shared key is
        // claimed once, each distinct key once, and every winner's record is its own.
        let winners = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for t in 0..24u64 {
                let (engine, winners) = (&engine, &winners);
                scope.spawn(move || {
                    for round in 0..20u64 {
                        let token = t * 1000 + round;
                        let own = format!("own-{t}-{round}");
                        let mine = record(RecordState::Pending, token);
                        assert!(engine
                            .claim(own.as_bytes(), None, mine.clone())
                            .expect("claim"));
                        assert_eq!(engine.get(own.as_bytes()).expect("read"), Some(mine));
                        let shared = format!("shared-{round}");
                        if engine
                            .claim(shared.as_bytes(), None, record(RecordState::Pending, token))
                            .expect("claim")
                        {
                            winners.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        assert_eq!(winners.into_inner(), 20, "one winner per shared key");
        drop_schema(&engine, &schema);
    }
}

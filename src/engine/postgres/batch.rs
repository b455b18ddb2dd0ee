//! Batching: statements of one kind that callers make while others of their kind are on
//! their way go to the database together, as one statement (one round trip, one commit).
//!
//! Invariants:
//! - a caller that finds fewer than its kind's limit of statements in flight sends its own
//!   statement at once ([`Turn::Alone`]): a lone caller waits for nobody and its statement
//!   is the plain one-row statement;
//! - otherwise it queues its request ([`Turn::Queued`]); queued requests are sent by a task on
//!   the engine's runtime, never by a caller's future, so a caller that is dropped never
//!   strands the others, and a request that was queued is sent even if its caller is gone
//!   (its kind's [`BatchKind::unanswered`] undoes what the caller would have had to);
//! - while the queue holds a request, a statement in flight will drain it: the queue and the
//!   count of statements in flight change only together, under one lock, and whoever ends a
//!   statement in flight with requests queued starts the task that drains them;
//! - a batch holds at most [`MAX_BATCH`] requests and, past its first, at most
//!   [`MAX_BATCH_BYTES`] of their bytes, so a batch's statement costs about what its largest
//!   request's would alone, never a crowd's worth of large records under one I/O timeout; a
//!   batch of one request is sent as that request's own one-row statement;
//! - a batch never holds two requests for the same key (the later one waits for the next
//!   batch), so each request's answer is the one row its key matched; except for a kind
//!   that shares answers ([`BatchKind::SHARES_ANSWERS`]: reads), whose requests for one key
//!   in one batch all get the row its statement read, which lies within each of their calls;
//! - a batch statement is bounded by the store's I/O timeout, like every statement.

use std::future::Future;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::{bounded, Shared};
use crate::error::{Error, StorageError, StorageKind};

/// The most requests one batch statement carries.
const MAX_BATCH: usize = 128;

/// The most bytes (keys and records) the requests of one batch carry, past its first request.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// One kind of statement that can be batched.
pub(crate) trait BatchKind: Send + Sync + Sized + 'static {
    /// What one caller asks, owning its bytes (it waits in a queue).
    type Request: Send + 'static;
    /// What one caller is told.
    type Answer: Send + 'static;

    /// Whether requests for one key may share a batch, each answered with what the statement
    /// found for the key (only for statements that write nothing).
    const SHARES_ANSWERS: bool = false;

    /// The key a request is about.
    fn key(request: &Self::Request) -> &[u8];

    /// The bytes a request carries to the server (its key, by default).
    fn bytes(request: &Self::Request) -> usize {
        Self::key(request).len()
    }

    /// Runs `requests` (distinct keys) as one statement: one answer per request, in order.
    fn run<'a>(
        shared: &'a Shared,
        requests: &'a [Self::Request],
    ) -> impl Future<Output = Result<Vec<Self::Answer>, Error>> + Send + 'a;

    /// Runs one request as its own one-row statement (a lone caller's, or a request of a batch
    /// the server gave up, sent again).
    fn run_one<'a>(
        shared: &'a Shared,
        request: &'a Self::Request,
    ) -> impl Future<Output = Result<Self::Answer, Error>> + Send + 'a;

    /// What is done when a request was answered but its caller had gone meanwhile.
    fn unanswered(_shared: &Arc<Shared>, _request: Self::Request, _answer: Self::Answer) {}
}

/// Requests of one kind waiting for a batch, and how many statements of it are in flight.
pub(crate) struct Batcher<K: BatchKind> {
    queue: Mutex<Queue<K>>,
    /// Statements of this kind in flight before callers start queueing.
    limit: usize,
    /// The engine's runtime, which runs the draining task.
    runtime: tokio::runtime::Handle,
}

struct Queue<K: BatchKind> {
    waiting: Vec<Waiting<K>>,
    in_flight: usize,
}

struct Waiting<K: BatchKind> {
    request: K::Request,
    reply: oneshot::Sender<Result<K::Answer, Error>>,
}

/// A caller's turn: send its own statement now (its request handed back), or wait for a
/// batch's answer.
pub(crate) enum Turn<K: BatchKind> {
    Alone(Alone<K>, K::Request),
    Queued(Queued<K>),
}

/// A statement in flight sent by its own caller; when it ends (or its caller is dropped),
/// the requests queued meanwhile are sent.
pub(crate) struct Alone<K: BatchKind> {
    shared: Arc<Shared>,
    batcher: fn(&Shared) -> &Batcher<K>,
    /// False once the place was given up some other way (see [`Unstarted`]).
    holds_place: bool,
}

/// A request in a queue: its answer comes from the batch that carries it.
pub(crate) struct Queued<K: BatchKind> {
    answer: oneshot::Receiver<Result<K::Answer, Error>>,
}

impl<K: BatchKind> Batcher<K> {
    pub(crate) fn new(limit: usize, runtime: tokio::runtime::Handle) -> Self {
        Self {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                in_flight: 0,
            }),
            limit: limit.max(1),
            runtime,
        }
    }

    /// Whether a request made now would queue (its kind's limit in flight, or others
    /// queued): a hint, which may be stale by the time the request is made.
    pub(crate) fn busy(&self) -> bool {
        let queue = self.queue.lock();
        queue.in_flight >= self.limit || !queue.waiting.is_empty()
    }

    /// The caller's turn for `request`. `batcher` finds this batcher in `shared`.
    pub(crate) fn turn(
        &self,
        shared: &Arc<Shared>,
        batcher: fn(&Shared) -> &Batcher<K>,
        request: K::Request,
    ) -> Turn<K> {
        let mut queue = self.queue.lock();
        if queue.in_flight < self.limit && queue.waiting.is_empty() {
            queue.in_flight += 1;
            return Turn::Alone(
                Alone {
                    shared: Arc::clone(shared),
                    batcher,
                    holds_place: true,
                },
                request,
            );
        }
        let (reply, answer) = oneshot::channel();
        queue.waiting.push(Waiting { request, reply });
        if queue.in_flight < self.limit {
            queue.in_flight += 1;
            drop(queue);
            drain(Arc::clone(shared), batcher);
        }
        Turn::Queued(Queued { answer })
    }

    /// The next batch: queued requests, oldest first, up to [`MAX_BATCH`] of them and (past
    /// the first) [`MAX_BATCH_BYTES`] of their bytes, with distinct keys unless the kind
    /// shares answers (empty when none is queued).
    fn next_batch(&self) -> Vec<Waiting<K>> {
        let mut queue = self.queue.lock();
        let mut batch: Vec<Waiting<K>> = Vec::new();
        let mut bytes = 0usize;
        let mut left = Vec::new();
        for waiting in queue.waiting.drain(..) {
            let size = K::bytes(&waiting.request);
            let full = !batch.is_empty()
                && (batch.len() >= MAX_BATCH || bytes.saturating_add(size) > MAX_BATCH_BYTES);
            let taken = full
                || (!K::SHARES_ANSWERS
                    && batch
                        .iter()
                        .any(|b| K::key(&b.request) == K::key(&waiting.request)));
            if taken {
                left.push(waiting);
            } else {
                bytes = bytes.saturating_add(size);
                batch.push(waiting);
            }
        }
        queue.waiting = left;
        batch
    }
}

impl<K: BatchKind> Alone<K> {
    /// Sends `request` as its own statement, in a task of the engine's runtime that holds
    /// this place until the statement ends: a caller dropped meanwhile never stops it
    /// half-way, and what it wrote for a caller that has gone is handled as a batch's
    /// unanswered request is ([`BatchKind::unanswered`]). Bounded by the I/O timeout.
    pub(crate) async fn send(self, request: K::Request) -> Result<K::Answer, Error> {
        let runtime = (self.batcher)(&self.shared).runtime.clone();
        let shared = Arc::clone(&self.shared);
        let (reply, answer) = oneshot::channel();
        let place = self;
        // Boxed: the statement's future is kilobytes, and a task's cell would copy it in
        // and out again on every spawn.
        runtime.spawn(Box::pin(async move {
            let _place = place;
            answer_one::<K>(&shared, request, reply).await;
        }));
        answer.await.unwrap_or_else(|_| Err(closed()))
    }
}

/// Runs `request` as its own statement, bounded by the I/O timeout, and gives `reply` the
/// answer; if its caller has gone, the answer is handled as [`BatchKind::unanswered`] says.
async fn answer_one<K: BatchKind>(
    shared: &Arc<Shared>,
    request: K::Request,
    reply: oneshot::Sender<Result<K::Answer, Error>>,
) {
    let answer = bounded(shared.io_timeout, K::run_one(shared, &request)).await;
    if let Err(Ok(answer)) = reply.send(answer) {
        K::unanswered(shared, request, answer);
    }
}

impl<K: BatchKind> Drop for Alone<K> {
    fn drop(&mut self) {
        if !self.holds_place {
            return;
        }
        let batcher = (self.batcher)(&self.shared);
        let mut queue = batcher.queue.lock();
        if queue.waiting.is_empty() {
            queue.in_flight -= 1;
        } else {
            // This statement's place in flight passes to the task that drains the queue.
            drop(queue);
            drain(Arc::clone(&self.shared), self.batcher);
        }
    }
}

impl<K: BatchKind> Queued<K> {
    /// The answer of the batch that carried the request.
    ///
    /// # Errors
    /// The batch statement's error (every request of a failed batch gets it: none of them
    /// is written, or, on a lost connection, whether they were is unknown).
    pub(crate) async fn answer(self) -> Result<K::Answer, Error> {
        // Err: the engine's runtime shut down with the request queued.
        self.answer.await.unwrap_or_else(|_| Err(closed()))
    }
}

/// The error of a request whose statement never ran: the engine's runtime shut down first.
pub(crate) fn closed() -> Error {
    Error::Storage(StorageError::of_kind(
        std::io::Error::other("the store closed before the statement was sent"),
        None,
        StorageKind::Connection,
    ))
}

/// Starts the task that sends the queued requests, batch after batch, until none is left. It
/// holds the place in flight its caller has taken for it, as an [`Alone`]: however the task
/// ends (the queue empty, or a panic), dropping that place hands it on as any statement's end
/// does.
fn drain<K: BatchKind>(shared: Arc<Shared>, batcher: fn(&Shared) -> &Batcher<K>) {
    let runtime = batcher(&shared).runtime.clone();
    let mut place = Unstarted(Some(Alone {
        shared: Arc::clone(&shared),
        batcher,
        holds_place: true,
    }));
    runtime.spawn(async move {
        let _place = place.0.take();
        loop {
            let mut batch = batcher(&shared).next_batch();
            if batch.len() <= 1 {
                // One request goes as a lone caller's does, as its own one-row statement
                // (so an outcome the server gives up for a row lock is sent again).
                let Some(only) = batch.pop() else { return };
                answer_one::<K>(&shared, only.request, only.reply).await;
                continue;
            }
            let (requests, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|w| (w.request, w.reply)).unzip();
            match bounded(shared.io_timeout, K::run(&shared, &requests)).await {
                Ok(answers) => {
                    for ((request, reply), answer) in requests.into_iter().zip(replies).zip(answers)
                    {
                        if let Err(Ok(answer)) = reply.send(Ok(answer)) {
                            K::unanswered(&shared, request, answer);
                        }
                    }
                }
                // The server gave the whole batch up (a row lock another transaction held, or
                // the statement timeout; nothing of it written): only the callers whose own
                // rows were the cause should hear it, so each request goes again as its own
                // statement, side by side.
                Err(e) if rolled_back(&e) => {
                    for (request, reply) in requests.into_iter().zip(replies) {
                        let shared = Arc::clone(&shared);
                        tokio::spawn(async move { answer_one::<K>(&shared, request, reply).await });
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(shared_error(&e)));
                    }
                }
            }
        }
    });
}

/// Whether the server refused the whole statement before it committed anything: a lock wait
/// that ran out (`Busy`) or the server's statement timeout. Not a timeout of the client's own
/// (the statement may still commit) nor a lost connection (it may have committed).
fn rolled_back(e: &Error) -> bool {
    let Error::Storage(s) = e else { return false };
    match s.kind() {
        StorageKind::Busy => true,
        StorageKind::Timeout => s
            .get_ref()
            .downcast_ref::<tokio_postgres::Error>()
            .and_then(tokio_postgres::Error::code)
            .is_some_and(|code| *code == tokio_postgres::error::SqlState::QUERY_CANCELED),
        _ => false,
    }
}

/// The place in flight of a draining task that has not started. If the task never starts
/// (the engine's runtime has shut down), the queued requests are dropped, so their callers
/// learn the store closed, and the place is given up without starting another task.
struct Unstarted<K: BatchKind>(Option<Alone<K>>);

impl<K: BatchKind> Drop for Unstarted<K> {
    fn drop(&mut self) {
        if let Some(mut place) = self.0.take() {
            let batcher = (place.batcher)(&place.shared);
            let dropped = {
                let mut queue = batcher.queue.lock();
                queue.in_flight -= 1;
                std::mem::take(&mut queue.waiting)
            };
            drop(dropped);
            place.holds_place = false;
        }
    }
}

/// `e` once more, for another request of the batch it failed.
fn shared_error(e: &Error) -> Error {
    match e {
        Error::Storage(storage) => Error::Storage(storage.clone()),
        other => Error::Storage(StorageError::of_kind(
            std::io::Error::other(other.to_string()),
            None,
            StorageKind::Database,
        )),
    }
}

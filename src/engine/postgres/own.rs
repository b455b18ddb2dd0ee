//! Own connections: connections a synchronous caller drives on its own thread.
//!
//! A statement on a pooled connection crosses threads twice: the caller hands it to a worker
//! of the engine's runtime, which writes it, is woken by the answer and wakes the caller. A
//! synchronous caller that sends a claim or an outcome alone (no other of its kind queued
//! or at its limit in flight, `batch::Turn::Alone`) sends it instead on an own connection, whose socket
//! belongs to a current-thread runtime of that connection: the caller's thread drives it
//! (`block_on`), writes the statement and sleeps in the kernel until the answer comes, and no
//! other thread is woken.
//!
//! Invariants:
//! - an own connection serves one operation at a time, on a thread outside any runtime: it is
//!   taken from the idle set for that operation, and only that operation's `block_on` of its
//!   runtime drives it;
//! - it goes back to the idle set unless it has ended (a connection error, or the server
//!   closed it: then it is dropped) or its last statement was cut off by the I/O timeout.
//!   Such a statement stays on it, as on a pooled connection: a thread of its own drives the
//!   connection until an empty statement sent behind the cut-off one is answered (every
//!   earlier answer then read), so the server can run it to its end and send its answer
//!   whatever its size, its backend stays counted within the budget meanwhile, and no later
//!   call's statement waits behind it; then it is idle again (or dropped, if it ended or the
//!   engine closed: closing stops every such thread);
//! - an idle connection is looked at before it is used: one the server ended while it sat
//!   idle (its socket says so) is dropped, not handed out;
//! - at most `max` exist (a share of the pool size, taken from the pool, so the engine's
//!   sessions stay within `pool_size + 3`); with none idle and `max` open, or when a new one
//!   cannot be made, the caller takes the pooled path, which is always there;
//! - a statement is never sent twice: once an own connection is taken, the operation's answer
//!   or error is the caller's, whatever happens to the connection;
//! - dropping an own connection never blocks (its runtime shuts down in the background), so
//!   the engine may be dropped anywhere, inside a runtime too.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_postgres::{Client, Config, NoTls, Statement};

use super::{bounded, pg_error, storage};
use crate::error::{Error, StorageKind};

/// A connection's future: it moves the connection's messages while it is polled.
type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

/// How long no new own connection is tried after one could not be made (the pooled path
/// serves meanwhile), so a server that is down costs a call one failed connect, not two.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The share of the pool size kept for own connections: a quarter (16 of the default 64).
pub(crate) fn share_of(pool_size: usize) -> usize {
    pool_size / 4
}

/// A connection of its own runtime, with the statements prepared on it.
pub(crate) struct OwnConnection {
    /// Invariant: `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    /// Whether a statement is being driven: still set when the operation ends, the statement
    /// was cut off (its answer is yet to be read).
    busy: AtomicBool,
    /// `None` once the connection has ended.
    driver: Mutex<Option<Driver>>,
    /// Whether the connection has ended (an error, or the server closed it).
    ended: AtomicBool,
    /// Statements prepared on this connection, by the address of their text (the engine's
    /// statements live as long as the engine, and an own connection no longer).
    prepared: Mutex<Vec<(usize, Statement)>>,
}

impl OwnConnection {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Invariant: only Drop takes the runtime.
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the connection")
    }

    /// Runs `operation` to its end on this thread, driving this connection meanwhile.
    pub(crate) fn block_on<T>(&self, operation: impl Future<Output = T>) -> T {
        self.runtime().block_on(operation)
    }

    /// `f`'s output, this connection's messages moved while it runs. If this future is
    /// dropped first (the I/O timeout), the statement stays on the connection, as a pooled
    /// connection's does: the server runs it to its end, and its answer is read and dropped
    /// the next time the connection is driven, before the answers of later statements.
    ///
    /// # Errors
    /// `f`'s own; [`StorageKind::Connection`] if the connection ended first.
    pub(crate) async fn drive<T>(
        &self,
        f: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        if self.ended.load(Ordering::Relaxed) {
            return Err(lost());
        }
        self.busy.store(true, Ordering::Relaxed);
        let mut f = std::pin::pin!(f);
        let done = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            let ended = self.poll_driver(cx);
            // The connection may have just handed `f` its answer, even as it ended.
            match f.as_mut().poll(cx) {
                Poll::Ready(out) => Poll::Ready(Some(out)),
                Poll::Pending if ended => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        self.busy.store(false, Ordering::Relaxed);
        done.unwrap_or_else(|| Err(lost()))
    }

    /// Moves the connection's messages; true once it has ended (its driver is then dropped,
    /// never polled again).
    fn poll_driver(&self, cx: &mut std::task::Context<'_>) -> bool {
        let mut driver = self.driver.lock();
        let Some(running) = driver.as_mut() else {
            return true;
        };
        if running.as_mut().poll(cx).is_pending() {
            return false;
        }
        *driver = None;
        self.ended.store(true, Ordering::Relaxed);
        true
    }

    /// `sql` prepared on this connection (once; its statement is kept).
    pub(crate) async fn statement(&self, sql: &str) -> Result<Statement, Error> {
        let id = sql.as_ptr() as usize;
        if let Some((_, s)) = self.prepared.lock().iter().find(|(i, _)| *i == id) {
            return Ok(s.clone());
        }
        let statement = self
            .drive(async { self.client.prepare(sql).await.map_err(pg_error) })
            .await?;
        self.prepared.lock().push((id, statement.clone()));
        Ok(statement)
    }

    /// The client to send statements with, from inside [`OwnConnection::drive`].
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Whether the connection can serve another operation: not ended, also not by the server
    /// while it sat idle (one turn of its runtime reads what its socket received).
    fn usable(&self) -> bool {
        if self.ended.load(Ordering::Relaxed) {
            return false;
        }
        let ended = self.runtime().block_on(async {
            tokio::task::yield_now().await;
            std::future::poll_fn(|cx| Poll::Ready(self.poll_driver(cx))).await
        });
        !ended
    }

    /// Drives a cut-off connection until every answer on its way has been read (an empty
    /// statement sent behind them is answered: answers come in order), or it ends, or the
    /// engine closes: whether it can serve again.
    fn drain(&self, inner: &Inner) -> bool {
        self.runtime().block_on(async {
            let closing = inner.closing.notified();
            let mut closing = std::pin::pin!(closing);
            let marker = self.drive(async { self.client.simple_query("").await.map_err(pg_error) });
            let mut marker = std::pin::pin!(marker);
            std::future::poll_fn(|cx| {
                if inner.closed.load(Ordering::Relaxed) || closing.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                marker.as_mut().poll(cx).map(|answered| answered.is_ok())
            })
            .await
        })
    }
}

impl Drop for OwnConnection {
    fn drop(&mut self) {
        // Dropping the driver closes the socket, which ends the session.
        drop(self.driver.get_mut().take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The engine's own connections, idle and counted.
pub(crate) struct OwnConnections {
    inner: Arc<Inner>,
    max: usize,
    config: Config,
    connect_timeout: Duration,
}

/// What the engine's calls and the threads that drain cut-off connections share.
struct Inner {
    state: Mutex<State>,
    /// Set (and `closing` notified) when the engine closes: draining threads stop.
    closed: AtomicBool,
    closing: tokio::sync::Notify,
}

struct State {
    idle: Vec<OwnConnection>,
    /// Own connections that exist: idle, in use, or draining.
    open: usize,
    /// No new one is made before this (one could not be made lately).
    not_before: Option<Instant>,
}

impl OwnConnections {
    pub(crate) fn new(max: usize, config: Config, connect_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    idle: Vec::new(),
                    open: 0,
                    not_before: None,
                }),
                closed: AtomicBool::new(false),
                closing: tokio::sync::Notify::new(),
            }),
            max,
            config,
            connect_timeout,
        }
    }

    /// An own connection for one operation on this thread, given back when the returned
    /// guard drops; or `None`: inside a runtime (whose thread must not block), none idle with
    /// `max` open, or none could be made.
    pub(crate) fn take(&self) -> Option<Taken<'_>> {
        self.take_connection().map(|own| Taken {
            set: self,
            own: Some(own),
        })
    }

    fn take_connection(&self) -> Option<OwnConnection> {
        if self.max == 0 || tokio::runtime::Handle::try_current().is_ok() {
            return None;
        }
        loop {
            let mut state = self.inner.state.lock();
            if let Some(idle) = state.idle.pop() {
                drop(state);
                if idle.usable() {
                    return Some(idle);
                }
                self.inner.state.lock().open -= 1;
                continue;
            }
            if state.open >= self.max || state.not_before.is_some_and(|t| Instant::now() < t) {
                return None;
            }
            state.open += 1;
            drop(state);
            return match self.connect() {
                Ok(made) => Some(made),
                Err(e) => {
                    tracing::debug!(error = %e, "no own connection; using the pool");
                    let mut state = self.inner.state.lock();
                    state.open -= 1;
                    state.not_before = Some(Instant::now() + RETRY_AFTER);
                    None
                }
            };
        }
    }

    /// Takes `own` back after an operation: idle again; if its last statement was cut off,
    /// first drained on a thread of its own (so the server can finish sending its answer,
    /// and no later statement waits behind it); dropped if it ended.
    fn give_back(&self, own: OwnConnection) {
        if own.busy.load(Ordering::Relaxed) && !own.ended.load(Ordering::Relaxed) {
            let inner = Arc::clone(&self.inner);
            let (sent, kept) = std::sync::mpsc::channel();
            let drainer = std::thread::Builder::new()
                .name("idemstore-postgres-drain".into())
                .spawn(move || {
                    let Ok(own) = kept.recv() else { return };
                    let own: OwnConnection = own;
                    let whole = own.drain(&inner);
                    own.busy.store(false, Ordering::Relaxed);
                    inner.put_back(own, whole);
                });
            match drainer {
                Ok(_) => {
                    // The thread waits for it; were it gone, the connection comes back here.
                    if let Err(unsent) = sent.send(own) {
                        self.inner.put_back(unsent.0, false);
                    }
                }
                // No thread: dropped, which ends its session once its statement has.
                Err(e) => {
                    tracing::debug!(error = %e, "no thread to drain an own connection");
                    self.inner.put_back(own, false);
                }
            }
            return;
        }
        let whole = !own.ended.load(Ordering::Relaxed);
        self.inner.put_back(own, whole);
    }

    /// How many own connections exist, idle, in use or draining.
    pub(crate) fn open(&self) -> usize {
        self.inner.state.lock().open
    }

    /// A new own connection, connected on its own runtime.
    fn connect(&self) -> Result<OwnConnection, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| storage(e, StorageKind::Io))?;
        let config = self.config.clone();
        let (client, connection) = runtime.block_on(bounded(self.connect_timeout, async {
            config.connect(NoTls).await.map_err(pg_error)
        }))?;
        Ok(OwnConnection {
            runtime: Some(runtime),
            client,
            busy: AtomicBool::new(false),
            driver: Mutex::new(Some(Box::pin(connection))),
            ended: AtomicBool::new(false),
            prepared: Mutex::new(Vec::new()),
        })
    }
}

impl Drop for OwnConnections {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.closing.notify_waiters();
    }
}

impl Inner {
    /// Puts `own` back in the idle set if `whole` and the engine is open; drops it (which
    /// ends its session) otherwise.
    fn put_back(&self, own: OwnConnection, whole: bool) {
        let mut state = self.state.lock();
        if whole && !self.closed.load(Ordering::Relaxed) {
            state.idle.push(own);
            return;
        }
        state.open -= 1;
        drop(state);
        drop(own);
    }
}

/// An own connection taken for one operation; given back when dropped.
pub(crate) struct Taken<'a> {
    set: &'a OwnConnections,
    /// Invariant: `Some` until dropped.
    own: Option<OwnConnection>,
}

impl std::ops::Deref for Taken<'_> {
    type Target = OwnConnection;

    fn deref(&self) -> &OwnConnection {
        // Invariant: only Drop takes the connection.
        self.own
            .as_ref()
            .expect("a taken connection is held until dropped")
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(own) = self.own.take() {
            self.set.give_back(own);
        }
    }
}

/// The error of a statement whose own connection ended, or was cut off before.
fn lost() -> Error {
    storage(
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "the connection ended before the statement's answer came",
        ),
        StorageKind::Connection,
    )
}

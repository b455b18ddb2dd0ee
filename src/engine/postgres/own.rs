//! Own connections: connections a synchronous caller drives on its own thread.
//!
//! A statement on a pooled connection crosses threads twice: the caller hands it to a worker
//! of the engine's runtime, which writes it, is woken by the answer and wakes the caller. A
//! synchronous caller that sends a claim, an outcome or a read alone (no other of its kind
//! in flight, `batch::Turn::Alone`) sends it instead on an own connection, whose socket
//! belongs to a current-thread runtime of that connection: the caller's thread drives it
//! (`block_on`), writes the statement and sleeps in the kernel until the answer comes, and no
//! other thread is woken.
//!
//! Invariants:
//! - an own connection serves one operation at a time, on a thread outside any runtime: it is
//!   taken from the idle set for that operation, and only that operation's `block_on` of its
//!   runtime drives it;
//! - it goes back to the idle set only whole: its connection future still there (no statement
//!   cut off half-way by a timeout) and not ended (no connection error); otherwise it is
//!   dropped, which ends its session;
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
    /// `None` while a statement drives it, and for good once a statement was cut off.
    driver: Mutex<Option<Driver>>,
    /// Whether the connection ended (an error, or the server closed it).
    ended: std::sync::atomic::AtomicBool,
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

    /// `f`'s output, this connection's messages moved while it runs.
    ///
    /// # Errors
    /// `f`'s own; [`StorageKind::Connection`] if the connection ended first, or was left
    /// unusable by an earlier statement cut off half-way.
    pub(crate) async fn drive<T>(
        &self,
        f: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let mut driver = self.driver.lock().take().ok_or_else(lost)?;
        let mut f = std::pin::pin!(f);
        let done = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = f.as_mut().poll(cx) {
                return Poll::Ready(Some(out));
            }
            if driver.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            // The connection may have just handed `f` its answer.
            f.as_mut().poll(cx).map(Some)
        })
        .await;
        match done {
            Some(out) => {
                *self.driver.lock() = Some(driver);
                out
            }
            None => {
                self.ended.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(lost())
            }
        }
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

    /// Whether the connection can serve another operation: whole, and not ended by the
    /// server while it sat idle (the socket is read without waiting).
    fn usable(&self) -> bool {
        if self.ended.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut guard = self.driver.lock();
        let Some(driver) = guard.as_mut() else {
            return false;
        };
        let ended = self.runtime().block_on(async {
            // One turn of the runtime first, so what the socket received is seen.
            tokio::task::yield_now().await;
            std::future::poll_fn(|cx| Poll::Ready(driver.as_mut().poll(cx).is_ready())).await
        });
        !ended
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
    state: Mutex<State>,
    max: usize,
    config: Config,
    connect_timeout: Duration,
}

struct State {
    idle: Vec<OwnConnection>,
    /// Own connections that exist, idle or in use.
    open: usize,
    /// No new one is made before this (one could not be made lately).
    not_before: Option<Instant>,
}

impl OwnConnections {
    pub(crate) fn new(max: usize, config: Config, connect_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                not_before: None,
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
            let mut state = self.state.lock();
            if let Some(idle) = state.idle.pop() {
                drop(state);
                if idle.usable() {
                    return Some(idle);
                }
                self.state.lock().open -= 1;
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
                    let mut state = self.state.lock();
                    state.open -= 1;
                    state.not_before = Some(Instant::now() + RETRY_AFTER);
                    None
                }
            };
        }
    }

    /// Takes `own` back after an operation: kept if whole, dropped (its session ended)
    /// otherwise.
    fn give_back(&self, own: OwnConnection) {
        let whole =
            !own.ended.load(std::sync::atomic::Ordering::Relaxed) && own.driver.lock().is_some();
        let mut state = self.state.lock();
        if whole {
            state.idle.push(own);
        } else {
            state.open -= 1;
            drop(state);
            drop(own);
        }
    }

    /// How many own connections exist, idle or in use.
    pub(crate) fn open(&self) -> usize {
        self.state.lock().open
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
            driver: Mutex::new(Some(Box::pin(connection))),
            ended: std::sync::atomic::AtomicBool::new(false),
            prepared: Mutex::new(Vec::new()),
        })
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

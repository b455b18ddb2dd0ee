//! Waking waiters in this process when a holder in another one finishes: LISTEN/NOTIFY.
//!
//! Invariants: a holder notifies only when a waiter marked its record (the `waiters` flag), so
//! the common path sends nothing. A waiter registers its key's tag *before* it marks the
//! record and looks at it again, so a notification sent between its look and its wait is not
//! lost (it bumps the tag's generation past the one the waiter holds). Notifications travel
//! on one dedicated connection per engine; while it is down (and after every reconnect, when
//! all waiters are woken to look again) waiters fall back to polling every [`POLL`], and every
//! wait is bounded by the caller's budget. A tag is a hash of (scope, key): collisions only
//! wake a waiter early, to look again.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::AsyncMessage;

/// How long a waiter waits for a notification before it looks at the record again.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// A key's tag in notifications.
pub(crate) type Tag = [u8; 16];

/// The tag of `key` in `scope`.
pub(crate) fn tag(scope: &str, key: &[u8]) -> Tag {
    let mut h = blake3::Hasher::new();
    h.update(&(scope.len() as u64).to_le_bytes());
    h.update(scope.as_bytes());
    h.update(key);
    let mut tag = [0; 16];
    tag.copy_from_slice(&h.finalize().as_bytes()[..16]);
    tag
}

/// Hex text of a tag, as a notification's payload.
pub(crate) fn tag_text(tag: &Tag) -> String {
    tag.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_tag(text: &str) -> Option<Tag> {
    let mut tag = [0; 16];
    if text.len() != 32 {
        return None;
    }
    for (i, byte) in tag.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(tag)
}

/// The waiters of this process, by tag.
#[derive(Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct HubState {
    generation: u64,
    /// Tags someone waits on: (waiters, generation of the last notification).
    waiting: HashMap<Tag, (usize, u64)>,
}

/// One registered waiter; unregisters when dropped.
pub(crate) struct Waiter<'h> {
    hub: &'h Hub,
    tag: Tag,
    since: u64,
}

impl Hub {
    /// Registers a waiter for `tag` from now on.
    pub(crate) fn register(&self, tag: Tag) -> Waiter<'_> {
        let mut state = self.state.lock();
        let since = state.generation;
        state.waiting.entry(tag).or_insert((0, 0)).0 += 1;
        Waiter {
            hub: self,
            tag,
            since,
        }
    }

    fn notify(&self, tag: Option<Tag>) {
        let mut state = self.state.lock();
        state.generation += 1;
        let generation = state.generation;
        match tag {
            Some(tag) => match state.waiting.get_mut(&tag) {
                Some(entry) => entry.1 = generation,
                None => return,
            },
            // Everyone looks again (after a reconnect, notifications may have been missed).
            None => state.waiting.values_mut().for_each(|e| e.1 = generation),
        }
        self.changed.notify_waiters();
    }
}

impl Waiter<'_> {
    fn notified(&self) -> bool {
        self.hub
            .state
            .lock()
            .waiting
            .get(&self.tag)
            .is_some_and(|e| e.1 > self.since)
    }

    /// Waits until a notification for this waiter's tag arrives or `max` passes.
    pub(crate) async fn wait_async(&self, max: Duration) {
        let waited = tokio::time::timeout(max, async {
            loop {
                let changed = self.hub.changed.notified();
                tokio::pin!(changed);
                // Registered before looking, so a wake-up in between is not lost.
                changed.as_mut().enable();
                if self.notified() {
                    return;
                }
                changed.await;
            }
        });
        let _ = waited.await;
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut state = self.hub.state.lock();
        if let Some(entry) = state.waiting.get_mut(&self.tag) {
            entry.0 -= 1;
            if entry.0 == 0 {
                state.waiting.remove(&self.tag);
            }
        }
    }
}

/// Listens on `channel` for as long as the engine lives, reconnecting after a failure.
pub(crate) async fn listen_forever(config: tokio_postgres::Config, channel: String, hub: Arc<Hub>) {
    loop {
        if let Err(e) = listen_once(&config, &channel, &hub).await {
            tracing::debug!(error = %e, "idemstore notification connection lost; waiters poll");
        }
        hub.notify(None);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    hub: &Hub,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let listen = format!("LISTEN \"{channel}\"");
    let subscribe = client.batch_execute(&listen);
    tokio::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            done = &mut subscribe, if !subscribed => {
                done?;
                subscribed = true;
                // Notifications before LISTEN took effect are lost: everyone looks again.
                hub.notify(None);
            }
            message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                Some(Ok(AsyncMessage::Notification(n))) => hub.notify(parse_tag(n.payload())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_through_text() {
        let t = tag("tenant", b"key");
        assert_eq!(parse_tag(&tag_text(&t)), Some(t));
        assert_ne!(tag("tenant", b"key"), tag("tenan", b"tkey"));
        assert_eq!(parse_tag("zz"), None);
    }

    #[test]
    fn a_notification_after_registering_is_not_lost() {
        let hub = Hub::default();
        let t = tag("", b"k");
        let waiter = hub.register(t);
        hub.notify(Some(t)); // arrives before the wait begins
        assert!(waiter.notified());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Returns at once (a lost notification would wait out the whole hour).
        runtime.block_on(waiter.wait_async(Duration::from_secs(3600)));
        drop(waiter);
        assert!(hub.state.lock().waiting.is_empty());
    }
}

//! What the commands print, as text for people or JSON for scripts.
//!
//! Invariants: keys print as text when they are printable UTF-8, else as `hex:` and their
//! bytes (which `--hex` reads back); times print as seconds since the Unix epoch in JSON and
//! as ages in text; an outcome prints as JSON only when it was stored as JSON.

use std::io::{self, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idemstore::{Error, RecordDetail, RecordInfo, RecordState, StoredOutcome};
use serde_json::{json, Value};

/// One record as `ls` lists it.
pub struct Listed {
    pub key: Vec<u8>,
    pub info: RecordInfo,
}

/// Counts over every live record, for `stats`.
#[derive(Default)]
pub struct Summary {
    pub pending: u64,
    pub completed: u64,
    pub failed: u64,
    pub retryable: u64,
    pub oldest_pending: Option<(Vec<u8>, SystemTime)>,
    pub outcome_bytes: u64,
    pub last_expiry: Option<SystemTime>,
    pub disk_bytes: Option<u64>,
    /// Records that could not be read (corrupt), counted, not fatal.
    pub unreadable: u64,
}

impl Summary {
    pub fn of(
        records: Box<dyn Iterator<Item = Result<Listed, Error>> + '_>,
        disk_bytes: Option<u64>,
    ) -> Summary {
        let mut s = Summary {
            disk_bytes,
            ..Summary::default()
        };
        for item in records {
            let Ok(Listed { key, info }) = item else {
                s.unreadable += 1;
                continue;
            };
            match info.state {
                RecordState::Pending => {
                    s.pending += 1;
                    if s.oldest_pending
                        .as_ref()
                        .is_none_or(|(_, t)| info.created_at < *t)
                    {
                        s.oldest_pending = Some((key, info.created_at));
                    }
                }
                RecordState::Completed => s.completed += 1,
                RecordState::FailedPermanent => s.failed += 1,
                RecordState::FailedRetryable => s.retryable += 1,
            }
            s.outcome_bytes += info.outcome_bytes as u64;
            if s.last_expiry.is_none_or(|t| info.expires_at > t) {
                s.last_expiry = Some(info.expires_at);
            }
        }
        s
    }
}

/// A key for people: its text, or `hex:` and its bytes.
pub fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => text.to_owned(),
        _ => {
            let mut s = String::from("hex:");
            for b in key {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    }
}

fn state_name(state: RecordState) -> &'static str {
    match state {
        RecordState::Pending => "pending",
        RecordState::Completed => "completed",
        RecordState::FailedPermanent => "failed",
        RecordState::FailedRetryable => "retryable",
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

/// How long ago `t` was (or, negative, how far ahead), for people.
fn age(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(ago) => format!("{} ago", short(ago)),
        Err(ahead) => format!("in {}", short(ahead.duration())),
    }
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn info_json(key: &[u8], info: &RecordInfo) -> Value {
    json!({
        "key": key_text(key),
        "state": state_name(info.state),
        "attempts": info.attempts,
        "created_at": unix(info.created_at),
        "updated_at": unix(info.updated_at),
        "expires_at": unix(info.expires_at),
        "claim": format!("{}.{}", info.claim.epoch, info.claim.sequence),
        "fingerprint": info.fingerprint.map(|f| format!("{f:?}")),
        "outcome_bytes": info.outcome_bytes,
    })
}

pub fn print_listed(out: &mut impl Write, item: &Listed, json: bool) -> io::Result<()> {
    let info = &item.info;
    if json {
        return writeln!(out, "{}", info_json(&item.key, info));
    }
    writeln!(
        out,
        "{}\t{}\tattempts={}\tcreated {}\texpires {}",
        key_text(&item.key),
        state_name(info.state),
        info.attempts,
        age(info.created_at),
        age(info.expires_at),
    )
}

pub fn print_summary(out: &mut impl Write, s: &Summary, json: bool) -> io::Result<()> {
    if json {
        let v = json!({
            "pending": s.pending,
            "completed": s.completed,
            "failed": s.failed,
            "retryable": s.retryable,
            "oldest_pending": s.oldest_pending.as_ref().map(|(k, t)| json!({
                "key": key_text(k), "created_at": unix(*t)
            })),
            "outcome_bytes": s.outcome_bytes,
            "disk_bytes": s.disk_bytes,
            "last_expiry": s.last_expiry.map(unix),
            "unreadable": s.unreadable,
        });
        return writeln!(out, "{v}");
    }
    writeln!(
        out,
        "records: {} pending, {} completed, {} failed, {} retryable",
        s.pending, s.completed, s.failed, s.retryable
    )?;
    match &s.oldest_pending {
        Some((key, t)) => writeln!(
            out,
            "oldest pending: {} (created {})",
            key_text(key),
            age(*t)
        )?,
        None => writeln!(out, "oldest pending: none")?,
    }
    writeln!(out, "outcome bytes: {}", s.outcome_bytes)?;
    match s.disk_bytes {
        Some(b) => writeln!(out, "storage bytes: {b}")?,
        None => writeln!(out, "storage bytes: unknown")?,
    }
    match s.last_expiry {
        Some(t) => writeln!(out, "last expiry: {}", age(t))?,
        None => writeln!(out, "last expiry: none")?,
    }
    if s.unreadable > 0 {
        writeln!(out, "unreadable records: {} (see `ls`)", s.unreadable)?;
    }
    Ok(())
}

/// The first bytes of `bytes` in hex, for outcomes that are not JSON.
fn preview(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().take(32).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 32 {
        s.push('…');
    }
    s
}

fn outcome_json(outcome: &StoredOutcome) -> Value {
    match outcome {
        StoredOutcome::None => json!({"kind": "none"}),
        StoredOutcome::Encoded { codec, bytes } => match outcome.to_json() {
            Some(value) => json!({"kind": "stored", "codec": "json", "value": value}),
            None => json!({
                "kind": "stored",
                "codec": format!("{codec:?}").to_lowercase(),
                "bytes": bytes.len(),
                "hex_preview": preview(bytes),
            }),
        },
        StoredOutcome::TooLarge => json!({"kind": "too_large"}),
        StoredOutcome::NotEncodable => json!({"kind": "not_encodable"}),
        _ => json!({"kind": "unknown"}),
    }
}

pub fn print_detail(
    out: &mut impl Write,
    key: &[u8],
    d: &RecordDetail,
    json: bool,
) -> io::Result<()> {
    if json {
        let mut v = info_json(key, &d.info);
        v["expired"] = json!(d.expired);
        v["life"] = json!(format!("{}.{}", d.life.epoch, d.life.sequence));
        v["outcome"] = outcome_json(&d.outcome);
        v["steps"] = d
            .steps
            .iter()
            .map(|s| json!({"index": s.index, "name": s.name, "outcome_bytes": s.outcome_bytes}))
            .collect();
        return writeln!(out, "{v}");
    }
    let i = &d.info;
    writeln!(out, "key:         {}", key_text(key))?;
    let expired = if d.expired { " (expired)" } else { "" };
    writeln!(out, "state:       {}{expired}", state_name(i.state))?;
    writeln!(out, "attempts:    {}", i.attempts)?;
    writeln!(out, "created:     {}", age(i.created_at))?;
    writeln!(out, "updated:     {}", age(i.updated_at))?;
    writeln!(out, "expires:     {}", age(i.expires_at))?;
    writeln!(out, "claim token: {}.{}", i.claim.epoch, i.claim.sequence)?;
    writeln!(out, "life:        {}.{}", d.life.epoch, d.life.sequence)?;
    match &i.fingerprint {
        Some(f) => writeln!(out, "fingerprint: {f:?}")?,
        None => writeln!(out, "fingerprint: none")?,
    }
    match outcome_json(&d.outcome) {
        v if v.get("value").is_some() => writeln!(out, "outcome:     {}", v["value"])?,
        v if v.get("bytes").is_some() => writeln!(
            out,
            "outcome:     {} bytes, {} ({})",
            v["bytes"],
            v["codec"].as_str().unwrap_or("?"),
            v["hex_preview"].as_str().unwrap_or("")
        )?,
        v => writeln!(out, "outcome:     {}", v["kind"].as_str().unwrap_or("?"))?,
    }
    if d.steps.is_empty() {
        writeln!(out, "steps:       none")?;
    }
    for s in &d.steps {
        writeln!(
            out,
            "step {}:      {} ({} bytes)",
            s.index, s.name, s.outcome_bytes
        )?;
    }
    Ok(())
}

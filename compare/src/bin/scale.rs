//! idemstore at scale: 1M completed records with 64-byte results.
//!
//! For each cache size (each in a child process, so peak RSS is its own): fill time, on-disk
//! size, peak RSS, reopen (recovery) time, a sweep pass with nothing expired, a sweep of 100k
//! expired records, and the latency of `execute_once` replays made by a thread running
//! alongside that sweep.
//!
//! Run: `cargo run --release -p idemstore-compare --bin scale [-- --records 1000000]`

use idemstore::{Durability, ManualClock, Store};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const START_MS: u64 = 1_780_000_000_000;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let records: u64 = arg("--records").map_or(1_000_000, |v| v.parse().expect("--records N"));
    if let Some(cache_mb) = arg("--child-cache-mb") {
        child(records, cache_mb.parse().expect("cache MB"));
        return;
    }
    if let Some(cache_mb) = arg("--raw-sled-cache-mb") {
        raw_sled_child(records, cache_mb.parse().expect("cache MB"));
        return;
    }
    println!("| cache | records | fill | on disk | peak RSS | reopen | sweep, nothing expired | sweep of the expired tenth | replay latency during that sweep, p99.9 / max |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for cache_mb in [64u64, 8] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--records",
                &records.to_string(),
                "--child-cache-mb",
                &cache_mb.to_string(),
            ])
            .output()
            .expect("run child");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--records",
            &records.to_string(),
            "--raw-sled-cache-mb",
            "64",
        ])
        .output()
        .expect("run child");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    let m = e.metadata().unwrap();
                    if m.is_dir() {
                        dir_size(&e.path())
                    } else {
                        m.len()
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

fn open(path: &Path, cache_mb: u64, clock: &ManualClock) -> Store {
    Store::builder(path)
        .cache_bytes(cache_mb << 20)
        .durability(Durability::Periodic(Duration::from_millis(500)))
        .clock(clock.clone())
        .sweep_interval(None)
        .open()
        .unwrap()
}

/// The disk raw sled takes for the same writes (a Pending record, an index entry, then the
/// completed record over it, per key; 2 threads; sled's own flush every 500 ms, as the store's
/// `Periodic` mode): the floor below which idemstore's bytes per record cannot go on sled.
fn raw_sled_child(records: u64, cache_mb: u64) {
    let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
    let path = dir.path().join("raw");
    {
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_mb << 20)
            .flush_every_ms(Some(500))
            .open()
            .unwrap();
        let (recs, index) = (
            db.open_tree("records").unwrap(),
            db.open_tree("expiry").unwrap(),
        );
        // The sizes idemstore writes for a 64-byte `Vec<u8>` result: a 114-byte Pending
        // record, then a 179-byte completed one (header, payload, checksum).
        let (pending, completed) = (vec![0u8; 114], vec![0x42u8; 179]);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (recs, index, pending, completed) = (&recs, &index, &pending, &completed);
                s.spawn(move || {
                    for i in (t..records).step_by(2) {
                        let key = format!("order-{i:08}");
                        let mut entry = (START_MS + 86_400_000).to_be_bytes().to_vec();
                        entry.extend_from_slice(key.as_bytes());
                        index.insert(entry, &[]).unwrap();
                        recs.insert(&key, pending.as_slice()).unwrap();
                        recs.insert(&key, completed.as_slice()).unwrap();
                    }
                });
            }
        });
        db.flush().unwrap();
    }
    println!(
        "| raw sled, same writes | {records} | — | {:.0} MiB | — | — | — | — | — |",
        dir_size(&path) as f64 / (1 << 20) as f64
    );
}

fn child(records: u64, cache_mb: u64) {
    let dir = tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
    let path = dir.path().join("db");
    let clock = ManualClock::new(START_MS);
    let expiring = records / 10;
    let value = vec![0x42u8; 64];

    let start = Instant::now();
    {
        let store = open(&path, cache_mb, &clock);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (store, value) = (&store, &value);
                s.spawn(move || {
                    for i in (t..records).step_by(2) {
                        let key = format!("order-{i:08}");
                        let call = store.call(&key);
                        // Every tenth record expires in an hour, the rest in a day.
                        let call = if i.is_multiple_of(10) {
                            call.ttl(Duration::from_secs(3600))
                        } else {
                            call
                        };
                        call.run(|| Ok::<_, std::io::Error>(value.clone())).unwrap();
                    }
                });
            }
        });
        store.close().unwrap();
    }
    let fill = start.elapsed();
    let on_disk = dir_size(&path);

    let start = Instant::now();
    let store = open(&path, cache_mb, &clock);
    let reopen = start.elapsed();

    let start = Instant::now();
    assert_eq!(store.sweep_now().unwrap(), 0);
    let sweep_nothing = start.elapsed();

    clock.advance(Duration::from_secs(3601));
    let stop = AtomicBool::new(false);
    let (swept, sweep_all, mut latencies) = std::thread::scope(|s| {
        let (store, stop) = (&store, &stop);
        let replayer = s.spawn(move || {
            let mut latencies = Vec::new();
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                n = (n + 7) % records;
                if n.is_multiple_of(10) {
                    continue;
                }
                let t = Instant::now();
                let out = store
                    .execute_once(
                        format!("order-{n:08}"),
                        || -> Result<Vec<u8>, std::io::Error> {
                            unreachable!("a live record must replay")
                        },
                    )
                    .unwrap();
                std::hint::black_box(out);
                latencies.push(t.elapsed().as_nanos() as u64);
            }
            latencies
        });
        let start = Instant::now();
        let swept = store.sweep_now().unwrap();
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        (swept, took, replayer.join().unwrap())
    });
    latencies.sort_unstable();
    let quantile = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1e6;
    assert_eq!(swept, expiring, "every expired record is swept");
    println!(
        "| {cache_mb} MiB | {records} | {:.1} s | {:.0} MiB | {:.0} MiB | {:.2} s | {:.3} ms | {:.2} s ({}) | {:.3} / {:.2} ms |",
        fill.as_secs_f64(),
        on_disk as f64 / (1 << 20) as f64,
        peak_rss_mib(),
        reopen.as_secs_f64(),
        sweep_nothing.as_secs_f64() * 1e3,
        sweep_all.as_secs_f64(),
        swept,
        quantile(0.999),
        quantile(1.0),
    );
}

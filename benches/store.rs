//! Criterion benches of the store's paths. Peer comparisons (raw sled, SQLite, fsync) are in
//! `compare/` and run with `cargo run --release -p idemstore-compare`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use idemstore::{Durability, Fingerprint, ManualClock, Store};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    amount: u64,
    currency: String,
    body: String,
}

fn receipt(body_len: usize) -> Receipt {
    Receipt {
        charge_id: "ch_1N8vJkLq2eZvKYlo2C0fG8yZ".into(),
        amount: 4200,
        currency: "eur".into(),
        body: "x".repeat(body_len),
    }
}

fn open(dir: &std::path::Path, durability: Durability) -> Store {
    Store::builder(dir.join("db"))
        .durability(durability)
        .sweep_interval(None)
        .open()
        .unwrap()
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    for (name, body) in [("small", 0), ("4KiB", 4096 - 40)] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), Durability::Immediate);
        let value = receipt(body);
        for i in 0..1000 {
            store
                .execute_once(format!("k{i}"), || Ok::<_, std::io::Error>(value.clone()))
                .unwrap();
        }
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let mut n = 0;
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                n = (n + 1) % 1000;
                let out = store
                    .execute_once(&keys[n], || -> Result<Receipt, std::io::Error> {
                        unreachable!()
                    })
                    .unwrap();
                black_box(out)
            })
        });
    }
    g.finish();
}

fn new_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("new_key");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for (name, durability) in [
        ("immediate", Durability::Immediate),
        (
            "periodic_500ms",
            Durability::Periodic(Duration::from_millis(500)),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), durability);
        let next = AtomicU64::new(0);
        let value = receipt(0);
        g.bench_function(name, |b| {
            b.iter(|| {
                let k = next.fetch_add(1, Ordering::Relaxed);
                store
                    .execute_once(format!("order-{k}"), || {
                        Ok::<_, std::io::Error>(value.clone())
                    })
                    .unwrap()
            })
        });
    }
    g.finish();
}

/// Four threads replaying one hot key: the cost of sharing a key.
fn same_key_contention(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), Durability::Immediate);
    store
        .execute_once("hot", || Ok::<_, std::io::Error>(receipt(0)))
        .unwrap();
    let mut g = c.benchmark_group("same_key");
    g.throughput(Throughput::Elements(4));
    g.bench_function("replay_4_threads", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for _ in 0..iters {
                            black_box(
                                store
                                    .execute_once("hot", || -> Result<Receipt, std::io::Error> {
                                        unreachable!()
                                    })
                                    .unwrap(),
                            );
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.finish();
}

fn fingerprint(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint");
    let small = receipt(0);
    let body = vec![7u8; 4096];
    g.bench_function("of_value_small", |b| {
        b.iter(|| Fingerprint::of(black_box(&small)).unwrap())
    });
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("of_bytes_4KiB", |b| {
        b.iter(|| Fingerprint::of_bytes(black_box(&body)))
    });
    g.finish();
}

/// A sweep pass: N expired records among M live ones (setup is per batch, not timed).
fn sweep(c: &mut Criterion) {
    let mut g = c.benchmark_group("sweep");
    g.sample_size(10);
    for (expired, live) in [(0usize, 20_000usize), (1_000, 20_000), (10_000, 20_000)] {
        g.bench_function(format!("{expired}_expired_of_{}", expired + live), |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let clock = ManualClock::new(1_780_000_000_000);
                    let store = Store::builder(dir.path().join("db"))
                        .durability(Durability::Periodic(Duration::from_secs(60)))
                        .clock(clock.clone())
                        .sweep_interval(None)
                        .open()
                        .unwrap();
                    for i in 0..expired {
                        store
                            .call(&format!("e{i}"))
                            .ttl(Duration::from_secs(1))
                            .run(|| Ok::<_, std::io::Error>(i))
                            .unwrap();
                    }
                    for i in 0..live {
                        store
                            .execute_once(format!("l{i}"), || Ok::<_, std::io::Error>(i))
                            .unwrap();
                    }
                    clock.advance(Duration::from_secs(2));
                    (dir, store)
                },
                // Returned, so dropping the store (a flush) falls outside the timing.
                |(dir, store)| {
                    assert_eq!(store.sweep_now().unwrap(), expired as u64);
                    (dir, store)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Opening a store of 50k records (recovery of sled's log included).
fn open_large(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), Durability::Periodic(Duration::from_secs(60)));
        for i in 0..50_000u64 {
            store
                .execute_once(format!("k{i}"), || Ok::<_, std::io::Error>(i))
                .unwrap();
        }
    }
    let mut g = c.benchmark_group("open");
    g.sample_size(10);
    g.bench_function("50k_records", |b| {
        b.iter(|| drop(open(dir.path(), Durability::Immediate)))
    });
    g.finish();
}

criterion_group!(
    benches,
    replay,
    new_key,
    same_key_contention,
    fingerprint,
    sweep,
    open_large
);
criterion_main!(benches);

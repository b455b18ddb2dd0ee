//! The fuzz targets' bodies over their checked-in corpora (`fuzz/corpus/*`), so CI exercises
//! them on stable Rust. `cargo fuzz run decode_record` / `model_ops` explores further.

mod reference;

use std::path::Path;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let inputs: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(!inputs.is_empty(), "empty corpus for {target}");
    inputs
}

#[test]
fn decode_record_corpus() {
    let mut valid = 0;
    for data in corpus("decode_record") {
        if let Ok(info) = idemstore::__decode_record(&data) {
            assert!(info.outcome_bytes <= data.len());
            valid += 1;
        }
    }
    assert!(valid > 0, "the corpus holds no valid record");
}

#[test]
fn model_ops_corpus() {
    reference::quiet_model_panics();
    for data in corpus("model_ops") {
        let (immediate, ops) = reference::ops_from_bytes(&data);
        assert!(
            data.len() < 5 || !ops.is_empty(),
            "an input of {} bytes decodes to no operation",
            data.len()
        );
        reference::run(immediate, &ops);
    }
}

/// Any bytes decode to operations, each taking at most 7 bytes (the fuzzer's inputs are
/// arbitrary; this checks the decoding alone, cheaply).
#[test]
fn any_bytes_decode_to_operations() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for len in 0..3000usize {
        let data: Vec<u8> = (0..len % 500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (_, ops) = reference::ops_from_bytes(&data);
        let at_least = (data.len().saturating_sub(1) / 7).min(64);
        assert!(
            (at_least..=64).contains(&ops.len()),
            "{} bytes gave {} operations",
            data.len(),
            ops.len()
        );
        for op in &ops {
            if let reference::Op::Tx { run, .. } = op {
                assert!(
                    !matches!(run, reference::Run::RemoveThenOk(_)),
                    "a transaction that calls the store"
                );
            }
        }
    }
}

/// The checked-in seeds for the model's scenarios still say what the scenarios say (the byte
/// format of operations can change under them).
#[test]
fn model_ops_seeds_match_the_scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/model_ops");
    for (name, ops) in reference::scenarios() {
        let path = dir.join(format!("scenario-{name}"));
        let data = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write the seeds with `cargo test --test fuzz_corpus -- --ignored \
                 write_model_seeds`)",
                path.display()
            )
        });
        assert_eq!(
            reference::ops_from_bytes(&data),
            (true, ops),
            "{}",
            path.display()
        );
    }
}

/// Writes one seed input per model scenario (run by hand:
/// `cargo test --test fuzz_corpus -- --ignored write_model_seeds`).
#[test]
#[ignore = "writes corpus files; run by hand"]
fn write_model_seeds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/model_ops");
    for (name, ops) in reference::scenarios() {
        std::fs::write(
            dir.join(format!("scenario-{name}")),
            reference::ops_to_bytes(true, &ops),
        )
        .unwrap();
    }
}

/// Writes seed inputs for the decode corpus from a real store (run by hand:
/// `cargo test --test fuzz_corpus -- --ignored write_decode_seeds`).
#[test]
#[ignore = "writes corpus files; run by hand"]
fn write_decode_seeds() {
    use idemstore::Store;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    {
        let store = Store::open(&db).unwrap();
        store
            .execute_once("ok", || Ok::<_, std::io::Error>(String::from("receipt")))
            .unwrap();
        let _ = store.execute_once("retry", || Err::<u8, _>(std::io::Error::other("x")));
        let _ = store
            .call("perm")
            .fingerprint(idemstore::Fingerprint::of_bytes(b"req"))
            .permanent_if(|_: &String| true)
            .run(|| Err::<u8, _>(String::from("declined")));
        let _ = store
            .call("big")
            .run(|| Ok::<_, std::io::Error>(vec![1u8; 2 << 20]));
    }
    let raw = sled::open(&db).unwrap();
    let records = raw.open_tree("idemstore/records").unwrap();
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_record");
    for item in records.iter() {
        let (k, v) = item.unwrap();
        std::fs::write(
            out.join(format!("seed-{}", String::from_utf8_lossy(&k))),
            &v,
        )
        .unwrap();
    }
}

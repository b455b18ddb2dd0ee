//! Adversarial tests of the `idemstore` binary: exit codes as `idemstore --help` documents
//! them (0 done, 1 store failed or refused, 2 command line wrong, 3 no record, 4 not an
//! orphan, 5 locked), never a panic, and nothing changed by a refused command.

use assert_cmd::Command;
use idemstore::{OrphanPolicy, RecordState, Store};
use std::path::Path;

fn cli() -> Command {
    let mut c = Command::cargo_bin("idemstore").expect("the binary is built");
    c.env_remove("IDEMSTORE_PATH")
        .env_remove("IDEMSTORE_POSTGRES");
    c
}

fn on(path: &Path) -> Command {
    let mut c = cli();
    c.arg("--path").arg(path);
    c
}

/// (exit code, stdout, stderr); a panic is never an answer.
fn run(c: &mut Command) -> (i32, String, String) {
    let out = c.output().expect("runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked"),
        "the command panicked (exit {:?}): {err}",
        out.status.code()
    );
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
    )
}

/// A sled store with a completed key "done" and an orphan "stuck" (its Pending record moved
/// in by an import of a store exported while its call ran).
fn seeded(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("db");
    let src_path = dir.join("src");
    let src = Store::open(&src_path).unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let mut lines = Vec::new();
    let src_ref = &src;
    std::thread::scope(|s| {
        s.spawn(move || {
            src_ref
                .call("stuck")
                .orphan_policy(OrphanPolicy::Report)
                .run(|| {
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok::<_, std::io::Error>(1u32)
                })
                .unwrap();
        });
        started_rx.recv().unwrap();
        src.export(&mut lines, |_| {}).unwrap();
        go_tx.send(()).unwrap();
    });
    drop(src);
    let store = Store::open(&path).unwrap();
    store
        .execute_once("done", || Ok::<_, std::io::Error>(5u32))
        .unwrap();
    store.import(lines.as_slice(), |_| {}).unwrap();
    assert_eq!(
        store.record("stuck").unwrap().unwrap().state,
        RecordState::Pending
    );
    store.close().unwrap();
    path
}

/// "2  the command line is wrong": naming two stores at once, or a PostgreSQL-only option
/// on a sled store, is a wrong command line, as clap's own refusals are.
#[test]
fn contradictory_store_options_are_a_command_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let (c, _, err) = run(on(&path)
        .args(["--postgres", "host=127.0.0.1 user=postgres dbname=test"])
        .arg("stats"));
    assert_eq!(c, 2, "--path with --postgres: {err}");
    let (c, _, err) = run(on(&path).args(["--tenant", "t1", "stats"]));
    assert_eq!(c, 2, "--tenant on a sled store: {err}");
}

/// A duration too large for the clock is a wrong argument, not a panic.
#[test]
fn ls_older_than_a_huge_age_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    for age in [
        "18446744073709551615s",
        "300000000000000d",
        "9999999999999h",
    ] {
        let (c, _, err) = run(on(&path).args(["ls", "--older-than", age]));
        assert!(matches!(c, 0..=2), "--older-than {age}: exit {c}: {err}");
    }
}

/// Exit 5 for every command while a service holds the sled store; nothing is changed.
#[test]
fn every_command_on_a_locked_store_exits_5() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let export = dir.path().join("e.jsonl");
    let (c, _, err) = run(on(&path).args(["export", "--out"]).arg(&export));
    assert_eq!(c, 0, "{err}");
    let service = Store::open(&path).unwrap();
    let commands: Vec<Vec<std::ffi::OsString>> = vec![
        vec!["stats".into()],
        vec!["ls".into()],
        vec!["show".into(), "done".into()],
        vec!["rm".into(), "done".into()],
        vec!["sweep".into()],
        vec!["resolve".into(), "stuck".into(), "--release".into()],
        vec!["export".into()],
        vec!["import".into(), export.clone().into()],
    ];
    for args in commands {
        let (c, _, err) = run(on(&path).args(&args));
        assert_eq!(c, 5, "{args:?}: {err}");
    }
    assert_eq!(
        service.record("stuck").unwrap().unwrap().state,
        RecordState::Pending
    );
    assert!(service.record("done").unwrap().is_some());
}

/// Export to a path that cannot be written: exit 1 with the path named; the store unchanged.
#[test]
fn export_to_an_unwritable_path_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    for bad in [
        dir.path().join("no-such-dir").join("e.jsonl"),
        dir.path().to_path_buf(),
    ] {
        let (c, _, err) = run(on(&path).args(["export", "--out"]).arg(&bad));
        assert_eq!(c, 1, "{}: {err}", bad.display());
        assert!(err.contains("creating"), "{err}");
    }
    let (c, _, _) = run(on(&path).args(["show", "stuck"]));
    assert_eq!(c, 0);
}

/// Import from a file that is missing, a directory, or not an export: exit 1.
#[test]
fn import_from_a_bad_file_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let garbage = dir.path().join("garbage.jsonl");
    std::fs::write(&garbage, b"\xff\xfe not json\n").unwrap();
    for bad in [
        dir.path().join("missing.jsonl"),
        dir.path().to_path_buf(),
        garbage,
    ] {
        let (c, _, err) = run(on(&path).arg("import").arg(&bad));
        assert_eq!(c, 1, "{}: {err}", bad.display());
    }
}

/// An empty file is not an export: a failed or truncated `export > file` must not import as
/// "imported 0 records" with exit 0.
#[test]
fn import_of_an_empty_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, b"").unwrap();
    let (c, out, err) = run(on(&path).arg("import").arg(&empty));
    assert_eq!(c, 1, "an empty file imported: {out} {err}");
}

/// A bad line: exit 1, the line named; the records before it stay imported (durably: the
/// process is gone and a new one finds them).
#[test]
fn import_stops_at_a_bad_line_and_keeps_what_came_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let export = dir.path().join("e.jsonl");
    let (c, _, err) = run(on(&path).args(["export", "--out"]).arg(&export));
    assert_eq!(c, 0, "{err}");
    let mut text = std::fs::read_to_string(&export).unwrap();
    text.push_str("{\"key\":\"6b\",\"record\":\"nothex\"}\n");
    let lines = text.lines().count();
    std::fs::write(&export, text).unwrap();
    let copy = dir.path().join("copy");
    let (c, _, err) = run(on(&copy).args(["import", "--create"]).arg(&export));
    assert_eq!(c, 1, "{err}");
    assert!(err.contains(&format!("line {lines}")), "{err}");
    let store = Store::open(&copy).unwrap();
    let out = store
        .execute_once("done", || Ok::<_, std::io::Error>(99u32))
        .unwrap();
    assert_eq!((*out, out.is_replayed()), (5, true));
}

/// A command that only reads never makes a store in an existing directory that is not one.
#[test]
fn stats_on_an_empty_directory_does_not_create_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (c, _, err) = run(on(&empty).arg("stats"));
    let entries = std::fs::read_dir(&empty).unwrap().count();
    assert_eq!(
        entries,
        0,
        "stats wrote {entries} entries into {} (exit {c}: {err})",
        empty.display()
    );
    assert_ne!(c, 0, "an empty directory is not a store: {err}");
}

/// Keys: bad hex is refused (exit 1) and changes nothing; a missing key is 3; a completed
/// key is 4; the orphan resolves once (0) then is 4.
#[test]
fn resolve_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let (c, _, err) = run(on(&path).args(["resolve", "--hex", "zz", "--release"]));
    assert_eq!(c, 1, "{err}");
    let (c, _, err) = run(on(&path).args(["resolve", "--hex", "abc", "--release"]));
    assert_eq!(c, 1, "{err}");
    let (c, _, err) = run(on(&path).args(["resolve", "nothing", "--release"]));
    assert_eq!(c, 3, "{err}");
    let (c, _, err) = run(on(&path).args(["resolve", "done", "--release"]));
    assert_eq!(c, 4, "{err}");
    let (c, _, err) = run(on(&path).args(["resolve", "stuck", "--failed", "\"declined\""]));
    assert_eq!(c, 0, "{err}");
    let (c, _, err) = run(on(&path).args(["resolve", "stuck", "--release"]));
    assert_eq!(c, 4, "{err}");
    let store = Store::open(&path).unwrap();
    let r = store
        .call("stuck")
        .permanent_if(|_: &String| true)
        .run(|| -> Result<u32, String> { panic!("never") });
    assert!(
        matches!(r, Err(idemstore::ExecuteError::Operation { ref error, replayed: true }) if error == "declined"),
        "{r:?}"
    );
}

/// Export of a store with a corrupt record copies it (exit 0); importing it is refused
/// (exit 1, the line named); show exits 1; no panic.
#[test]
fn export_of_a_store_with_a_corrupt_record_copies_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    {
        let db = idemstore::sled::open(&path).unwrap();
        let t = db.open_tree("idemstore/records").unwrap();
        t.insert(b"done", &b"\x00bad"[..]).unwrap();
        db.flush().unwrap();
    }
    // sled's threads may hold the lock a moment after the drop.
    let mut tries = 0;
    let (c, _, err) = loop {
        let r = run(on(&path).arg("export"));
        if r.0 != 5 || tries > 200 {
            break r;
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Export copies the bytes it cannot read (a backup loses nothing); importing them is
    // refused with the line named.
    assert_eq!(c, 0, "{err}");
    let file = dir.path().join("with-corrupt.jsonl");
    let (c, _, err) = run(on(&path).args(["export", "--out"]).arg(&file));
    assert_eq!(c, 0, "{err}");
    let (c, _, err) = run(on(&dir.path().join("copy"))
        .args(["import", "--create"])
        .arg(&file));
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("import line"), "{err}");
    let (c, _, err) = run(on(&path).args(["show", "done"]));
    assert_eq!(c, 1, "{err}");
    let (c, out, err) = run(on(&path).arg("stats"));
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("unreadable"), "{out}");
}

//! `hie demo --once`: the whole walk-through (broker + three member processes, SQLite) must pass.

#[test]
fn the_demo_walks_through_a_whole_exchange() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hie"))
        .args(["demo", "--once", "--dir"])
        .arg(dir.path().join("demo"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hie demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hie demo --once failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 failed"), "{stdout}");
    assert!(!stdout.contains('✗'), "{stdout}");
    for step in ["$match", "break-the-glass", "ITI-68", "federated", "curl"] {
        assert!(
            stdout.contains(step),
            "the walk-through lacks {step}:\n{stdout}"
        );
    }
}

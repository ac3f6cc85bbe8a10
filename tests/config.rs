//! A bad configuration is a clear error naming the key, never a panic.

mod common;

use std::process::Command;

fn hie_with(config: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(common::HIE);
    cmd.current_dir(dir.path()).env_remove("HIE_CONFIG");
    if let Some(text) = config {
        let path = dir.path().join("hie.toml");
        std::fs::write(&path, text).expect("write");
        cmd.args(["--config", &path.to_string_lossy()]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.arg("migrate").output().expect("run hie");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code(), stderr)
}

#[test]
fn config_errors_name_the_key() {
    let (code, err) = hie_with(Some("[server]\nlisen = \"127.0.0.1:1\"\n"), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("lisen"), "{err}");

    let (code, err) = hie_with(None, &[("HIE_SERVER_LISTEN", "everywhere")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("server.listen"), "{err}");

    let (_, err) = hie_with(None, &[("HIE_DATABASE_POOL_SIZE", "lots")]);
    assert!(err.contains("HIE_DATABASE_POOL_SIZE"), "{err}");

    let (code, err) = hie_with(Some("[database]\nurl = \"mysql://db/hie\"\n"), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("database.url"), "{err}");

    let (code, err) = hie_with(
        None,
        &[("HIE_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot connect to the database"), "{err}");

    let (code, err) = hie_with(Some("[log]\nformat = \"xml\"\n"), &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("log.format"), "{err}");

    let missing = Command::new(common::HIE)
        .args(["--config", "/nonexistent/hie.toml", "migrate"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read config file"));
}

#[test]
fn migrate_creates_the_sqlite_database_on_first_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(common::HIE)
        .current_dir(dir.path())
        .env_remove("HIE_CONFIG")
        .arg("migrate")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("data/hie.db").exists());
    let again = Command::new(common::HIE)
        .current_dir(dir.path())
        .env_remove("HIE_CONFIG")
        .arg("migrate")
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 migration(s)"));
}

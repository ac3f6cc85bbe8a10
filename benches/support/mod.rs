//! Shared by the benchmarks: arguments, the `hie` binary, percentiles, child processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const HIE: &str = env!("CARGO_BIN_EXE_hie");

pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

pub fn hie(config: &Path, args: &[&str]) -> String {
    let out = Command::new(HIE)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hie");
    assert!(
        out.status.success(),
        "hie {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hie --config CONFIG ARGS`, waits for a stdout line with "listening on https://",
/// and returns the process and the port it listens on.
pub fn start(config: &Path, args: &[&str]) -> (KillOnDrop, u16) {
    let mut child = Command::new(HIE)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start hie");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut port = 0;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.split("listening on https://").nth(1) {
            port = rest
                .split('/')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (KillOnDrop(child), port)
}

pub fn client(ca: &Path, cert: &Path, key: &Path) -> reqwest::Client {
    let tls = hie_broker::tls::client_config(ca, Some((cert, key))).expect("tls");
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("client")
}

pub fn machine() -> String {
    format!(
        "{} cores, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    )
}

/// Issues `org` a certificate (also a server certificate for localhost when it has a FHIR base)
/// and enrolls it with `hie org add`.
pub fn enroll(
    config: &Path,
    certs: &Path,
    org: &str,
    kind: &str,
    system: Option<&str>,
    fhir_base: Option<&str>,
) {
    let mut issue = vec!["certs", "issue", "--org", org];
    if fhir_base.is_some() {
        issue.extend(["--server-name", "localhost"]);
    }
    hie(config, &issue);
    let cert = certs.join("orgs").join(org).join("client.crt");
    let cert = cert.to_string_lossy();
    let mut add = vec![
        "org", "add", "--id", org, "--name", org, "--type", kind, "--cert", &cert,
    ];
    if let Some(s) = system {
        add.extend(["--identifier-system", s]);
    }
    if let Some(b) = fhir_base {
        add.extend(["--fhir-base", b]);
    }
    hie(config, &add);
}

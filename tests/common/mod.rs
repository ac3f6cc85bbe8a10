//! Test harness: starts the real `hie` binary on random ports with a fresh database (SQLite
//! file, or a fresh schema in the PostgreSQL named by HIE_TEST_POSTGRES_URL), its own dev CA,
//! and hands out mutual-TLS clients per member organisation.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::Connection;
use hie_broker::certs::{Authority, Validity};
use hie_broker::ids::OrgId;

pub const HIE: &str = env!("CARGO_BIN_EXE_hie");

#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

static SCHEMA_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Backend {
    /// A fresh schema in the test PostgreSQL, or None (loudly) when none is configured.
    /// With HIE_TEST_REQUIRE_POSTGRES=1 (as in CI) a missing or unreachable server fails the test.
    pub fn postgres() -> Option<Backend> {
        let required = std::env::var("HIE_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
        let Ok(url) = std::env::var("HIE_TEST_POSTGRES_URL") else {
            assert!(
                !required,
                "HIE_TEST_REQUIRE_POSTGRES=1 but HIE_TEST_POSTGRES_URL is not set"
            );
            // Written to the real stderr, past the test harness's capture, so it cannot go unseen.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "!!! SKIPPED a PostgreSQL test: set HIE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test to run it"
            );
            return None;
        };
        let schema = format!(
            "t_{}_{}_{}",
            std::process::id(),
            SCHEMA_COUNTER.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        openssl::init();
        let mut conn = diesel::PgConnection::establish(&url)
            .unwrap_or_else(|e| panic!("PostgreSQL at {url} is not reachable: {e}"));
        conn.batch_execute(&format!("CREATE SCHEMA {schema}"))
            .expect("create test schema");
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(Backend::Postgres(format!(
            "{url}{sep}options=-csearch_path%3D{schema}"
        )))
    }
}

/// A running broker with its own directory, CA and database.
pub struct Exchange {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub certs: PathBuf,
    pub db_url: String,
    pub base: String,
    pub admin: String,
    child: Option<Child>,
    others: Vec<Child>,
    stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// A member organisation's credentials.
#[derive(Clone, Debug)]
pub struct MemberCreds {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Exchange {
    pub fn start(backend: &Backend) -> Exchange {
        Self::start_with(backend, "")
    }

    /// Starts a broker; `extra` is appended to its TOML config.
    pub fn start_with(backend: &Backend, extra: &str) -> Exchange {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        Authority::init(
            &certs,
            "Test Exchange",
            &["localhost".into(), "127.0.0.1".into()],
            false,
        )
        .expect("certs init");
        let db_url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("data/hie.db").display()),
            Backend::Postgres(url) => url.clone(),
        };
        let config_path = dir.path().join("hie.toml");
        let base = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nidentity_cache_ms = 0\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
             [database]\nurl = \"{db_url}\"\npool_size = 4\n\n[certs]\ndir = \"{}\"\ncrl_reload_seconds = 1\n",
            certs.display()
        );
        let config = merge_toml(&base, extra);
        std::fs::write(&config_path, config).expect("write config");
        let mut exchange = Exchange {
            dir,
            config_path,
            certs,
            db_url,
            base: String::new(),
            admin: String::new(),
            child: None,
            others: Vec::new(),
            stdout: Default::default(),
        };
        exchange.spawn();
        exchange
    }

    /// Starts one more broker process on the same database and CA (as behind a load balancer);
    /// returns its FHIR base URL.
    pub fn add_instance(&mut self) -> String {
        let (first, admin) = (
            std::mem::take(&mut self.base),
            std::mem::take(&mut self.admin),
        );
        let first_child = self.child.take();
        self.spawn();
        let base = std::mem::replace(&mut self.base, first);
        self.admin = admin;
        if let Some(c) = std::mem::replace(&mut self.child, first_child) {
            self.others.push(c);
        }
        base
    }

    fn spawn(&mut self) {
        let mut child = Command::new(HIE)
            .args(["--config", &self.config_path.to_string_lossy(), "serve"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hie serve");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = std::sync::Arc::clone(&self.stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("hie: exchange listening on https://") {
                    let addr = rest.split('/').next().unwrap_or_default().to_string();
                    let _ = tx.send(("exchange", addr));
                } else if let Some(rest) = line.strip_prefix("hie: admin listening on http://") {
                    let addr = rest.split(' ').next().unwrap_or_default().to_string();
                    let _ = tx.send(("admin", addr));
                }
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.base.is_empty() || self.admin.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(("exchange", addr)) => {
                    let port = addr.rsplit(':').next().unwrap_or_default().to_string();
                    self.base = format!("https://localhost:{port}/fhir");
                }
                Ok((_, addr)) => self.admin = format!("http://{addr}"),
                Err(_) => panic!("hie serve did not start within 60 s"),
            }
        }
        self.child = Some(child);
    }

    /// Runs `hie --config … ARGS`.
    pub fn hie(&self, args: &[&str]) -> Output {
        Command::new(HIE)
            .args(["--config", &self.config_path.to_string_lossy()])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run hie")
    }

    /// Like `hie`, but the command must succeed; returns stdout.
    pub fn hie_ok(&self, args: &[&str]) -> String {
        let out = self.hie(args);
        assert!(
            out.status.success(),
            "hie {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Issues a certificate with the CLI and enrolls the organisation.
    pub fn enroll(&self, id: &str, org_type: &str, extra: &[&str]) -> MemberCreds {
        self.hie_ok(&["certs", "issue", "--org", id]);
        let creds = self.creds(id);
        let cert = creds.cert.to_string_lossy().into_owned();
        let mut args = vec![
            "org", "add", "--id", id, "--name", id, "--type", org_type, "--cert", &cert,
        ];
        args.extend_from_slice(extra);
        self.hie_ok(&args);
        creds
    }

    pub fn creds(&self, id: &str) -> MemberCreds {
        let dir = self.certs.join("orgs").join(id);
        MemberCreds {
            id: id.into(),
            cert: dir.join("client.crt"),
            key: dir.join("client.key"),
        }
    }

    /// Writes a certificate for `id` with an arbitrary validity window (e.g. already expired).
    pub fn issue_with_validity(&self, id: &str, validity: Validity) -> MemberCreds {
        let ca = Authority::load(&self.certs).expect("load CA");
        let org = OrgId::parse(id).expect("org id");
        ca.issue_member(&org, validity, &[], "").expect("issue");
        self.creds(id)
    }

    pub fn client(&self, creds: &MemberCreds) -> reqwest::Client {
        client_for(&self.certs.join("ca.crt"), Some((&creds.cert, &creds.key)))
    }

    pub fn client_without_cert(&self) -> reqwest::Client {
        client_for(&self.certs.join("ca.crt"), None)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub fn output(&self) -> Vec<String> {
        self.stdout.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the broker to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs raw SQL against the broker's database (to play the attacker with database access).
    pub fn sql(&self, sql: &str) {
        if let Some(path) = self.db_url.strip_prefix("sqlite://") {
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            c.batch_execute(sql).expect("sql");
        } else {
            let mut c = diesel::PgConnection::establish(&self.db_url).expect("open postgres");
            c.batch_execute(sql).expect("sql");
        }
    }

    pub fn is_sqlite(&self) -> bool {
        self.db_url.starts_with("sqlite://")
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        for mut child in self.others.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `base` with the tables of `extra` merged over it.
fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let mut table: toml::Table = base.parse().expect("base test config");
    merge(&mut table, extra.parse().expect("extra test config"));
    toml::to_string(&table).expect("serialize config")
}

pub fn client_for(ca: &Path, cert: Option<(&Path, &Path)>) -> reqwest::Client {
    hie_broker::tls::install_crypto_provider();
    let tls = hie_broker::tls::client_config(ca, cert).expect("client tls config");
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Runs a test body against SQLite and (when configured) PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::common::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(backend) = $crate::common::Backend::postgres() {
                    super::$name(backend).await
                }
            }
        }
    };
}

/// A simulated member EHR (`hie member-sim`) serving documents and records from its own data
/// directory.
pub struct MemberSim {
    pub org: String,
    pub base: String,
    pub data: tempfile::TempDir,
    pub port: u16,
    config_path: PathBuf,
    child: Child,
}

fn spawn_sim(config: &Path, id: &str, data: &Path, listen: &str, args: &[&str]) -> (Child, u16) {
    let mut child = Command::new(HIE)
        .args(["--config", &config.to_string_lossy(), "member-sim"])
        .args([
            "--org",
            id,
            "--data",
            &data.to_string_lossy(),
            "--listen",
            listen,
        ])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn member-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.split("listening on https://").nth(1) {
                    break rest.split('/').next().unwrap_or_default().to_string();
                }
            }
            _ => panic!("member-sim for {id} did not start"),
        }
    };
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    (child, port)
}

impl MemberSim {
    /// Writes a document into the member's repository; returns its URL, size and SHA-1 (base64).
    pub fn put_document(&self, name: &str, bytes: &[u8]) -> (String, usize, String) {
        let dir = self.data.path().join("documents");
        std::fs::create_dir_all(&dir).expect("documents dir");
        std::fs::write(dir.join(name), bytes).expect("write document");
        let hash = openssl::base64::encode_block(&openssl::sha::sha1(bytes));
        (format!("{}/Binary/{name}", self.base), bytes.len(), hash)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the member again on the same port, with other member-sim arguments.
    pub fn restart(&mut self, args: &[&str]) {
        self.kill();
        let listen = format!("127.0.0.1:{}", self.port);
        let (child, _) = spawn_sim(
            &self.config_path,
            &self.org,
            self.data.path(),
            &listen,
            args,
        );
        self.child = child;
    }
}

impl Drop for MemberSim {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Exchange {
    /// Issues a client+server certificate for `id`, starts its member-sim, and enrolls the
    /// organisation with the sim's FHIR base and its own identifier system.
    pub fn enroll_with_repository(
        &self,
        id: &str,
        org_type: &str,
        system: &str,
        delay_ms: u64,
    ) -> (MemberCreds, MemberSim) {
        let delay = delay_ms.to_string();
        self.enroll_with_sim(id, org_type, system, &["--delay-ms", &delay], &[])
    }

    /// Like `enroll_with_repository`, with member-sim arguments and data files written first
    /// (e.g. `("resources.ndjson", …)`).
    pub fn enroll_with_sim(
        &self,
        id: &str,
        org_type: &str,
        system: &str,
        args: &[&str],
        files: &[(&str, String)],
    ) -> (MemberCreds, MemberSim) {
        self.hie_ok(&["certs", "issue", "--org", id, "--server-name", "localhost"]);
        let data = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(data.path().join("documents")).expect("documents dir");
        for (name, text) in files {
            std::fs::write(data.path().join(name), text).expect("write data file");
        }
        let (child, port) = spawn_sim(&self.config_path, id, data.path(), "127.0.0.1:0", args);
        let base = format!("https://localhost:{port}/fhir");
        let creds = self.creds(id);
        let cert = creds.cert.to_string_lossy().into_owned();
        self.hie_ok(&[
            "org",
            "add",
            "--id",
            id,
            "--name",
            id,
            "--type",
            org_type,
            "--cert",
            &cert,
            "--identifier-system",
            system,
            "--fhir-base",
            &base,
        ]);
        (
            creds,
            MemberSim {
                org: id.into(),
                base,
                data,
                port,
                config_path: self.config_path.clone(),
                child,
            },
        )
    }
}

/// The official FHIR R4 JSON schema (../shared/data/fhir-r4-schema, or HIE_FHIR_SCHEMA), compiled
/// once. None when it is not available: said loudly, and CI (HIE_TEST_REQUIRE_FHIR_SCHEMA=1) fails.
pub fn fhir_schema() -> Option<&'static jsonschema::Validator> {
    static SCHEMA: std::sync::OnceLock<Option<jsonschema::Validator>> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let path = std::env::var("HIE_FHIR_SCHEMA")
                .map(PathBuf::from)
                .unwrap_or_else(|_| {
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("../shared/data/fhir-r4-schema/fhir.schema.json")
                });
            let Ok(text) = std::fs::read_to_string(&path) else {
                assert!(
                    std::env::var("HIE_TEST_REQUIRE_FHIR_SCHEMA").as_deref() != Ok("1"),
                    "HIE_TEST_REQUIRE_FHIR_SCHEMA=1 but {} cannot be read",
                    path.display()
                );
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "!!! FHIR schema validation SKIPPED: {} not found (set HIE_FHIR_SCHEMA)",
                    path.display()
                );
                return None;
            };
            let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
            Some(jsonschema::validator_for(&schema).expect("FHIR schema compiles"))
        })
        .as_ref()
}

/// Asserts that a resource the broker returned is valid FHIR R4 (by the official JSON schema).
pub fn assert_valid_fhir(resource: &serde_json::Value) {
    if let Some(v) = fhir_schema() {
        let errors: Vec<String> = v
            .iter_errors(resource)
            .take(5)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "not valid FHIR R4: {errors:?}\n{}",
            serde_json::to_string_pretty(resource).unwrap_or_default()
        );
    }
}

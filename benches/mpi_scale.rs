//! MPI at scale: N seeded synthetic people (20 % also held by a second member, with the errors
//! registration desks make), bulk-loaded with `hie import`, then the running broker is measured
//! over mutual TLS: the HTTP feed with 8 concurrent clients, `$match` and PDQm latency,
//! database size and memory.
//!
//!   cargo bench --bench mpi_scale -- [--records N] [--clients C] [--database-url URL] [--http-records M] [--queries Q] [--import-only [--keep]] [--reuse KEPT_DIR] [--import-batch N]
//!
//! With --database-url postgres://… the database must be empty (the script makes a fresh one).
//! HIE_BENCH_LATENCIES=FILE writes each query's `$match` and two PDQm searches' milliseconds (one line each,
//! in order); HIE_BENCH_SERVER_LOG=info has the broker log each request with its own time, to
//! tell the server's part of a slow request from the client's.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{arg, enroll, hie, percentile, HIE};

use hie_broker::certs::Authority;
use hie_broker::synth::{to_patient, Generator};

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn proc_status(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .map(|l| l[key.len()..].trim().to_string())
        })
        .unwrap_or_default()
}

fn main() {
    hie_broker::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = arg(&args, "--records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let http_n: usize = arg(&args, "--http-records")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let queries: usize = arg(&args, "--queries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    // --clients N: concurrent feed clients (the target is stated for 8).
    let clients: usize = arg(&args, "--clients")
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
        .max(1);
    // --import-batch N: records per `hie import` transaction (its default otherwise).
    let import_batch = arg(&args, "--import-batch");
    let work = tempfile::tempdir().expect("tempdir");
    // --reuse DIR: a directory kept by `--import-only --keep` (its database already loaded,
    // SQLite only): measure the running broker on it without loading again.
    let reuse = arg(&args, "--reuse").map(std::path::PathBuf::from);
    let root = reuse.clone().unwrap_or_else(|| work.path().to_path_buf());
    let db_url = arg(&args, "--database-url")
        .unwrap_or_else(|| format!("sqlite://{}", root.join("data/hie.db").display()));
    let certs = root.join("certs");
    let config = root.join("hie.toml");
    if reuse.is_none() {
        Authority::init(&certs, "Bench HIE", &["localhost".into()], false).expect("certs");
        std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"{db_url}\"\npool_size = 8\n\
             [certs]\ndir = \"{}\"\n[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\nemergency_requests_per_second = 1000000\nemergency_burst = 1000000\n[log]\nfilter = \"warn\"\n",
            certs.display()
        ),
    )
    .expect("config");
        for (org, system) in [
            ("hospital-a", "urn:bench:a"),
            ("clinic-b", "urn:bench:b"),
            ("clinic-c", "urn:bench:c"),
        ] {
            enroll(&config, &certs, org, "hospital", Some(system), None);
        }
        // The ER that runs $match under ETREAT (only emergency members may assert it).
        enroll(&config, &certs, "county-er", "emergency", None, None);
    }

    // Generate: everyone at hospital A, a fifth also at clinic B with errors.
    let mut g = Generator::new(20261124);
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::new());
    let mut people = Vec::new();
    while a.len() + b.len() < n {
        let p = g.person();
        a.push(to_patient(&p, "urn:bench:a", &format!("A{}", p.id)).to_string());
        if g.rng().u8(..5) == 0 && a.len() + b.len() < n {
            let v = g.variant(&p);
            b.push(to_patient(&v, "urn:bench:b", &format!("B{}", p.id)).to_string());
        }
        if people.len() < 20_000 {
            people.push(p);
        }
    }
    for (name, lines) in [("a.ndjson", &a), ("b.ndjson", &b)] {
        if reuse.is_some() {
            break;
        }
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(work.path().join(name)).expect("file"));
        for l in lines.iter() {
            writeln!(f, "{l}").expect("write");
        }
    }
    println!(
        "records: {} at hospital-a + {} at clinic-b = {n}; database {}",
        a.len(),
        b.len(),
        if db_url.starts_with("sqlite") {
            "SQLite"
        } else {
            "PostgreSQL"
        }
    );

    // The load's clock starts once its input files are on disk: writing them is the bench's
    // work, not the import's.
    let started = Instant::now();
    for (org, file) in [("hospital-a", "a.ndjson"), ("clinic-b", "b.ndjson")] {
        if reuse.is_some() {
            break;
        }
        let path = work.path().join(file).to_string_lossy().to_string();
        let mut cmd = vec!["import", "--org", org, &path];
        if let Some(b) = import_batch.as_deref() {
            cmd.extend(["--batch", b]);
        }
        let out = hie(&config, &cmd);
        print!("hie import: {out}");
    }
    let import_secs = started.elapsed().as_secs_f64();
    if reuse.is_none() {
        println!(
            "bulk import (hie import): {:.0} records/s overall ({n} records in {import_secs:.0} s)",
            n as f64 / import_secs
        );
        // The largest child waited for so far is an import (the others are short commands).
        // SAFETY: getrusage fills the struct it is given.
        let peak_kib = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
            u.ru_maxrss
        };
        println!("hie import peak RSS: {} MiB", peak_kib / 1024);
    }
    if args.iter().any(|a| a == "--import-only") {
        if args.iter().any(|a| a == "--keep") {
            println!("kept: {}", work.keep().display());
            return;
        }
        if db_url.starts_with("sqlite") {
            let mib = dir_size(&work.path().join("data")) as f64 / 1048576.0;
            println!("database: {mib:.0} MiB");
        }
        return;
    }

    // The running broker.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Command::new(HIE)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env(
            "RUST_LOG",
            std::env::var("HIE_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut port = String::new();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(rest) = line.strip_prefix("hie: exchange listening on https://") {
            port = rest
                .split('/')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .unwrap_or_default()
                .to_string();
            break;
        }
    }
    // The admin listener (its /metrics count the feed's batches), when the config has one
    // (directories kept by earlier versions of this bench do not).
    let has_admin = std::fs::read_to_string(&config)
        .map(|c| c.contains("[admin]\nlisten = \"127.0.0.1:0\""))
        .unwrap_or(false);
    let mut admin = None;
    if has_admin {
        for line in lines.by_ref().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("hie: admin listening on ") {
                admin = rest.split(' ').next().map(str::to_string);
                break;
            }
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let child = KillOnDrop(child);
    let base = format!("https://localhost:{port}/fhir");
    let client = |org: &str| {
        let dir = certs.join("orgs").join(org);
        let tls = hie_broker::tls::client_config(
            &certs.join("ca.crt"),
            Some((&dir.join("client.crt"), &dir.join("client.key"))),
        )
        .expect("tls");
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client")
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // HTTP feed: 8 concurrent clients of clinic C.
        let c = client("clinic-c");
        let mut gen = Generator::new(99);
        let records: Vec<(String, String)> = (0..http_n)
            .map(|i| {
                let p = gen.person();
                (format!("C{i}"), to_patient(&p, "urn:bench:c", &format!("C{i}")).to_string())
            })
            .collect();
        let chunks: Vec<Vec<(String, String)>> = records.chunks(http_n.div_ceil(clients).max(1)).map(<[_]>::to_vec).collect();
        let started = Instant::now();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (c, base) = (c.clone(), base.clone());
                tokio::spawn(async move {
                    for (mrn, body) in chunk {
                        let r = c.put(format!("{base}/Patient?identifier=urn:bench:c|{mrn}")).header("X-Purpose-Of-Use", "TREAT").body(body).send().await.expect("put");
                        assert!(r.status().is_success(), "{}", r.status());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("feed task");
        }
        let secs = started.elapsed().as_secs_f64();
        println!("HTTP feed (PUT Patient, {clients} concurrent mTLS clients): {:.0} records/s ({http_n} records)", http_n as f64 / secs);
        if let Some(admin) = &admin {
            let text = reqwest::get(format!("{admin}/metrics")).await.expect("metrics").text().await.expect("metrics text");
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let (records, batches) = (value("hie_mpi_feed_records_total"), value("hie_mpi_feed_batches_total"));
            println!(
                "  feed batches: {batches:.0}, {:.1} requests each on average; {:.0} matched again, {:.0} split",
                records / batches.max(1.0),
                value("hie_mpi_feed_rematched_batches_total"),
                value("hie_mpi_feed_split_batches_total")
            );
        }

        // $match and PDQm latency, one client, sequential, kept-alive.
        let er = client("county-er");
        let mut match_ms = Vec::new();
        let mut pdq_ms = Vec::new();
        let mut pdq_name_ms = Vec::new();
        let mut qg = Generator::new(5);
        for i in 0..queries {
            let p = &people[(i * 7919) % people.len()];
            let v = qg.variant(p);
            let body = serde_json::json!({ "resourceType": "Parameters", "parameter": [{ "name": "resource", "resource": {
                "resourceType": "Patient", "name": [{ "family": v.family, "given": [v.given] }], "birthDate": v.birth_date,
                "gender": v.gender, "address": [{ "postalCode": v.postcode }] } }, { "name": "count", "valueInteger": 5 }] });
            let t = Instant::now();
            let r = er.post(format!("{base}/Patient/$match")).header("X-Purpose-Of-Use", "ETREAT").body(body.to_string()).send().await.expect("match");
            assert!(r.status().is_success(), "$match {}: {}", r.status(), r.text().await.unwrap_or_default());
            let _ = r.bytes().await;
            match_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            let r = er.get(format!("{base}/Patient?family={}&birthdate={}", p.family, p.birth_date)).header("X-Purpose-Of-Use", "TREAT").send().await.expect("pdq");
            assert!(r.status().is_success(), "PDQm {}: {}", r.status(), r.text().await.unwrap_or_default());
            let _ = r.bytes().await;
            pdq_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        // A family name alone: every person whose family name starts with it. After the
        // others, so that what it reads does not change what they find in the caches.
        for i in 0..queries {
            let p = &people[(i * 7919) % people.len()];
            let t = Instant::now();
            let r = er.get(format!("{base}/Patient?family={}&_count=10", p.family)).header("X-Purpose-Of-Use", "TREAT").send().await.expect("pdq");
            assert!(r.status().is_success(), "PDQm {}: {}", r.status(), r.text().await.unwrap_or_default());
            let _ = r.bytes().await;
            pdq_name_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        if let Ok(path) = std::env::var("HIE_BENCH_LATENCIES") {
            let lines: Vec<String> = match_ms
                .iter()
                .zip(&pdq_ms)
                .zip(&pdq_name_ms)
                .enumerate()
                .map(|(i, ((m, q), n))| format!("{i} {m:.3} {q:.3} {n:.3}"))
                .collect();
            std::fs::write(path, lines.join("\n")).expect("latencies");
        }
        for v in [&mut match_ms, &mut pdq_ms, &mut pdq_name_ms] {
            v.sort_by(f64::total_cmp);
        }
        println!("$match latency: p50 {:.2} ms, p99 {:.2} ms ({queries} queries)", percentile(&match_ms, 0.5), percentile(&match_ms, 0.99));
        println!("PDQm latency (family+birthdate): p50 {:.2} ms, p99 {:.2} ms", percentile(&pdq_ms, 0.5), percentile(&pdq_ms, 0.99));
        println!("PDQm latency (family alone): p50 {:.2} ms, p99 {:.2} ms", percentile(&pdq_name_ms, 0.5), percentile(&pdq_name_ms, 0.99));
    });
    println!(
        "broker memory: RSS {}, peak {}",
        proc_status(child.0.id(), "VmRSS:"),
        proc_status(child.0.id(), "VmHWM:")
    );
    drop(child);
    if db_url.starts_with("sqlite") {
        println!(
            "database size: {:.0} MiB (SQLite file + WAL)",
            dir_size(&root.join("data")) as f64 / 1048576.0
        );
    } else {
        use diesel::{Connection, RunQueryDsl};
        #[derive(diesel::QueryableByName)]
        struct Size {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            size: i64,
        }
        let mut c = diesel::PgConnection::establish(&db_url).expect("pg");
        let s: Size = diesel::sql_query("SELECT pg_database_size(current_database()) AS size")
            .get_result(&mut c)
            .expect("size");
        println!(
            "database size: {:.0} MiB (PostgreSQL)",
            s.size as f64 / 1048576.0
        );
    }
}

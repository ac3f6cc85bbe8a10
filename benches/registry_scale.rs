//! The document registry at scale: N registered documents (5 per patient, through the real
//! ITI-65 validation and registration code, 500 submissions per transaction), then ITI-67 find
//! latency over mutual TLS against the running broker, for random patients.
//!
//!   cargo bench --bench registry_scale -- [--documents N] [--queries Q] [--database-url URL]
//!
//! Patients are written straight into the MPI tables (this measures the registry, not matching;
//! `mpi_scale` measures that). With --database-url postgres://… the database must be empty.

mod support;

use diesel::connection::SimpleConnection;
use serde_json::{json, Value};
use std::time::Instant;
use support::{arg, client, enroll, machine, percentile, start};

use hie_broker::audit::Actor;
use hie_broker::certs::Authority;
use hie_broker::config::DatabaseConfig;
use hie_broker::db::{self, Db};
use hie_broker::ids::OrgId;

const DOCS_PER_PATIENT: usize = 5;
const CATEGORIES: [&str; 4] = ["11502-2", "18842-5", "11506-3", "34133-9"];

fn submission(patient: usize, base: &str) -> Value {
    let subject =
        json!({ "identifier": { "system": "urn:bench:h", "value": format!("P{patient}") } });
    let mut entries = vec![json!({
        "fullUrl": "urn:uuid:set",
        "resource": {
            "resourceType": "List",
            "identifier": [{ "use": "usual", "value": format!("urn:bench:set:{patient}") }],
            "status": "current", "mode": "working",
            "code": { "coding": [{ "system": hie_broker::registry::LIST_TYPES, "code": "submissionset" }] },
            "subject": subject, "date": "2026-11-01T00:00:00Z",
            "entry": (0..DOCS_PER_PATIENT).map(|d| json!({ "item": { "reference": format!("urn:uuid:d{d}") } })).collect::<Vec<_>>()
        },
        "request": { "method": "POST", "url": "List" }
    })];
    for d in 0..DOCS_PER_PATIENT {
        let category = CATEGORIES[(patient + d) % CATEGORIES.len()];
        entries.push(json!({
            "fullUrl": format!("urn:uuid:d{d}"),
            "resource": {
                "resourceType": "DocumentReference",
                "masterIdentifier": { "value": format!("urn:bench:doc:{patient}:{d}") },
                "status": "current",
                "type": { "coding": [{ "system": "http://loinc.org", "code": category }] },
                "category": [{ "coding": [{ "system": "http://loinc.org", "code": category }] }],
                "subject": subject,
                "date": format!("20{:02}-{:02}-{:02}T10:00:00Z", 15 + d, 1 + patient % 12, 1 + patient % 28),
                "securityLabel": [{ "coding": [{ "system": hie_broker::registry::CONFIDENTIALITY, "code": "N" }] }],
                "content": [{
                    "attachment": { "contentType": "application/pdf", "url": format!("{base}/Binary/{patient}-{d}.pdf"),
                                    "size": 102400, "hash": "2jmj7l5rSw0yVb/vlWAYkK/YBwk=" },
                    "format": { "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient" }
                }]
            },
            "request": { "method": "POST", "url": "DocumentReference" }
        }));
    }
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

fn main() {
    hie_broker::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = arg(&args, "--documents")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let queries: usize = arg(&args, "--queries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let patients = n.div_ceil(DOCS_PER_PATIENT);
    let work = tempfile::tempdir().expect("tempdir");
    let db_url = arg(&args, "--database-url")
        .unwrap_or_else(|| format!("sqlite://{}", work.path().join("data/hie.db").display()));
    let certs = work.path().join("certs");
    Authority::init(&certs, "Bench HIE", &["localhost".into()], false).expect("certs");
    let config = work.path().join("hie.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[database]\nurl = \"{db_url}\"\npool_size = 8\n\
             [certs]\ndir = \"{}\"\n[rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n[log]\nfilter = \"warn\"\n",
            certs.display()
        ),
    )
    .expect("config");
    let base = "https://localhost:1/fhir";
    for (org, system) in [
        ("bench-hospital", "urn:bench:h"),
        ("bench-clinic", "urn:bench:c"),
    ] {
        enroll(&config, &certs, org, "hospital", Some(system), Some(base));
    }
    let db = Db::open(&DatabaseConfig {
        url: db_url.clone(),
        pool_size: 2,
        connect_timeout_ms: 10_000,
        busy_timeout_ms: 10_000,
    })
    .expect("db");
    let mut conn = db.get().expect("conn");
    let started = Instant::now();
    for chunk in (1..=patients).collect::<Vec<_>>().chunks(10_000) {
        let mut ids = String::from(
            "INSERT INTO identities (id, status, golden, created_at, updated_at) VALUES ",
        );
        let mut recs = String::from(
            "INSERT INTO source_records (id, org_id, system, value, enterprise_id, status, link_kind, version, resource, demographics, created_at, updated_at) VALUES ",
        );
        for (k, p) in chunk.iter().enumerate() {
            let sep = if k == 0 { "" } else { "," };
            ids.push_str(&format!("{sep}({p}, 'active', '{{}}', 0, 0)"));
            recs.push_str(&format!(
                "{sep}({p}, 'bench-hospital', 'urn:bench:h', 'P{p}', {p}, 'active', 'new', 1, '{{}}', '{{}}', 0, 0)"
            ));
        }
        conn.batch_execute(&format!("{ids}; {recs};"))
            .expect("patients");
    }
    println!(
        "{patients} patients written in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let org = hie_broker::orgs::get(&mut conn, &OrgId::parse("bench-hospital").expect("id"))
        .expect("org")
        .expect("org exists");
    let actor = Actor {
        org_id: Some(org.id.clone()),
        ..Actor::default()
    };
    let started = Instant::now();
    let mut done = 0usize;
    for chunk in (1..=patients).collect::<Vec<_>>().chunks(500) {
        db::write_tx(&mut conn, |c| {
            for p in chunk {
                let plan = hie_broker::registry::plan(&submission(*p, base), &org, base)?;
                hie_broker::registry::register(
                    c,
                    &plan,
                    &org,
                    &actor,
                    hie_broker::time::now_micros(),
                )?;
            }
            Ok(())
        })
        .expect("register");
        done += chunk.len() * DOCS_PER_PATIENT;
        if done % 100_000 == 0 {
            println!(
                "  {done} documents, {:.0} documents/s",
                done as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "registered {done} documents ({patients} submissions) in {secs:.0} s: {:.0} documents/s through registry::register",
        done as f64 / secs
    );
    if db_url.starts_with("postgres") {
        conn.batch_execute("ANALYZE").expect("analyze");
    }
    drop(conn);
    drop(db);

    let (_broker, port) = start(&config, &["serve"]);
    let fhir = format!("https://localhost:{port}/fhir");
    let dir = certs.join("orgs").join("bench-clinic");
    let client = client(
        &certs.join("ca.crt"),
        &dir.join("client.crt"),
        &dir.join("client.key"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut rng = fastrand::Rng::with_seed(7);
        for (label, extra) in [("patient.identifier", ""), ("patient.identifier + category + date", "&category=http://loinc.org|11502-2&date=ge2016-01-01")] {
            let mut ms = Vec::with_capacity(queries);
            let mut found = 0usize;
            for i in 0..queries + 50 {
                let p = rng.usize(1..=patients);
                let url = format!("{fhir}/DocumentReference?patient.identifier=urn:bench:h|P{p}{extra}");
                let t = Instant::now();
                let resp = client
                    .get(&url)
                    .header("X-Purpose-Of-Use", "TREAT")
                    .send()
                    .await
                    .expect("search");
                assert_eq!(resp.status().as_u16(), 200);
                let body: Value = resp.json().await.expect("json");
                if i >= 50 {
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    found += body["total"].as_u64().unwrap_or(0) as usize;
                }
            }
            ms.sort_by(|a, b| a.total_cmp(b));
            println!(
                "ITI-67 find by {label}: p50 {:.2} ms, p99 {:.2} ms ({queries} sequential queries, {:.1} documents per answer)",
                percentile(&ms, 0.5),
                percentile(&ms, 0.99),
                found as f64 / queries as f64
            );
        }
    });
    println!("machine: {}", machine());
}

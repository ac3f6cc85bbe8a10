//! Record locator and federated query across several real member servers (`hie member-sim`
//! processes with their own certificates), over mutual TLS, on SQLite and PostgreSQL.

mod common;

use common::{assert_valid_fhir, Backend, Exchange, MemberSim};
use hie_broker::synth::{to_patient, Generator, RecordKind};
use serde_json::Value;

const HOSP: &str = "urn:oid:2.16.840.1.113883.3.1";
const LAB: &str = "urn:oid:2.16.840.1.113883.3.2";
const SLOW: &str = "urn:oid:2.16.840.1.113883.3.3";
const BROKEN: &str = "urn:oid:2.16.840.1.113883.3.4";
const BIG: &str = "urn:oid:2.16.840.1.113883.3.5";

const CONFIG: &str = "[federation]\ndeadline_ms = 2500\nemergency_deadline_ms = 500\nbreaker_failures = 2\nbreaker_cooldown_ms = 4000\nmax_response_bytes = 20000\n";

struct Region {
    ex: Exchange,
    hospital: reqwest::Client,
    lab: reqwest::Client,
    sims: Vec<MemberSim>,
}

fn ndjson(values: &[Value]) -> String {
    values.iter().map(|v| v.to_string() + "\n").collect()
}

/// One person held by five members: a hospital, a lab, a slow clinic (1 s), a broken
/// pharmacy (answers that are not JSON) and a clinic whose answers are too large.
fn region(backend: &Backend) -> (Region, Value) {
    let ex = Exchange::start_with(backend, CONFIG);
    let mut g = Generator::new(42);
    let person = g.person();
    let mut sims = Vec::new();
    let mut clients = Vec::new();
    let members: [(&str, &str, &str, RecordKind, &[&str]); 5] = [
        (
            "general-hospital",
            "hospital",
            HOSP,
            RecordKind::Hospital,
            &[],
        ),
        ("city-lab", "lab", LAB, RecordKind::Lab, &[]),
        (
            "slow-clinic",
            "clinic",
            SLOW,
            RecordKind::Lab,
            &["--delay-ms", "1000"],
        ),
        (
            "broken-pharmacy",
            "pharmacy",
            BROKEN,
            RecordKind::Lab,
            &["--fault", "invalid-json"],
        ),
        ("big-clinic", "clinic", BIG, RecordKind::Lab, &[]),
    ];
    for (i, (id, kind, system, records, args)) in members.iter().enumerate() {
        let mrn = format!("M{i}-{}", person.id);
        let mut resources = Vec::new();
        let rounds = if *id == "big-clinic" { 40 } else { 1 };
        for _ in 0..rounds {
            resources.extend(g.records(*records, system, &mrn, &format!("r{}", resources.len())));
        }
        let patient = to_patient(&person, system, &mrn);
        let files = [
            ("patients.ndjson", ndjson(std::slice::from_ref(&patient))),
            ("resources.ndjson", ndjson(&resources)),
        ];
        let (creds, sim) = ex.enroll_with_sim(id, kind, system, args, &files);
        clients.push((ex.client(&creds), system.to_string(), mrn, patient));
        sims.push(sim);
    }
    let rt_clients: Vec<reqwest::Client> = clients.iter().map(|c| c.0.clone()).collect();
    let feeds: Vec<(reqwest::Client, String, String, Value)> = clients;
    let region = Region {
        hospital: rt_clients[0].clone(),
        lab: rt_clients[1].clone(),
        ex,
        sims,
    };
    (
        region,
        Value::Array(
            feeds
                .into_iter()
                .map(|(_, s, m, p)| serde_json::json!([s, m, p]))
                .collect(),
        ),
    )
}

async fn get(client: &reqwest::Client, url: &str, purpose: &str) -> (u16, Value) {
    let resp = client
        .get(url)
        .header("X-Purpose-Of-Use", purpose)
        .header("X-User-Id", "dr-test")
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn feed_all(r: &Region, feeds: &Value) {
    let clients = [&r.hospital, &r.lab];
    for (i, f) in feeds
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let (system, mrn, patient) = (
            f[0].as_str().unwrap_or_default(),
            f[1].as_str().unwrap_or_default(),
            &f[2],
        );
        // Every member feeds its own record with its own certificate.
        let creds = r.ex.creds(&r.sims[i].org);
        let client = if i < 2 {
            clients[i].clone()
        } else {
            r.ex.client(&creds)
        };
        let resp = client
            .put(r.ex.url(&format!("Patient?identifier={system}|{mrn}")))
            .header("X-Purpose-Of-Use", "TREAT")
            .header("Content-Type", "application/fhir+json")
            .body(patient.to_string())
            .send()
            .await
            .expect("feed");
        assert!(resp.status().is_success(), "feed {mrn}: {}", resp.status());
    }
}

fn warnings(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["search"]["mode"] == "outcome")
                .map(|x| {
                    x["resource"]["issue"][0]["diagnostics"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn sources(bundle: &Value) -> Vec<String> {
    let mut s: Vec<String> = bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["search"]["mode"] == "match")
                .filter_map(|x| {
                    x["resource"]["meta"]["tag"][0]["code"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    s.sort();
    s.dedup();
    s
}

async fn federated_query(backend: Backend) {
    let (mut r, feeds) = region(&backend);
    feed_all(&r, &feeds).await;
    let hosp_mrn = feeds[0][1].as_str().unwrap_or_default().to_string();
    let who = format!("patient.identifier={HOSP}|{hosp_mrn}");

    // The record locator names every member holding the person, with their endpoints.
    let (status, located) = get(
        &r.hospital,
        &r.ex
            .url(&format!("Patient/$locate?identifier={HOSP}|{hosp_mrn}")),
        "TREAT",
    )
    .await;
    assert_eq!(status, 200, "{located}");
    assert_eq!(located["total"], 5, "{located}");
    assert_valid_fhir(&located);
    let (status, _) = get(
        &r.hospital,
        &r.ex.url("Patient/$locate?identifier=urn:nobody|x"),
        "TREAT",
    )
    .await;
    assert_eq!(status, 404);

    // Observations from everyone else, each member asked with its own identifier; the broken and
    // the oversized member are warnings in the same Bundle and the rest still arrives, the slow
    // clinic too (1 s, within the 2.5 s deadline).
    let (status, b) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "TREAT",
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_valid_fhir(&b);
    assert_eq!(
        sources(&b),
        vec!["city-lab".to_string(), "slow-clinic".to_string()],
        "{b}"
    );
    let w = warnings(&b).join("\n");
    assert!(
        w.contains("'broken-pharmacy' sent an answer that is not JSON"),
        "{w}"
    );
    assert!(w.contains("'big-clinic' sent more than 20000 bytes"), "{w}");
    assert!(
        !w.contains("general-hospital"),
        "the requester is not asked about its own records: {w}"
    );
    let first = b["entry"]
        .as_array()
        .and_then(|e| e.first())
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(first["resource"]["resourceType"], "Observation");
    assert_eq!(
        first["resource"]["meta"]["source"].as_str(),
        Some(r.sims[1].base.as_str())
    );
    assert!(first["fullUrl"]
        .as_str()
        .unwrap_or_default()
        .starts_with(&r.sims[1].base));

    // An emergency department (ETREAT) gets what arrives within its shorter deadline (0.5 s):
    // the slow clinic is a timeout warning there.
    let er = r.ex.client(&r.ex.enroll("county-er", "emergency", &[]));
    let (status, b) = get(
        &er,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "ETREAT",
    )
    .await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(sources(&b), vec!["city-lab".to_string()], "{b}");
    assert!(
        warnings(&b)
            .join("\n")
            .contains("'slow-clinic' did not answer"),
        "{b}"
    );

    // $everything for the lab: the hospital's allergies, conditions, medications, immunizations.
    let (status, all) = get(
        &r.lab,
        &r.ex.url(&format!(
            "federated/Patient/$everything?patient.identifier={LAB}|{}",
            feeds[1][1].as_str().unwrap_or_default()
        )),
        "TREAT",
    )
    .await;
    assert_eq!(status, 200, "{all}");
    assert_valid_fhir(&all);
    let types: std::collections::BTreeSet<String> = all["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["search"]["mode"] == "match")
                .filter_map(|x| x["resource"]["resourceType"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for t in [
        "Condition",
        "MedicationStatement",
        "Immunization",
        "Encounter",
    ] {
        assert!(types.contains(t), "{t} missing from {types:?}");
    }

    // The circuit breaker: the broken pharmacy has now failed twice in a row, so it is skipped
    // (and the answer says so) ...
    let (_, b) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "TREAT",
    )
    .await;
    let w = warnings(&b).join("\n");
    assert!(w.contains("'broken-pharmacy' skipped"), "{w}");
    // ... until it has recovered and the cooldown has passed: one trial request closes it.
    r.sims[3].restart(&[]);
    std::thread::sleep(std::time::Duration::from_millis(4200));
    let (_, b) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "TREAT",
    )
    .await;
    assert!(sources(&b).contains(&"broken-pharmacy".to_string()), "{b}");
    let (_, b) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "TREAT",
    )
    .await;
    assert!(sources(&b).contains(&"broken-pharmacy".to_string()), "{b}");

    // A member that is down: a warning, and the others still answer.
    r.sims[1].kill();
    let (status, b) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}")),
        "TREAT",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        warnings(&b)
            .join("\n")
            .contains("'city-lab' could not be reached"),
        "{b}"
    );
    assert!(sources(&b).contains(&"broken-pharmacy".to_string()), "{b}");

    // Bad requests.
    let (status, _) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Binary?{who}")),
        "TREAT",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(&r.hospital, &r.ex.url("federated/Observation"), "TREAT").await;
    assert_eq!(status, 400);
    let (status, _) = get(
        &r.hospital,
        &r.ex
            .url("federated/Observation?patient.identifier=urn:x|nobody"),
        "TREAT",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get(
        &r.hospital,
        &r.ex.url(&format!("federated/Observation?{who}&secret=1")),
        "TREAT",
    )
    .await;
    assert_eq!(status, 400);

    // Every forward is on the record, with what it disclosed or why it failed.
    let ops = r.ex.client(&r.ex.enroll("exchange-ops", "operator", &[]));
    let (status, audit) = get(
        &ops,
        &r.ex.url("AuditEvent?subtype=federated-query&_count=200"),
        "HOPERAT",
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let text = audit.to_string();
    assert!(text.contains("resources disclosed"), "{text}");
    assert!(text.contains("Organization/city-lab"), "{text}");
    assert!(text.contains("not JSON"), "{text}");
}
on_both_backends!(federated_query);

/// `hie member-sim --feed`: a member feeds its patients and registers its documents itself,
/// then serves them; another member finds and retrieves them through the broker.
async fn member_sim_feeds_the_broker(backend: Backend) {
    use std::io::BufRead;
    let ex = Exchange::start(&backend);
    let hospital = ex.client(&ex.enroll(
        "general-hospital",
        "hospital",
        &["--identifier-system", HOSP],
    ));
    ex.hie_ok(&[
        "certs",
        "issue",
        "--org",
        "city-lab",
        "--server-name",
        "localhost",
    ]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let cert = ex.creds("city-lab").cert.to_string_lossy().into_owned();
    ex.hie_ok(&[
        "org",
        "add",
        "--id",
        "city-lab",
        "--name",
        "City Lab",
        "--type",
        "lab",
        "--cert",
        &cert,
        "--identifier-system",
        LAB,
    ]);
    // The endpoint is registered (or changed) after onboarding; only https is accepted.
    let refused = ex.hie(&[
        "org",
        "set-endpoint",
        "city-lab",
        "--fhir-base",
        "http://localhost/fhir",
    ]);
    assert!(!refused.status.success());
    ex.hie_ok(&[
        "org",
        "set-endpoint",
        "city-lab",
        "--fhir-base",
        &format!("https://localhost:{port}/fhir"),
    ]);
    let data = tempfile::tempdir().expect("tempdir");
    let mut g = Generator::new(9);
    let people: Vec<Value> = (0..3)
        .map(|i| to_patient(&g.person(), LAB, &format!("L-{i}")))
        .collect();
    std::fs::write(data.path().join("patients.ndjson"), ndjson(&people)).expect("patients");
    std::fs::create_dir_all(data.path().join("documents")).expect("dir");
    std::fs::write(
        data.path().join("documents/cbc-1.txt"),
        "CBC (synthetic): normal",
    )
    .expect("doc");
    std::fs::write(
        data.path().join("documents.ndjson"),
        "{\"file\":\"cbc-1.txt\",\"patient\":\"L-1\",\"code\":\"11502-2\",\"display\":\"Laboratory report\"}\n",
    )
    .expect("documents.ndjson");
    let mut child = std::process::Command::new(common::HIE)
        .args([
            "--config",
            &ex.config_path.to_string_lossy(),
            "member-sim",
            "--org",
            "city-lab",
        ])
        .args([
            "--data",
            &data.path().to_string_lossy(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(["--feed", &ex.base])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("member-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let fed = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("registered"))
        .unwrap_or_default();
    std::thread::spawn(move || for _ in lines {});
    assert!(
        fed.contains("fed 3 patients and registered 1 documents"),
        "{fed}"
    );
    let (status, docs) = get(
        &hospital,
        &ex.url(&format!("DocumentReference?patient.identifier={LAB}|L-1")),
        "TREAT",
    )
    .await;
    assert_eq!(
        (status, docs["total"].clone()),
        (200, serde_json::json!(1)),
        "{docs}"
    );
    let url = docs["entry"][0]["resource"]["content"][0]["attachment"]["url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let bytes = hospital
        .get(&url)
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
        .expect("retrieve");
    assert_eq!(
        bytes.text().await.unwrap_or_default(),
        "CBC (synthetic): normal"
    );
    let _ = child.kill();
    let _ = child.wait();
}
on_both_backends!(member_sim_feeds_the_broker);

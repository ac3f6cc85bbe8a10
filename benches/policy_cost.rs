//! The cost of consent enforcement on the read path: the same PDQm and `$match` searches before
//! and after consent directives are recorded for half of the people.
//!
//!   cargo bench --bench policy_cost -- [--people N] [--queries Q]

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::time::Instant;
use support::{arg, client, enroll, hie, machine, percentile, start};

use hie_broker::synth::{to_patient, Generator};

fn main() {
    hie_broker::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = arg(&args, "--people")
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let queries: usize = arg(&args, "--queries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let work = tempfile::tempdir().expect("tempdir");
    let certs = work.path().join("certs");
    hie_broker::certs::Authority::init(&certs, "Bench HIE", &["localhost".into()], false)
        .expect("certs");
    let config = work.path().join("hie.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[database]\nurl = \"sqlite://{}\"\n[certs]\ndir = \"{}\"\n\
             [rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n[log]\nfilter = \"warn\"\n",
            work.path().join("hie.db").display(),
            certs.display()
        ),
    )
    .expect("config");
    for (org, kind, system) in [
        ("hospital", "hospital", Some("urn:bench:h")),
        ("lab", "lab", Some("urn:bench:l")),
        ("ops", "operator", None),
    ] {
        enroll(&config, &certs, org, kind, system, None);
    }
    let mut g = Generator::new(11);
    let people: Vec<_> = (0..n).map(|_| g.person()).collect();
    let file = work.path().join("h.ndjson");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&file).expect("file"));
    for (i, p) in people.iter().enumerate() {
        writeln!(f, "{}", to_patient(p, "urn:bench:h", &format!("H{i}"))).expect("write");
    }
    drop(f);
    hie(
        &config,
        &["import", "--org", "hospital", &file.to_string_lossy()],
    );
    let (_broker, port) = start(&config, &["serve"]);
    let base = format!("https://localhost:{port}/fhir");
    let ca = certs.join("ca.crt");
    let c = |org: &str| {
        client(
            &ca,
            &certs.join("orgs").join(org).join("client.crt"),
            &certs.join("orgs").join(org).join("client.key"),
        )
    };
    let (lab, ops) = (c("lab"), c("ops"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let run = |label: &'static str, picks: Vec<usize>| {
            let lab = lab.clone();
            let base = base.clone();
            let people = &people;
            async move {
                let (mut pdq, mut broad, mut matching) = (Vec::new(), Vec::new(), Vec::new());
                for (k, i) in picks.iter().enumerate() {
                    let p = &people[*i];
                    let t = Instant::now();
                    let r = lab.get(format!("{base}/Patient?family={}&birthdate={}", p.family, p.birth_date)).header("X-Purpose-Of-Use", "TREAT").send().await.expect("pdq");
                    assert!(r.status().is_success());
                    let _ = r.bytes().await;
                    let a = t.elapsed().as_secs_f64() * 1000.0;
                    let t = Instant::now();
                    let r = lab.get(format!("{base}/Patient?family={}&_count=20", &p.family[..3.min(p.family.len())])).header("X-Purpose-Of-Use", "TREAT").send().await.expect("pdq");
                    assert!(r.status().is_success());
                    let _ = r.bytes().await;
                    let b = t.elapsed().as_secs_f64() * 1000.0;
                    let body = json!({ "resourceType": "Parameters", "parameter": [{ "name": "resource", "resource": { "resourceType": "Patient", "name": [{ "family": p.family, "given": [p.given] }], "birthDate": p.birth_date } }] });
                    let t = Instant::now();
                    let r = lab.post(format!("{base}/Patient/$match")).header("X-Purpose-Of-Use", "TREAT").header("Content-Type", "application/fhir+json").body(body.to_string()).send().await.expect("match");
                    assert!(r.status().is_success());
                    let _ = r.bytes().await;
                    let m = t.elapsed().as_secs_f64() * 1000.0;
                    if k >= 50 {
                        pdq.push(a);
                        broad.push(b);
                        matching.push(m);
                    }
                }
                for v in [&mut pdq, &mut broad, &mut matching] {
                    v.sort_by(|a, b| a.total_cmp(b));
                }
                let p50 = |v: &Vec<f64>| percentile(v, 0.5);
                println!(
                    "  {label:<44} PDQm family+birthdate p50 {:.3} ms | PDQm family prefix (broad) p50 {:.3} ms | $match p50 {:.3} ms",
                    p50(&pdq), p50(&broad), p50(&matching)
                );
                (p50(&pdq), p50(&broad), p50(&matching))
            }
        };
        let mut rng = fastrand::Rng::with_seed(3);
        let even: Vec<usize> = (0..queries + 50).map(|_| rng.usize(0..n / 2) * 2).collect();
        let odd: Vec<usize> = (0..queries + 50).map(|_| rng.usize(0..n / 2) * 2 + 1).collect();
        println!("machine: {}; {n} people, {queries} queries per row, sequential, kept-alive mTLS", machine());
        run("(warm-up)", odd.clone()).await;
        let before = run("no directives anywhere", even.clone()).await;
        // Directives for every odd-numbered person: opt-outs, organisation denials, restrictions.
        let t = Instant::now();
        for i in (1..n).step_by(2) {
            let provision = match i % 6 {
                1 => json!({ "type": "deny" }),
                3 => json!({ "type": "deny", "actor": [{ "reference": { "reference": "Organization/lab" } }] }),
                _ => json!({ "type": "deny", "securityLabel": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY" }] }),
            };
            let consent: Value = json!({ "resourceType": "Consent", "status": "active", "patient": { "identifier": { "system": "urn:bench:h", "value": format!("H{i}") } }, "provision": provision });
            let r = ops.post(format!("{base}/Consent")).header("X-Purpose-Of-Use", "HOPERAT").header("Content-Type", "application/fhir+json").body(consent.to_string()).send().await.expect("consent");
            assert_eq!(r.status().as_u16(), 201);
        }
        println!("  ({} directives recorded in {:.1} s)", n / 2, t.elapsed().as_secs_f64());
        let after_clean = run("directives present; people without them", even).await;
        let after_dir = run("directives present; people with them", odd).await;
        let ratio = |a: f64, b: f64| (a / b - 1.0) * 100.0;
        println!(
            "overhead vs no directives (p50): people without directives {:+.1} % / {:+.1} % / {:+.1} %; people with directives {:+.1} % / {:+.1} % / {:+.1} %",
            ratio(after_clean.0, before.0), ratio(after_clean.1, before.1), ratio(after_clean.2, before.2),
            ratio(after_dir.0, before.0), ratio(after_dir.1, before.1), ratio(after_dir.2, before.2)
        );
    });
}

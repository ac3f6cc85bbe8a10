//! Federated query cost: (1) the broker's added latency, a federated Observation search for a
//! person one member holds vs the same search sent to that member directly; (2) fan-out to 10
//! members of which one answers late, against the deadline.
//!
//!   cargo bench --bench federation -- [--queries N] [--deadline-ms D]
//!
//! Members are `hie member-sim` processes (mutual TLS, their own certificates) on this machine.

mod support;

use serde_json::Value;
use std::time::Instant;
use support::{arg, client, hie, machine, percentile, start};

use hie_broker::synth::{to_patient, Generator, RecordKind};

const MEMBERS: usize = 10;

fn main() {
    hie_broker::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let queries: usize = arg(&args, "--queries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let deadline_ms: u64 = arg(&args, "--deadline-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let work = tempfile::tempdir().expect("tempdir");
    let certs = work.path().join("certs");
    hie_broker::certs::Authority::init(&certs, "Bench HIE", &["localhost".into()], false)
        .expect("certs");
    let config = work.path().join("hie.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[database]\nurl = \"sqlite://{}\"\n[certs]\ndir = \"{}\"\n\
             [rate_limit]\nrequests_per_second = 1000000\nburst = 1000000\n[federation]\ndeadline_ms = {deadline_ms}\nbreaker_failures = 1000000\n[log]\nfilter = \"warn\"\n",
            work.path().join("hie.db").display(),
            certs.display()
        ),
    )
    .expect("config");

    // Ten members; all hold person A, member 0 alone holds person B; member 9 is slow.
    let mut g = Generator::new(5);
    let (a, b) = (g.person(), g.person());
    let mut sims = Vec::new();
    let mut feeds = Vec::new();
    for i in 0..MEMBERS {
        let org = format!("member-{i}");
        let system = format!("urn:bench:m{i}");
        hie(
            &config,
            &[
                "certs",
                "issue",
                "--org",
                &org,
                "--server-name",
                "localhost",
            ],
        );
        let data = work.path().join(&org);
        std::fs::create_dir_all(&data).expect("data");
        let mut resources = String::new();
        let mut patients = vec![(format!("A{i}"), to_patient(&a, &system, &format!("A{i}")))];
        if i == 0 {
            patients.push(("B0".into(), to_patient(&b, &system, "B0")));
        }
        for (mrn, _) in &patients {
            for r in g.records(RecordKind::Lab, &system, mrn, "obs") {
                resources.push_str(&(r.to_string() + "\n"));
            }
        }
        std::fs::write(data.join("resources.ndjson"), resources).expect("resources");
        let delay = if i == MEMBERS - 1 {
            (deadline_ms * 4).to_string()
        } else {
            "0".into()
        };
        let (sim, port) = start(
            &config,
            &[
                "member-sim",
                "--org",
                &org,
                "--data",
                &data.to_string_lossy(),
                "--delay-ms",
                &delay,
            ],
        );
        let cert = certs.join("orgs").join(&org).join("client.crt");
        hie(
            &config,
            &[
                "org",
                "add",
                "--id",
                &org,
                "--name",
                &org,
                "--type",
                "clinic",
                "--cert",
                &cert.to_string_lossy(),
                "--identifier-system",
                &system,
                "--fhir-base",
                &format!("https://localhost:{port}/fhir"),
            ],
        );
        sims.push((sim, port));
        feeds.push((org, system, patients));
    }
    hie(&config, &["certs", "issue", "--org", "requester"]);
    let cert = certs.join("orgs/requester/client.crt");
    hie(
        &config,
        &[
            "org",
            "add",
            "--id",
            "requester",
            "--name",
            "Requester",
            "--type",
            "hospital",
            "--cert",
            &cert.to_string_lossy(),
        ],
    );
    let (_broker, port) = start(&config, &["serve"]);
    let base = format!("https://localhost:{port}/fhir");
    let ca = certs.join("ca.crt");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        for (org, system, patients) in &feeds {
            let dir = certs.join("orgs").join(org);
            let c = client(&ca, &dir.join("client.crt"), &dir.join("client.key"));
            for (mrn, p) in patients {
                let r = c
                    .put(format!("{base}/Patient?identifier={system}|{mrn}"))
                    .header("X-Purpose-Of-Use", "TREAT")
                    .header("Content-Type", "application/fhir+json")
                    .body(p.to_string())
                    .send()
                    .await
                    .expect("feed");
                assert!(r.status().is_success(), "feed {}", r.status());
            }
        }
        let requester = client(&ca, &certs.join("orgs/requester/client.crt"), &certs.join("orgs/requester/client.key"));
        let broker_cert = client(&ca, &certs.join("client.crt"), &certs.join("client.key"));
        let time = |c: reqwest::Client, url: String| async move {
            let t = Instant::now();
            let r = c.get(&url).header("X-Purpose-Of-Use", "TREAT").send().await.expect("get");
            assert!(r.status().is_success(), "{url}: {}", r.status());
            let b: Value = r.json().await.expect("json");
            (t.elapsed().as_secs_f64() * 1000.0, b)
        };
        // (1) One member: directly vs through the broker, interleaved.
        let direct_url = format!("https://localhost:{}/fhir/Observation?patient.identifier=urn:bench:m0|B0", sims[0].1);
        let broker_url = format!("{base}/federated/Observation?patient.identifier=urn:bench:m0|B0");
        let (mut direct, mut brokered) = (Vec::new(), Vec::new());
        for i in 0..queries + 50 {
            let (d, db) = time(broker_cert.clone(), direct_url.clone()).await;
            let (f, fb) = time(requester.clone(), broker_url.clone()).await;
            if i == 0 {
                assert_eq!(db["total"], fb["total"], "the broker must return what the member holds");
            }
            if i >= 50 {
                direct.push(d);
                brokered.push(f);
            }
        }
        direct.sort_by(|a, b| a.total_cmp(b));
        brokered.sort_by(|a, b| a.total_cmp(b));
        println!("machine: {}", machine());
        println!("one member, Observation search, {queries} sequential queries each (kept-alive mTLS):");
        println!("  member directly:     p50 {:.2} ms, p99 {:.2} ms", percentile(&direct, 0.5), percentile(&direct, 0.99));
        println!("  through the broker:  p50 {:.2} ms, p99 {:.2} ms", percentile(&brokered, 0.5), percentile(&brokered, 0.99));
        println!(
            "  broker overhead:     p50 {:.2} ms, p99 {:.2} ms",
            percentile(&brokered, 0.5) - percentile(&direct, 0.5),
            percentile(&brokered, 0.99) - percentile(&direct, 0.99)
        );
        // (2) Ten members, one of them slower than the deadline.
        let fan_url = format!("{base}/federated/Observation?patient.identifier=urn:bench:m0|A0");
        let mut fan = Vec::new();
        let mut members_answered = 0;
        let rounds = 50;
        for _ in 0..rounds {
            let (ms, b) = time(requester.clone(), fan_url.clone()).await;
            fan.push(ms);
            let warned = b["entry"].as_array().map(|e| e.iter().filter(|x| x["search"]["mode"] == "outcome").count()).unwrap_or(0);
            members_answered += MEMBERS - warned;
        }
        fan.sort_by(|a, b| a.total_cmp(b));
        let max = fan.last().copied().unwrap_or(0.0);
        println!("fan-out to {MEMBERS} members, one answering after {} ms, deadline {deadline_ms} ms, {rounds} queries:", deadline_ms * 4);
        println!(
            "  answer: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; deadline + 20 ms = {} ms -> {}; {:.1} of {} fast members in each answer",
            percentile(&fan, 0.5),
            percentile(&fan, 0.99),
            max,
            deadline_ms + 20,
            if max <= (deadline_ms + 20) as f64 { "met" } else { "MISSED" },
            members_answered as f64 / rounds as f64,
            MEMBERS - 1
        );
    });
}

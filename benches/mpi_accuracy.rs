//! MPI accuracy on the FEBRL record-linkage sets: feeds every record through the real matching
//! path (`mpi::feed`, SQLite) as if it came from a member organisation — originals from one
//! member, duplicates from another — then compares the resulting links with the true links.
//!
//!   cargo bench --bench mpi_accuracy -- [FEBRL_DIR] [--no-ssn | --both] [--tf] [--sets febrl1,febrl2,febrl3]
//!
//! `--tf`: with term frequencies of the set's names, as `hie mpi estimate` would list them.
//!
//! Prints precision, recall and F1 of the linked pairs and the review-queue size.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hie_broker::audit::Actor;
use hie_broker::certs::CertInfo;
use hie_broker::config::Config;
use hie_broker::db::{self, Db};
use hie_broker::ids::{Fingerprint, OrgId};
use hie_broker::mpi::{self, FeedRequest, MpiSettings};
use hie_broker::orgs::{self, NewOrganization, OrgType, Organization};
use serde_json::{json, Value};

const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";

fn org(conn: &mut db::DbConn, id: &str) -> Organization {
    let cert = CertInfo {
        fingerprint: Fingerprint::of_der(id.as_bytes()),
        subject: format!("CN={id}"),
        issuer: "CN=bench".into(),
        serial: id.to_uppercase(),
        not_before: 0,
        not_after: i64::MAX,
    };
    let new = NewOrganization {
        id: OrgId::parse(id).expect("id"),
        name: id.into(),
        org_type: OrgType::Hospital,
        fhir_base: None,
        identifier_systems: vec![format!("urn:{id}")],
    };
    orgs::add(conn, new, &cert, &Actor::cli()).expect("add org")
}

fn patient(row: &HashMap<&str, &str>, system: &str, with_ssn: bool) -> Value {
    let mut ids = vec![json!({ "system": system, "value": row["rec_id"] })];
    if with_ssn && !row["soc_sec_id"].is_empty() {
        ids.push(json!({ "system": SSN, "value": row["soc_sec_id"] }));
    }
    let mut p = json!({ "resourceType": "Patient", "identifier": ids });
    let mut name = json!({});
    if !row["surname"].is_empty() {
        name["family"] = json!(row["surname"]);
    }
    if !row["given_name"].is_empty() {
        name["given"] = json!([row["given_name"]]);
    }
    p["name"] = json!([name]);
    if let Some(d) = mpi::normalize::date(row["date_of_birth"]) {
        p["birthDate"] = json!(d);
    }
    let line = format!("{} {}", row["street_number"], row["address_1"])
        .trim()
        .to_string();
    let mut address = json!({ "line": [line, row["address_2"]] });
    if !row["suburb"].is_empty() {
        address["city"] = json!(row["suburb"]);
    }
    if !row["postcode"].is_empty() {
        address["postalCode"] = json!(row["postcode"]);
    }
    p["address"] = json!([address]);
    p
}

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .map(|l| l.split(',').map(|f| f.trim().to_string()).collect())
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    if a < b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// Term frequencies of given and family names in the set, by the rule `hie mpi estimate`
/// follows (held by at least 5 records and by a larger share than the field's `u`), as an
/// exchange that ran the estimate after an earlier load would have them.
fn term_frequencies(patients: &[Value], settings: &MpiSettings) -> mpi::score::TermFrequencies {
    let mut counts: HashMap<(&str, String), usize> = HashMap::new();
    let mut totals: HashMap<&str, usize> = HashMap::new();
    for p in patients {
        let d = mpi::normalize::Demographics::from_patient(p, &settings.shared_systems);
        for (field, value) in [("given", d.given), ("family", d.family)] {
            if let Some(v) = value {
                *counts.entry((field, v.into_string())).or_default() += 1;
                *totals.entry(field).or_default() += 1;
            }
        }
    }
    let mut out = mpi::score::TermFrequencies::new();
    for ((field, value), n) in counts {
        let share = n as f64 / totals[field] as f64;
        let u = settings.weights.table()[field]["exact"].1;
        if n >= 5 && share > u {
            out.entry(field.to_string())
                .or_default()
                .insert(value, share);
        }
    }
    out
}

fn run(dir: &Path, set: &str, with_ssn: bool, with_tf: bool) {
    let rows = read_csv(&dir.join(format!("{set}.csv")));
    let header: Vec<String> = rows[0].clone();
    let truth: HashSet<(String, String)> = read_csv(&dir.join(format!("{set}_links.csv")))
        .iter()
        .skip(1)
        .filter(|r| r.len() == 2)
        .map(|r| pair(&r[0], &r[1]))
        .collect();

    let work = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load_with_env(None, |_| None).expect("config");
    config.database.url = format!("sqlite://{}", work.path().join("mpi.db").display());
    let mut settings = MpiSettings::from_config(&config).expect("mpi settings");
    let db = Db::open(&config.database).expect("db");
    let mut conn = db.get().expect("conn");
    let originals = org(&mut conn, "org-a");
    let duplicates = org(&mut conn, "org-b");

    let records: Vec<(HashMap<&str, &str>, String, Value)> = rows
        .iter()
        .skip(1)
        .map(|r| {
            let row: HashMap<&str, &str> = header
                .iter()
                .map(String::as_str)
                .zip(r.iter().map(String::as_str))
                .collect();
            let member = if row["rec_id"].contains("-dup-") {
                &duplicates
            } else {
                &originals
            };
            let system = format!("urn:{}", member.id);
            let p = patient(&row, &system, with_ssn);
            (row, system, p)
        })
        .collect();
    if with_tf {
        let patients: Vec<Value> = records.iter().map(|(_, _, p)| p.clone()).collect();
        let tf = term_frequencies(&patients, &settings);
        settings.weights = settings.weights.clone().with_frequencies(tf);
    }

    let started = Instant::now();
    let mut source_of: HashMap<i64, String> = HashMap::new();
    for (row, system, p) in &records {
        let member = if row["rec_id"].contains("-dup-") {
            &duplicates
        } else {
            &originals
        };
        let p = p.clone();
        let system = system.clone();
        let req = FeedRequest {
            system: &system,
            value: row["rec_id"],
            patient: &p,
        };
        let out = mpi::feed(&mut conn, &settings, member, &req, &Actor::cli()).expect("feed");
        source_of.insert(out.source_id, row["rec_id"].to_string());
    }
    let elapsed = started.elapsed();

    // Pairs that ended up in the same enterprise identity.
    let mut groups: HashMap<i64, Vec<String>> = HashMap::new();
    for (sid, rec) in &source_of {
        let row = db::mpi::get_source(&mut conn, *sid)
            .expect("get")
            .expect("row");
        groups
            .entry(row.enterprise_id)
            .or_default()
            .push(rec.clone());
    }
    let mut predicted = HashSet::new();
    for members in groups.values() {
        for i in 0..members.len() {
            for j in i + 1..members.len() {
                predicted.insert(pair(&members[i], &members[j]));
            }
        }
    }
    let tp = predicted.intersection(&truth).count() as f64;
    let precision = if predicted.is_empty() {
        1.0
    } else {
        tp / predicted.len() as f64
    };
    let recall = if truth.is_empty() {
        1.0
    } else {
        tp / truth.len() as f64
    };
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    let open = db::mpi::review_queue_kinds(&mut conn).expect("reviews");
    let reviews = format!("{} potential matches + {} duplicate flags", open.0, open.1);
    println!(
        "{set:<8} ssn={:<5} tf={with_tf:<5} records={:<5} true_pairs={:<5} linked_pairs={:<5} precision={precision:.4} recall={recall:.4} F1={f1:.4} review_queue={reviews} ingest={:.0} rec/s",
        with_ssn,
        rows.len() - 1,
        truth.len(),
        predicted.len(),
        (rows.len() - 1) as f64 / elapsed.as_secs_f64()
    );
    if std::env::var("MPI_ACCURACY_VERBOSE").is_ok() {
        for p in predicted.difference(&truth).take(15) {
            println!("  false link: {} ~ {}", p.0, p.1);
        }
        let by_rec: HashMap<&String, i64> = source_of.iter().map(|(k, v)| (v, *k)).collect();
        for p in truth.difference(&predicted).take(
            if std::env::var("MPI_ACCURACY_VERBOSE").as_deref() == Ok("all") {
                usize::MAX
            } else {
                25
            },
        ) {
            let mut demo = |rec: &String| -> mpi::normalize::Demographics {
                let row = db::mpi::get_source(&mut conn, by_rec[rec])
                    .expect("get")
                    .expect("row");
                serde_json::from_str(&row.demographics).expect("demographics")
            };
            let (a, b) = (demo(&p.0), demo(&p.1));
            let s = mpi::score::score(&a, &b, &settings.weights);
            let fields: Vec<String> = s
                .fields
                .iter()
                .map(|f| format!("{}={}({:.1})", f.field, f.level, f.weight))
                .collect();
            println!(
                "  missed: {} ~ {} total={:.1} hazards={:?} {}",
                p.0,
                p.1,
                s.total,
                s.hazards,
                fields.join(" ")
            );
        }
    }
}

fn main() {
    hie_broker::tls::install_crypto_provider();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let sets_value = args.iter().position(|a| a == "--sets").map(|i| i + 1);
    let dir = args
        .iter()
        .enumerate()
        .find(|(i, a)| !a.starts_with("--") && Some(*i) != sets_value)
        .map(|(_, a)| a)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared/data/febrl"));
    let sets: Vec<String> = args
        .iter()
        .position(|a| a == "--sets")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| vec!["febrl1".into(), "febrl2".into(), "febrl3".into()]);
    let ssn_modes: Vec<bool> = if args.iter().any(|a| a == "--no-ssn") {
        vec![false]
    } else if args.iter().any(|a| a == "--both") {
        vec![true, false]
    } else {
        vec![true]
    };
    if !dir.join("febrl1.csv").exists() {
        eprintln!(
            "FEBRL data not found in {} (pass the directory as the first argument)",
            dir.display()
        );
        std::process::exit(2);
    }
    let with_tf = args.iter().any(|a| a == "--tf");
    for with_ssn in ssn_modes {
        for set in &sets {
            run(&dir, set, with_ssn, with_tf);
        }
    }
}

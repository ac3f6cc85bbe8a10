//! Storage guarantees that everything else relies on, on SQLite and PostgreSQL.

mod common;

use common::Backend;
use hie_broker::audit::Actor;
use hie_broker::certs::CertInfo;
use hie_broker::config::Config;
use hie_broker::db::Db;
use hie_broker::ids::{Fingerprint, OrgId};
use hie_broker::orgs::{self, NewOrganization, OrgQuery, OrgType};
use hie_broker::Error;

fn cert(id: &str) -> CertInfo {
    CertInfo {
        fingerprint: Fingerprint::of_der(id.as_bytes()),
        subject: format!("CN={id}"),
        issuer: "CN=test".into(),
        serial: id.to_uppercase(),
        not_before: 0,
        not_after: i64::MAX,
    }
}

/// A database of the backend's (SQLite: a file in `dir`), migrated.
fn open(backend: &Backend, dir: &std::path::Path) -> Db {
    let mut config = Config::load_with_env(None, |_| None).expect("config");
    config.database.url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("hie.db").display()),
        Backend::Postgres(url) => url.clone(),
    };
    Db::open(&config.database).expect("db")
}

async fn concurrent_writes_commit_together_and_fail_alone(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&backend, dir.path());
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |c| {
                    let id = format!("member-{i}");
                    let new = NewOrganization {
                        id: OrgId::parse(&id)?,
                        name: id.clone(),
                        org_type: OrgType::Clinic,
                        fhir_base: None,
                        identifier_systems: vec![format!("urn:test:{i}")],
                    };
                    orgs::add(c, new, &cert(&id), &Actor::cli())?;
                    // Every third write fails after it has written: none of it may remain.
                    if i % 3 == 0 {
                        return Err(Error::invalid("refused after writing"));
                    }
                    Ok(i)
                })
                .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.message, "refused after writing"),
        }
    }
    assert_eq!(ok, 26);
    let found = db
        .run(|c| orgs::search(c, &OrgQuery::default()))
        .await
        .expect("search");
    assert_eq!(found.len(), 26, "failed writes left nothing behind");
    let number = |id: &str| id.trim_start_matches("member-").parse::<u32>().unwrap_or(0);
    assert!(
        found.iter().all(|o| number(o.id.as_str()) % 3 != 0),
        "only the kept writes remain"
    );
    let mut conn = db.get().expect("conn");
    match hie_broker::cli::verify_chain(&mut conn).expect("verify") {
        hie_broker::audit::Verification::Intact { records, .. } => {
            assert_eq!(records, 26, "one audit record per kept write")
        }
        broken => panic!("{broken:?}"),
    }
}
on_both_backends!(concurrent_writes_commit_together_and_fail_alone);

/// The audit writer appends after the head it wrote last (on PostgreSQL one statement of its
/// own); when that head is gone — a transaction that appended rolled back, as another
/// process's append would move it — it appends in a transaction after the head as it is.
/// Either way every record is chained once, in order.
async fn audit_records_chain_after_a_rolled_back_append(backend: Backend) {
    use hie_broker::audit::{Action, AuditRecord, Auditor};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&backend, dir.path());
    let auditor = Auditor::start(db.clone(), 8, hie_broker::metrics::Metrics::new());
    fn record(n: usize) -> AuditRecord {
        AuditRecord::new(&Actor::cli(), "rest", Action::Read, "read").query(format!("n={n}"))
    }
    let mut seqs = Vec::new();
    for round in 0..3 {
        // Concurrent records, committed in groups.
        let pending: Vec<_> = (0..10)
            .map(|i| {
                let a = auditor.clone();
                let r = record(round * 10 + i);
                tokio::spawn(async move { a.record(r).await })
            })
            .collect();
        for p in pending {
            seqs.push(p.await.expect("task").expect("audited"));
        }
        // An append whose transaction rolls back: the head it wrote never was.
        let refused = db
            .write(|c| {
                hie_broker::db::audit::append(c, &[record(999)])?;
                Err::<(), _>(Error::invalid("rolled back"))
            })
            .await;
        assert!(refused.is_err());
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=30).collect::<Vec<i64>>(),
        "each record chained once, none lost"
    );
    let mut conn = db.get().expect("conn");
    match hie_broker::cli::verify_chain(&mut conn).expect("verify") {
        hie_broker::audit::Verification::Intact { records, .. } => assert_eq!(records, 30),
        broken => panic!("{broken:?}"),
    }
}
on_both_backends!(audit_records_chain_after_a_rolled_back_append);

fn member(c: &mut hie_broker::db::DbConn, id: &str) -> orgs::Organization {
    let new = NewOrganization {
        id: OrgId::parse(id).expect("id"),
        name: id.into(),
        org_type: OrgType::Hospital,
        fhir_base: None,
        identifier_systems: vec![format!("urn:{id}")],
    };
    orgs::add(c, new, &cert(id), &Actor::cli()).expect("add")
}

fn person(
    system: &str,
    mrn: &str,
    given: &str,
    family: &str,
    dob: &str,
    ssn: &str,
) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system, "value": mrn }, { "system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn }],
        "name": [{ "family": family, "given": [given] }],
        "birthDate": dob,
        "address": [{ "line": ["1 Main St"], "postalCode": "11111" }]
    })
}

async fn an_update_refiles_the_record_under_its_new_demographics(backend: Backend) {
    use hie_broker::mpi::{self, FeedRequest, MpiSettings};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load_with_env(None, |_| None).expect("config");
    config.database.url = match &backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("hie.db").display()),
        Backend::Postgres(url) => url.clone(),
    };
    let settings = MpiSettings::from_config(&config).expect("settings");
    let db = Db::open(&config.database).expect("db");
    let mut c = db.get().expect("conn");
    let (a, b) = (member(&mut c, "member-a"), member(&mut c, "member-b"));
    let feed = |c: &mut hie_broker::db::DbConn,
                org: &orgs::Organization,
                mrn: &str,
                p: &serde_json::Value| {
        let system = format!("urn:{}", org.id);
        mpi::feed(
            c,
            &settings,
            org,
            &FeedRequest {
                system: &system,
                value: mrn,
                patient: p,
            },
            &Actor::cli(),
        )
        .expect("feed")
    };
    // Member A first registers the wrong person under A-1, then corrects it.
    feed(
        &mut c,
        &a,
        "A-1",
        &person(
            "urn:member-a",
            "A-1",
            "Oscar",
            "Lindqvist",
            "1944-02-02",
            "111-11-1111",
        ),
    );
    let fixed = feed(
        &mut c,
        &a,
        "A-1",
        &person(
            "urn:member-a",
            "A-1",
            "Priya",
            "Raman",
            "1990-09-09",
            "222-22-2222",
        ),
    );
    assert!(!fixed.created);
    // Member B's Priya links to the corrected record; B's Oscar finds nothing left to link to.
    let priya = feed(
        &mut c,
        &b,
        "B-1",
        &person(
            "urn:member-b",
            "B-1",
            "Priya",
            "Raman",
            "1990-09-09",
            "222-22-2222",
        ),
    );
    assert_eq!(
        (priya.outcome.as_str(), priya.enterprise_id),
        ("linked", fixed.enterprise_id)
    );
    let oscar = feed(
        &mut c,
        &b,
        "B-2",
        &person(
            "urn:member-b",
            "B-2",
            "Oscar",
            "Lindqvist",
            "1944-02-02",
            "111-11-1111",
        ),
    );
    assert_eq!(oscar.outcome, "new-identity");
}
on_both_backends!(an_update_refiles_the_record_under_its_new_demographics);

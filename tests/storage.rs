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

/// PDQm's name and postcode prefixes (`family=smi`) are ranges the columns' indexes answer, on
/// both backends: before, `LIKE 'smi%'` read every record (0.47 s at 1M patients), since
/// neither backend can use a plain index for it here. The search finds exactly the values
/// starting with the prefix, and the plan of each range names its index.
async fn pdqm_prefixes_are_answered_from_their_indexes(backend: Backend) {
    use diesel::prelude::*;
    use hie_broker::db::mpi::{pdq_search, prefix_range, PdqCriteria};
    use hie_broker::db::DbConn;
    use hie_broker::mpi::{self, FeedRequest, MpiSettings};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&backend, dir.path());
    let settings =
        MpiSettings::from_config(&Config::load_with_env(None, |_| None).expect("config"))
            .expect("settings");
    let mut c = db.get().expect("conn");
    let a = member(&mut c, "member-a");
    // Four different people: other given names, birth dates, national ids and addresses.
    let people = [
        ("A-1", "Anna", "Smith", "1950-01-01", "2000"),
        ("A-2", "Boris", "Smithers", "1961-02-02", "2010"),
        ("A-3", "Chen", "Smyth", "1972-03-03", "3020"),
        ("A-4", "Dana", "Asmith", "1983-04-04", "20"),
    ];
    let mut eid = std::collections::HashMap::new();
    for (n, (mrn, given, family, dob, postcode)) in people.iter().enumerate() {
        let p = serde_json::json!({
            "resourceType": "Patient",
            "identifier": [{ "system": "urn:member-a", "value": mrn },
                           { "system": "http://hl7.org/fhir/sid/us-ssn", "value": format!("{n}{n}{n}-0{n}-000{n}") }],
            "name": [{ "family": family, "given": [given] }],
            "birthDate": dob,
            "address": [{ "line": [format!("{n} Other St")], "postalCode": postcode }]
        });
        let r = mpi::feed(
            &mut c,
            &settings,
            &a,
            &FeedRequest {
                system: "urn:member-a",
                value: mrn,
                patient: &p,
            },
            &Actor::cli(),
        )
        .expect("feed");
        assert_eq!(
            r.outcome, "new-identity",
            "{family} is a person of their own"
        );
        eid.insert(*family, r.enterprise_id);
    }
    let found = |c: &mut DbConn, criteria: PdqCriteria| {
        let (mut ids, total) = pdq_search(c, &criteria, 0, 10).expect("search");
        ids.sort_unstable();
        assert_eq!(total, ids.len() as i64);
        ids
    };
    let people_named = |names: &[&str]| {
        let mut ids: Vec<i64> = names.iter().map(|n| eid[n]).collect();
        ids.sort_unstable();
        ids
    };
    let family = found(
        &mut c,
        PdqCriteria {
            family_prefix: Some("smi".into()),
            ..Default::default()
        },
    );
    assert_eq!(family, people_named(&["Smith", "Smithers"]));
    let given = found(
        &mut c,
        PdqCriteria {
            given_prefix: Some("bor".into()),
            ..Default::default()
        },
    );
    assert_eq!(given, people_named(&["Smithers"]));
    let postcode = found(
        &mut c,
        PdqCriteria {
            postcode: Some("20".into()),
            ..Default::default()
        },
    );
    assert_eq!(postcode, people_named(&["Smith", "Smithers", "Asmith"]));
    let whole_name = found(
        &mut c,
        PdqCriteria {
            family_prefix: Some("smithers".into()),
            ..Default::default()
        },
    );
    assert_eq!(whole_name, people_named(&["Smithers"]));

    #[derive(QueryableByName)]
    struct Step {
        #[diesel(sql_type = diesel::sql_types::Text)]
        detail: String,
    }
    for (column, index) in [
        ("family", "source_records_family"),
        ("given", "source_records_given"),
        ("postcode", "source_records_postcode"),
    ] {
        let (from, to) = prefix_range("smi");
        let plan: Vec<Step> = match &mut *c {
            DbConn::Sqlite(s) => diesel::sql_query(format!(
                "EXPLAIN QUERY PLAN SELECT id FROM source_records WHERE {column} >= ? AND {column} < ?"
            ))
            .bind::<diesel::sql_types::Text, _>(&from)
            .bind::<diesel::sql_types::Text, _>(&to)
            .load(s),
            DbConn::Postgresql(pg) => {
                // Four records: PostgreSQL would rather read the table than any index; told
                // not to, it still does when the index cannot answer the range.
                diesel::connection::SimpleConnection::batch_execute(
                    pg,
                    "SET enable_seqscan = off",
                )
                .expect("set");
                diesel::sql_query(format!(
                    "EXPLAIN SELECT id FROM source_records WHERE {column} >= $1 AND {column} < $2"
                ))
                .bind::<diesel::sql_types::Text, _>(&from)
                .bind::<diesel::sql_types::Text, _>(&to)
                .load::<PgPlanLine>(pg)
                .map(|lines| lines.into_iter().map(|l| Step { detail: l.line }).collect())
            }
        }
        .expect("plan");
        let plan: Vec<String> = plan.into_iter().map(|s| s.detail).collect();
        assert!(
            plan.iter().any(|line| line.contains(index)),
            "{column}'s prefix range is answered from {index}: {plan:?}"
        );
    }
    // On PostgreSQL the range holds exactly the values with the prefix only where the column
    // compares bytes, whatever the database's own collation.
    if let DbConn::Postgresql(pg) = &mut *c {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let bytes: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'source_records' \
             AND column_name IN ('family', 'given', 'postcode') AND collation_name = 'C'",
        )
        .get_result(pg)
        .expect("collations");
        assert_eq!(bytes.n, 3, "family, given and postcode compare bytes");
    }
}
on_both_backends!(pdqm_prefixes_are_answered_from_their_indexes);

/// A line of PostgreSQL's `EXPLAIN`.
#[derive(diesel::QueryableByName)]
struct PgPlanLine {
    #[diesel(sql_type = diesel::sql_types::Text, column_name = "QUERY PLAN")]
    line: String,
}

/// On PostgreSQL an initial `hie import` builds PDQm's indexes, the blocking keys' and shared
/// identifiers' primary keys and `source_records`' foreign keys at its end instead of entry by entry:
/// `defer_load_indexes` drops them only while no record is stored, and the next start
/// (`Db::open`, as after a load that stopped midway) or `restore_load_indexes` builds them
/// again as the migrations made them. On SQLite nothing is dropped.
async fn indexes_deferred_for_an_initial_load_come_back(backend: Backend) {
    use diesel::prelude::*;
    use hie_broker::db::mpi::{defer_load_indexes, restore_load_indexes};
    use hie_broker::db::DbConn;
    #[derive(QueryableByName, PartialEq, Debug)]
    struct Def {
        #[diesel(sql_type = diesel::sql_types::Text)]
        def: String,
    }
    let definitions = |c: &mut DbConn| -> Vec<String> {
        let rows: Vec<Def> = match c {
            DbConn::Sqlite(s) => diesel::sql_query(
                "SELECT sql AS def FROM sqlite_master WHERE type = 'index' \
                 AND tbl_name = 'source_records' AND sql IS NOT NULL ORDER BY name",
            )
            .load(s),
            DbConn::Postgresql(pg) => diesel::sql_query(
                "SELECT def FROM (SELECT indexdef AS def FROM pg_indexes \
                 WHERE schemaname = current_schema() \
                 AND tablename IN ('source_records', 'blocking_keys', 'source_identifiers') \
                 UNION ALL SELECT conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
                 WHERE conrelid IN ('source_records'::regclass, 'blocking_keys'::regclass, \
                 'source_identifiers'::regclass)) d \
                 ORDER BY def",
            )
            .load(pg),
        }
        .expect("indexes");
        rows.into_iter().map(|d| d.def).collect()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&backend, dir.path());
    let mut c = db.get().expect("conn");
    let migrated = definitions(&mut c);
    assert!(migrated
        .iter()
        .any(|d| d.contains("source_records_family ")));
    let deferred = defer_load_indexes(&mut c).expect("defer");
    assert_eq!(deferred, matches!(backend, Backend::Postgres(_)));
    let during = definitions(&mut c);
    if deferred {
        // Five indexes, two primary keys (constraint and index), two foreign keys.
        assert_eq!(during.len(), migrated.len() - 11, "{during:?}");
        assert!(!during.iter().any(|d| d.contains("(family)")));
        assert!(!during.iter().any(|d| d.contains("blocking_keys_pkey")));
        assert!(!during.iter().any(|d| d.contains("source_identifiers_pkey")));
        // The identifiers' index by record stays: the online path replaces them by it.
        assert!(during
            .iter()
            .any(|d| d.contains("source_identifiers_source")));
        assert!(!during.iter().any(|d| d.contains("FOREIGN KEY")));
        assert!(migrated
            .iter()
            .any(|d| d.contains("FOREIGN KEY (enterprise_id)")));
    } else {
        assert_eq!(during, migrated);
    }
    // A load that stopped here: the next start builds them.
    drop(c);
    let db = open(&backend, dir.path());
    let mut c = db.get().expect("conn");
    assert_eq!(definitions(&mut c), migrated, "as the migrations made them");
    assert_eq!(restore_load_indexes(&mut c, None).expect("restore"), 0);
    // Built in two lanes, the second on a connection of its own, as `hie import` builds them.
    assert_eq!(defer_load_indexes(&mut c).expect("defer"), deferred);
    let mut helper = db.get().expect("conn");
    let built = restore_load_indexes(&mut c, Some(&mut helper)).expect("restore");
    assert_eq!(built, if deferred { 9 } else { 0 });
    drop(helper);
    assert_eq!(definitions(&mut c), migrated, "built in two lanes");
    // Once anything is stored, a load maintains them as it goes.
    let a = member(&mut c, "member-a");
    let settings = hie_broker::mpi::MpiSettings::from_config(
        &Config::load_with_env(None, |_| None).expect("config"),
    )
    .expect("settings");
    let p = person(
        "urn:member-a",
        "A-1",
        "Anna",
        "Smith",
        "1950-01-01",
        "111-11-1111",
    );
    hie_broker::mpi::feed(
        &mut c,
        &settings,
        &a,
        &hie_broker::mpi::FeedRequest {
            system: "urn:member-a",
            value: "A-1",
            patient: &p,
        },
        &Actor::cli(),
    )
    .expect("feed");
    assert!(!defer_load_indexes(&mut c).expect("defer"));
    assert_eq!(definitions(&mut c), migrated);
}
on_both_backends!(indexes_deferred_for_an_initial_load_come_back);

/// On PostgreSQL the broker's connections that write ask for the page images they log to be
/// compressed (`db::compress_log`): the test role, a superuser, may.
#[tokio::test]
async fn postgres_connections_compress_the_log_they_write() {
    use diesel::RunQueryDsl;
    let Some(backend) = Backend::postgres() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&backend, dir.path());
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        wal_compression: String,
    }
    let mut c = db.get().expect("conn");
    let hie_broker::db::DbConn::Postgresql(pg) = &mut *c else {
        panic!("a PostgreSQL connection");
    };
    let s: Setting = diesel::sql_query("SHOW wal_compression")
        .get_result(pg)
        .expect("show");
    assert_eq!(s.wal_compression, "lz4");
}

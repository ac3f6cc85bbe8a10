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

async fn concurrent_writes_commit_together_and_fail_alone(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::load_with_env(None, |_| None).expect("config");
    config.database.url = match &backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("hie.db").display()),
        Backend::Postgres(url) => url.clone(),
    };
    let db = Db::open(&config.database).expect("db");
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

//! The foundation, end to end over real mutual TLS, on SQLite and PostgreSQL: who gets in,
//! who is refused and how, the audit chain, rate limits, configuration and operations.

mod common;

use common::{Backend, Exchange};
use hie_broker::certs::Validity;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn get(client: &reqwest::Client, url: &str, purpose: Option<&str>) -> reqwest::Response {
    let mut req = client
        .get(url)
        .header("X-User-Id", "dr-test")
        .header("X-User-Role", "physician");
    if let Some(p) = purpose {
        req = req.header("X-Purpose-Of-Use", p);
    }
    req.send().await.expect("request")
}

async fn json(resp: reqwest::Response) -> Value {
    resp.json().await.expect("json body")
}

fn assert_outcome(body: &Value, code: &str, text_contains: &str) {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(body["issue"][0]["code"], code, "{body}");
    let text = body["issue"][0]["diagnostics"].as_str().unwrap_or_default();
    assert!(
        text.contains(text_contains),
        "'{text}' should mention '{text_contains}'"
    );
}

async fn member_reads_the_directory_over_mutual_tls(backend: Backend) {
    let ex = Exchange::start(&backend);
    let hospital = ex.enroll(
        "general-hospital",
        "hospital",
        &[
            "--fhir-base",
            "https://ehr.general.example/fhir",
            "--identifier-system",
            "urn:oid:1.2.3.4",
        ],
    );
    ex.enroll("city-lab", "lab", &[]);
    let client = ex.client(&hospital);

    let meta = get(&client, &ex.url("metadata"), None).await;
    assert_eq!(meta.status(), 200);
    let meta = json(meta).await;
    assert_eq!(meta["resourceType"], "CapabilityStatement");
    assert_eq!(meta["fhirVersion"], "4.0.1");

    let resp = get(&client, &ex.url("Organization"), Some("TREAT")).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-request-id").is_some());
    let bundle = json(resp).await;
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 2);

    let labs = json(get(&client, &ex.url("Organization?type=lab"), Some("TREAT")).await).await;
    assert_eq!(labs["total"], 1);
    assert_eq!(labs["entry"][0]["resource"]["id"], "city-lab");

    let org = json(
        get(
            &client,
            &ex.url("Organization/general-hospital"),
            Some("TREAT"),
        )
        .await,
    )
    .await;
    assert_eq!(org["name"], "general-hospital");
    assert_eq!(org["active"], true);
    assert_eq!(org["endpoint"][0]["reference"], "Endpoint/general-hospital");

    let endpoints = json(get(&client, &ex.url("Endpoint"), Some("TREAT")).await).await;
    assert_eq!(
        endpoints["total"], 1,
        "only members with a FHIR base have an Endpoint"
    );
    assert_eq!(
        endpoints["entry"][0]["resource"]["address"],
        "https://ehr.general.example/fhir"
    );
    assert_eq!(
        endpoints["entry"][0]["resource"]["connectionType"]["code"],
        "hl7-fhir-rest"
    );

    let missing = get(&client, &ex.url("Organization/nobody"), Some("TREAT")).await;
    assert_eq!(missing.status(), 404);
    assert_outcome(&json(missing).await, "not-found", "Organization/nobody");

    let unknown_param = get(&client, &ex.url("Organization?colour=blue"), Some("TREAT")).await;
    assert_eq!(unknown_param.status(), 400);
    assert_outcome(&json(unknown_param).await, "invalid", "colour");
}
on_both_backends!(member_reads_the_directory_over_mutual_tls);

async fn handshake_refuses_missing_foreign_and_expired_certificates(backend: Backend) {
    let ex = Exchange::start(&backend);
    let hospital = ex.enroll("general-hospital", "hospital", &[]);
    assert_eq!(
        get(&ex.client(&hospital), &ex.url("metadata"), None)
            .await
            .status(),
        200
    );

    // No client certificate at all.
    let err = ex
        .client_without_cert()
        .get(ex.url("metadata"))
        .send()
        .await
        .expect_err("no cert must fail");
    assert!(err.is_connect() || err.is_request(), "{err:?}");

    // A certificate from another CA, even for a registered org id.
    let foreign_dir = ex.dir.path().join("foreign");
    hie_broker::certs::Authority::init(&foreign_dir, "Foreign", &["localhost".into()], false)
        .expect("foreign CA");
    let foreign = hie_broker::certs::Authority::load(&foreign_dir).expect("load");
    let org = hie_broker::ids::OrgId::parse("general-hospital").expect("id");
    let out = foreign
        .issue_member(&org, Validity::days(30), &[], "")
        .expect("issue");
    let foreign_client = common::client_for(
        &ex.certs.join("ca.crt"),
        Some((&out.join("client.crt"), &out.join("client.key"))),
    );
    assert!(
        foreign_client.get(ex.url("metadata")).send().await.is_err(),
        "foreign CA must be refused"
    );

    // An expired certificate from our own CA.
    let now = chrono::Utc::now().timestamp();
    let expired = ex.issue_with_validity(
        "expired-clinic",
        Validity {
            not_before_unix: now - 40 * 86_400,
            not_after_unix: now - 86_400,
        },
    );
    assert!(
        ex.client(&expired)
            .get(ex.url("metadata"))
            .send()
            .await
            .is_err(),
        "expired cert must be refused"
    );
}
on_both_backends!(handshake_refuses_missing_foreign_and_expired_certificates);

async fn revoked_certificate_stops_working_without_a_restart(backend: Backend) {
    let ex = Exchange::start(&backend);
    let clinic = ex.enroll("north-clinic", "clinic", &[]);
    let kept_alive = ex.client(&clinic);
    assert_eq!(
        get(&kept_alive, &ex.url("Organization"), Some("TREAT"))
            .await
            .status(),
        200
    );

    ex.hie_ok(&["certs", "revoke", "--cert", &clinic.cert.to_string_lossy()]);

    // The broker notices the new CRL by itself; new connections fail in the handshake and the
    // kept-alive connection is refused per request.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match ex.client(&clinic).get(ex.url("metadata")).send().await {
            Err(_) => break,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(r) => panic!(
                "revoked certificate still accepted after 15 s: {}",
                r.status()
            ),
        }
    }
    if let Ok(resp) = kept_alive
        .get(ex.url("Organization"))
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
    {
        assert_eq!(
            resp.status(),
            403,
            "a kept-alive connection of a revoked certificate must be refused"
        );
    }
}
on_both_backends!(revoked_certificate_stops_working_without_a_restart);

async fn unknown_or_suspended_member_gets_403(backend: Backend) {
    let ex = Exchange::start(&backend);
    let hospital = ex.enroll("general-hospital", "hospital", &[]);
    // Valid certificate of the exchange CA, never enrolled.
    ex.hie_ok(&["certs", "issue", "--org", "stranger"]);
    let stranger = ex.client(&ex.creds("stranger"));
    let resp = get(&stranger, &ex.url("Organization"), Some("TREAT")).await;
    assert_eq!(resp.status(), 403);
    assert_outcome(&json(resp).await, "security", "not registered");

    let client = ex.client(&hospital);
    ex.hie_ok(&["org", "suspend", "general-hospital"]);
    let resp = get(&client, &ex.url("Organization"), Some("TREAT")).await;
    assert_eq!(resp.status(), 403);
    assert_outcome(&json(resp).await, "security", "suspended");
    assert_eq!(get(&client, &ex.url("metadata"), None).await.status(), 403);

    ex.hie_ok(&["org", "activate", "general-hospital"]);
    assert_eq!(
        get(&client, &ex.url("Organization"), Some("TREAT"))
            .await
            .status(),
        200
    );

    // Certificate rotation: a second certificate works alongside the first.
    ex.hie_ok(&["certs", "issue", "--org", "general-hospital-2026"]);
    let new_cert = ex.creds("general-hospital-2026");
    ex.hie_ok(&[
        "org",
        "add-cert",
        "general-hospital",
        "--cert",
        &new_cert.cert.to_string_lossy(),
    ]);
    let rotated = json(
        get(
            &ex.client(&new_cert),
            &ex.url("Organization/general-hospital"),
            Some("TREAT"),
        )
        .await,
    )
    .await;
    assert_eq!(rotated["id"], "general-hospital");
    assert_eq!(
        get(&client, &ex.url("Organization"), Some("TREAT"))
            .await
            .status(),
        200
    );
}
on_both_backends!(unknown_or_suspended_member_gets_403);

async fn reads_need_a_valid_purpose_of_use(backend: Backend) {
    let ex = Exchange::start(&backend);
    let client = ex.client(&ex.enroll("general-hospital", "hospital", &[]));
    let resp = get(&client, &ex.url("Organization"), None).await;
    assert_eq!(resp.status(), 400);
    assert_outcome(&json(resp).await, "invalid", "X-Purpose-Of-Use");
    let resp = get(&client, &ex.url("Organization"), Some("SHOPPING")).await;
    assert_eq!(resp.status(), 400);
    assert_outcome(&json(resp).await, "invalid", "SHOPPING");
    let system_form = "http://terminology.hl7.org/CodeSystem/v3-ActReason|TREAT";
    assert_eq!(
        get(&client, &ex.url("Organization"), Some(system_form))
            .await
            .status(),
        200
    );
}
on_both_backends!(reads_need_a_valid_purpose_of_use);

async fn over_quota_gets_429_and_the_er_keeps_its_emergency_reserve(backend: Backend) {
    let ex = Exchange::start_with(
        &backend,
        "[rate_limit]\nrequests_per_second = 1\nburst = 3\nemergency_requests_per_second = 1\nemergency_burst = 2\n\
         [rate_limit.overrides.big-hospital]\nrequests_per_second = 100\nburst = 50\n",
    );
    let er = ex.client(&ex.enroll("city-er", "emergency", &[]));
    let big = ex.client(&ex.enroll("big-hospital", "hospital", &[]));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let resp = get(&er, &ex.url("Organization"), Some("TREAT")).await;
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            assert!(retry >= 1);
            assert_outcome(&json(resp).await, "throttled", "quota");
            break;
        }
    }
    assert_eq!(
        statuses.last(),
        Some(&429),
        "routine traffic is limited: {statuses:?}"
    );
    let urgent = get(&er, &ex.url("Organization"), Some("ETREAT")).await;
    assert_eq!(urgent.status(), 200, "ETREAT draws from its own reserve");
    for _ in 0..10 {
        assert_eq!(
            get(&big, &ex.url("Organization"), Some("TREAT"))
                .await
                .status(),
            200,
            "per-org override"
        );
    }
}
on_both_backends!(over_quota_gets_429_and_the_er_keeps_its_emergency_reserve);

async fn audit_chain_holds_under_concurrency_and_exposes_tampering(backend: Backend) {
    let ex = Exchange::start(&backend);
    let ops = ex.client(&ex.enroll("exchange-ops", "operator", &[]));
    let members: Vec<_> = ["general-hospital", "city-lab", "city-er"]
        .iter()
        .map(|id| ex.client(&ex.enroll(id, "hospital", &[])))
        .collect();
    let mut tasks = Vec::new();
    for client in &members {
        for _ in 0..25 {
            let client = client.clone();
            let url = ex.url("Organization");
            tasks.push(tokio::spawn(async move {
                get(&client, &url, Some("TREAT")).await.status().as_u16()
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let out = ex.hie_ok(&["audit", "verify"]);
    assert!(out.contains("intact"), "{out}");
    let n: u64 = out
        .split("intact: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("count");
    assert!(
        n >= 75 + 4,
        "every read and every enrollment is audited: {out}"
    );

    // Operators see the trail as AuditEvents; members do not.
    let denied = get(&members[0], &ex.url("AuditEvent"), Some("TREAT")).await;
    assert_eq!(denied.status(), 403);
    let page = json(
        get(
            &ops,
            &ex.url("AuditEvent?agent=city-lab&_count=10"),
            Some("HOPERAT"),
        )
        .await,
    )
    .await;
    let entries = page["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 10);
    assert!(entries
        .iter()
        .all(|e| e["resource"]["agent"][0]["who"]["identifier"]["value"] == "city-lab"));
    assert_eq!(
        entries[0]["resource"]["purposeOfEvent"][0]["coding"][0]["code"],
        "TREAT"
    );
    let next = page["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .expect("next link");
    let next_url = next["url"]
        .as_str()
        .expect("url")
        .replace("127.0.0.1", "localhost");
    let next_url = format!(
        "{}{}",
        ex.base,
        next_url.split("/fhir").nth(1).expect("path")
    );
    let page2 = json(get(&ops, &next_url, Some("HOPERAT")).await).await;
    assert_eq!(page2["entry"].as_array().map(Vec::len), Some(10));

    // The table refuses edits through SQL as long as its guard is in place...
    let guard = if ex.is_sqlite() {
        diesel::Connection::establish(ex.db_url.trim_start_matches("sqlite://"))
            .map(|mut c: diesel::SqliteConnection| {
                diesel::connection::SimpleConnection::batch_execute(
                    &mut c,
                    "UPDATE audit_events SET org_id = 'x' WHERE seq = 7",
                )
            })
            .expect("open")
    } else {
        diesel::Connection::establish(&ex.db_url)
            .map(|mut c: diesel::PgConnection| {
                diesel::connection::SimpleConnection::batch_execute(
                    &mut c,
                    "UPDATE audit_events SET org_id = 'x' WHERE seq = 7",
                )
            })
            .expect("open")
    };
    assert!(guard.is_err(), "audit_events must be append-only");
    // ...and an attacker who removes the guard is caught by the chain.
    if ex.is_sqlite() {
        ex.sql("DROP TRIGGER audit_events_no_update; UPDATE audit_events SET org_id = 'someone-else' WHERE seq = 7;");
    } else {
        ex.sql("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_change; UPDATE audit_events SET org_id = 'someone-else' WHERE seq = 7;");
    }
    let out = ex.hie(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("BROKEN at record 7"), "{text}");
}
on_both_backends!(audit_chain_holds_under_concurrency_and_exposes_tampering);

async fn operator_health_metrics_and_graceful_shutdown(backend: Backend) {
    let mut ex = Exchange::start(&backend);
    let client = ex.client(&ex.enroll(
        "general-hospital",
        "hospital",
        &["--identifier-system", "urn:oid:1.2.3"],
    ));
    assert_eq!(
        get(&client, &ex.url("Organization"), Some("TREAT"))
            .await
            .status(),
        200
    );
    let fed = client
        .put(ex.url("Patient?identifier=urn:oid:1.2.3|1"))
        .header("X-Purpose-Of-Use", "TREAT")
        .body(r#"{"resourceType":"Patient","identifier":[{"system":"urn:oid:1.2.3","value":"1"}],"name":[{"family":"Okafor","given":["Ada"]}],"birthDate":"1980-02-03","gender":"female"}"#)
        .send()
        .await
        .expect("put");
    assert_eq!(fed.status(), 201);
    let _ = ex
        .client_without_cert()
        .get(ex.url("metadata"))
        .send()
        .await;

    let plain = reqwest::Client::new();
    let health = plain
        .get(format!("{}/healthz", ex.admin))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = plain
        .get(format!("{}/readyz", ex.admin))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let metrics = plain
        .get(format!("{}/metrics", ex.admin))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("hie_http_requests_total{status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("hie_audit_records_total"), "{metrics}");
    // The identity feed: one record in one batch, nothing matched again or split.
    for line in [
        "hie_mpi_feed_records_total 1",
        "hie_mpi_feed_batches_total 1",
        "hie_mpi_feed_rematched_batches_total 0",
        "hie_mpi_feed_split_batches_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }

    // In-flight requests finish on SIGTERM and the audit trail is flushed.
    let mut inflight = Vec::new();
    for _ in 0..20 {
        let client = client.clone();
        let url = ex.url("Organization");
        inflight.push(tokio::spawn(async move {
            get(&client, &url, Some("TREAT")).await.status().as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let status = ex.terminate();
    assert!(
        status.success(),
        "broker exits cleanly on SIGTERM: {status:?}"
    );
    assert!(
        ex.output().iter().any(|l| l.contains("stopped")),
        "{:?}",
        ex.output()
    );
    for t in inflight {
        let _ = t.await;
    }
    let out = ex.hie_ok(&["audit", "verify"]);
    assert!(out.contains("intact"), "{out}");
}
on_both_backends!(operator_health_metrics_and_graceful_shutdown);

async fn onboarding_rules_are_enforced(backend: Backend) {
    let ex = Exchange::start(&backend);
    ex.enroll(
        "general-hospital",
        "hospital",
        &["--identifier-system", "urn:oid:1.2.3.4"],
    );
    ex.hie_ok(&["certs", "issue", "--org", "rival-clinic"]);
    let cert = ex.creds("rival-clinic").cert.to_string_lossy().into_owned();
    let base = [
        "org",
        "add",
        "--id",
        "rival-clinic",
        "--name",
        "Rival",
        "--type",
        "clinic",
        "--cert",
        &cert,
    ];

    let taken = ex.hie(&[&base[..], &["--identifier-system", "urn:oid:1.2.3.4"]].concat());
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains("already owned by 'general-hospital'"));

    let bad_type = ex.hie(&[
        "org",
        "add",
        "--id",
        "rival-clinic",
        "--name",
        "R",
        "--type",
        "spa",
        "--cert",
        &cert,
    ]);
    assert!(String::from_utf8_lossy(&bad_type.stderr).contains("not an organisation type"));

    let plain_http =
        ex.hie(&[&base[..], &["--fhir-base", "http://insecure.example/fhir"]].concat());
    assert!(String::from_utf8_lossy(&plain_http.stderr).contains("https://"));

    let reused = ex
        .creds("general-hospital")
        .cert
        .to_string_lossy()
        .into_owned();
    let dup = ex.hie(&[
        "org",
        "add",
        "--id",
        "rival-clinic",
        "--name",
        "R",
        "--type",
        "clinic",
        "--cert",
        &reused,
    ]);
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("already registered to 'general-hospital'")
    );

    // Nothing of the refused attempts was written.
    let list = ex.hie_ok(&["org", "list"]);
    assert!(!list.contains("rival-clinic"), "{list}");
    ex.hie_ok(&base);
    assert!(ex.hie_ok(&["org", "list"]).contains("rival-clinic"));
}
on_both_backends!(onboarding_rules_are_enforced);

async fn two_broker_instances_keep_one_linear_audit_chain(backend: Backend) {
    let mut ex = Exchange::start(&backend);
    let second_base = ex.add_instance();
    let members: Vec<_> = ["general-hospital", "city-lab"]
        .iter()
        .map(|id| ex.client(&ex.enroll(id, "hospital", &[])))
        .collect();
    let mut tasks = Vec::new();
    for (i, client) in members.iter().enumerate() {
        for n in 0..30 {
            let client = client.clone();
            let base = if (i + n) % 2 == 0 {
                ex.base.clone()
            } else {
                second_base.clone()
            };
            tasks.push(tokio::spawn(async move {
                get(&client, &format!("{base}/Organization"), Some("TREAT"))
                    .await
                    .status()
                    .as_u16()
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    let out = ex.hie_ok(&["audit", "verify"]);
    assert!(
        out.contains("intact: 62 record(s)"),
        "60 reads + 2 enrollments from two processes: {out}"
    );
}
on_both_backends!(two_broker_instances_keep_one_linear_audit_chain);

async fn every_refusal_is_an_operation_outcome(backend: Backend) {
    let ex = Exchange::start_with(&backend, "[server]\nbody_limit_bytes = 1000\n");
    let client = ex.client(&ex.enroll(
        "general-hospital",
        "hospital",
        &["--identifier-system", "urn:oid:1.2.3"],
    ));
    let big = format!(
        "{{\"resourceType\":\"Patient\",\"text\":\"{}\"}}",
        "x".repeat(5000)
    );
    let resp = client
        .put(ex.url("Patient?identifier=urn:oid:1.2.3|1"))
        .header("X-Purpose-Of-Use", "TREAT")
        .body(big)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 413);
    assert_outcome(&json(resp).await, "too-costly", "body_limit_bytes");
    let resp = client
        .patch(ex.url("Organization"))
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
        .expect("patch");
    assert!(resp.status().is_client_error());
    assert_eq!(json(resp).await["resourceType"], "OperationOutcome");
    let resp = client
        .get(ex.url("Organization?_count=lots"))
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 400);
    assert_eq!(json(resp).await["resourceType"], "OperationOutcome");
}
on_both_backends!(every_refusal_is_an_operation_outcome);

//! The master patient index over real mutual TLS, on SQLite and PostgreSQL.

mod common;

use common::{Backend, Exchange};
use serde_json::{json, Value};

const HOSP: &str = "urn:oid:2.16.840.1.113883.3.1";
const LAB: &str = "urn:oid:2.16.840.1.113883.3.2";
const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";

struct Region {
    ex: Exchange,
    hospital: reqwest::Client,
    lab: reqwest::Client,
    ops: reqwest::Client,
}

fn region(backend: &Backend) -> Region {
    let ex = Exchange::start(backend);
    let hospital = ex.client(&ex.enroll(
        "general-hospital",
        "hospital",
        &["--identifier-system", HOSP],
    ));
    let lab = ex.client(&ex.enroll("city-lab", "lab", &["--identifier-system", LAB]));
    let ops = ex.client(&ex.enroll("exchange-ops", "operator", &[]));
    Region {
        ex,
        hospital,
        lab,
        ops,
    }
}

#[allow(clippy::too_many_arguments)]
fn patient(
    system: &str,
    mrn: &str,
    given: &str,
    family: &str,
    dob: &str,
    street: &str,
    postcode: &str,
    ssn: Option<&str>,
) -> Value {
    let mut ids = vec![json!({ "system": system, "value": mrn })];
    if let Some(s) = ssn {
        ids.push(json!({ "system": SSN, "value": s }));
    }
    json!({
        "resourceType": "Patient",
        "identifier": ids,
        "name": [{ "family": family, "given": [given] }],
        "birthDate": dob,
        "address": [{ "line": [street], "city": "Springfield", "postalCode": postcode }]
    })
}

async fn put(
    client: &reqwest::Client,
    ex: &Exchange,
    system: &str,
    mrn: &str,
    body: &Value,
) -> (u16, Value, String) {
    let resp = client
        .put(ex.url(&format!("Patient?identifier={system}|{mrn}")))
        .header("X-Purpose-Of-Use", "TREAT")
        .header("Content-Type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .expect("put");
    let status = resp.status().as_u16();
    let outcome = resp
        .headers()
        .get("x-mpi-outcome")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, resp.json().await.unwrap_or(Value::Null), outcome)
}

async fn get(client: &reqwest::Client, url: &str, purpose: &str) -> (u16, Value) {
    let resp = client
        .get(url)
        .header("X-Purpose-Of-Use", purpose)
        .send()
        .await
        .expect("get");
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

async fn post(client: &reqwest::Client, url: &str, purpose: &str, body: &Value) -> (u16, Value) {
    let resp = client
        .post(url)
        .header("X-Purpose-Of-Use", purpose)
        .body(body.to_string())
        .send()
        .await
        .expect("post");
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

fn person_of(source_body: &Value) -> String {
    source_body["link"][0]["other"]["reference"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn pix(r: &Region, system: &str, value: &str, target: Option<&str>) -> (u16, Value) {
    let mut url = r.ex.url(&format!(
        "Patient/$ihe-pix?sourceIdentifier={system}|{value}"
    ));
    if let Some(t) = target {
        url.push_str(&format!("&targetSystem={t}"));
    }
    get(&r.hospital, &url, "TREAT").await
}

fn target_values(params: &Value, system: &str) -> Vec<String> {
    params["parameter"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| {
                    p["name"] == "targetIdentifier" && p["valueIdentifier"]["system"] == system
                })
                .filter_map(|p| p["valueIdentifier"]["value"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

async fn same_person(r: &Region, a: (&str, &str), b: (&str, &str)) -> bool {
    let (status, params) = pix(r, a.0, a.1, Some(b.0)).await;
    status == 200 && target_values(&params, b.0).contains(&b.1.to_string())
}

async fn hospital_record_is_found_across_the_region(backend: Backend) {
    let r = region(&backend);
    let (status, body, outcome) = put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-100",
        &patient(
            HOSP,
            "H-100",
            "William",
            "Johnson",
            "1970-01-02",
            "12 Oak Road",
            "99501",
            Some("123-45-6789"),
        ),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(outcome.starts_with("new-identity"), "{outcome}");
    // The lab knows him as Bill, with day and month swapped and a typo in the surname.
    let (status, lab_body, outcome) = put(
        &r.lab,
        &r.ex,
        LAB,
        "L-7",
        &patient(
            LAB,
            "L-7",
            "Bill",
            "Jonson",
            "1970-02-01",
            "12 Oak Rd",
            "99501",
            Some("123456789"),
        ),
    )
    .await;
    assert_eq!(status, 201);
    assert!(outcome.starts_with("linked"), "{outcome}");
    assert_eq!(person_of(&body), person_of(&lab_body));

    // PIXm: the hospital's MRN cross-references to the lab's and the enterprise id.
    let (status, params) = pix(&r, HOSP, "H-100", None).await;
    assert_eq!(status, 200, "{params}");
    assert_eq!(target_values(&params, LAB), vec!["L-7"]);
    assert_eq!(target_values(&params, "urn:hie-broker:enterprise").len(), 1);
    let (_, only_lab) = pix(&r, HOSP, "H-100", Some(LAB)).await;
    assert_eq!(
        only_lab["parameter"].as_array().map(Vec::len),
        Some(2),
        "targetIdentifier + targetId: {only_lab}"
    );

    // PDQm: one entry per person, with every identifier.
    let (status, bundle) = get(
        &r.hospital,
        &r.ex.url("Patient?family=john&birthdate=1970-01-02"),
        "TREAT",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bundle["total"], 1, "{bundle}");
    let ids = bundle["entry"][0]["resource"]["identifier"].to_string();
    assert!(ids.contains("H-100") && ids.contains("L-7"), "{ids}");
    // Each record's own MRN is held by its row alone; the SSN (normalised) is filed for both.
    assert_eq!(
        filed_identifiers(&r.ex),
        vec![format!("{SSN}|123456789"), format!("{SSN}|123456789")]
    );
    let (_, phonetic) = get(
        &r.hospital,
        &r.ex.url("Patient?family:phonetic=jonsen"),
        "TREAT",
    )
    .await;
    assert_eq!(phonetic["total"], 1);
    let (_, exact) = get(&r.hospital, &r.ex.url("Patient?family:exact=john"), "TREAT").await;
    assert_eq!(exact["total"], 0);
    let (_, by_id) = get(
        &r.hospital,
        &r.ex.url(&format!("Patient?identifier={LAB}|L-7")),
        "TREAT",
    )
    .await;
    assert_eq!(by_id["total"], 1);

    // telecom: the number in any punctuation, with or without its system, alone or with
    // other criteria (found through the phone's blocking key).
    let mut with_phone = patient(
        HOSP,
        "H-300",
        "Olga",
        "Petrova",
        "1961-03-03",
        "3 Elm St",
        "60601",
        None,
    );
    with_phone["telecom"] = json!([{ "system": "phone", "value": "(907) 555-0199" }]);
    let (status, _, _) = put(&r.hospital, &r.ex, HOSP, "H-300", &with_phone).await;
    assert_eq!(status, 201);
    for (query, total) in [
        ("Patient?telecom=907-555-0199", 1),
        ("Patient?telecom=phone|9075550199", 1),
        ("Patient?telecom=9075550199&family=petrova", 1),
        ("Patient?telecom=9075550199&family=john", 0),
        ("Patient?telecom=9075550100", 0),
    ] {
        let (status, found) = get(&r.hospital, &r.ex.url(query), "TREAT").await;
        assert_eq!(status, 200, "{query}: {found}");
        assert_eq!(found["total"], total, "{query}: {found}");
    }

    // Paging: three Garcias, two per page, the next link gives the third.
    for (i, given) in ["Ana", "Luis", "Marta"].iter().enumerate() {
        let mrn = format!("H-G{i}");
        put(
            &r.hospital,
            &r.ex,
            HOSP,
            &mrn,
            &patient(
                HOSP,
                &mrn,
                given,
                "Garcia",
                &format!("198{i}-05-05"),
                &format!("{i} Pine St"),
                "12121",
                None,
            ),
        )
        .await;
    }
    let (_, page1) = get(
        &r.hospital,
        &r.ex.url("Patient?family=garcia&_count=2"),
        "TREAT",
    )
    .await;
    assert_eq!(page1["total"], 3, "{page1}");
    assert_eq!(page1["entry"].as_array().map(Vec::len), Some(2));
    let next = page1["link"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["relation"] == "next"))
        .and_then(|x| x["url"].as_str())
        .expect("next");
    let next = format!("{}{}", r.ex.base, next.split("/fhir").nth(1).expect("path"));
    let (_, page2) = get(&r.hospital, &next, "TREAT").await;
    assert_eq!(page2["entry"].as_array().map(Vec::len), Some(1), "{page2}");
    assert!(page2["link"]
        .as_array()
        .is_some_and(|l| l.iter().all(|x| x["relation"] != "next")));

    // An update keeps the link and answers 200.
    let (status, _, outcome) = put(
        &r.lab,
        &r.ex,
        LAB,
        "L-7",
        &patient(
            LAB,
            "L-7",
            "Bill",
            "Johnson",
            "1970-01-02",
            "12 Oak Rd",
            "99501",
            Some("123456789"),
        ),
    )
    .await;
    assert_eq!(status, 200);
    assert!(outcome.starts_with("kept"), "{outcome}");

    // Reading the person and a source record.
    let person = person_of(&lab_body);
    let (status, p) = get(&r.hospital, &r.ex.url(&person), "TREAT").await;
    assert_eq!(status, 200);
    assert_eq!(p["link"].as_array().map(Vec::len), Some(2));
}
on_both_backends!(hospital_record_is_found_across_the_region);

async fn a_member_writes_only_its_own_identifiers(backend: Backend) {
    let r = region(&backend);
    let good = patient(
        HOSP,
        "H-1",
        "Ann",
        "Lee",
        "1990-03-04",
        "1 Elm St",
        "10001",
        None,
    );
    // The lab may not write under the hospital's assigning authority...
    let (status, body, _) = put(&r.lab, &r.ex, HOSP, "H-1", &good).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome");
    // ...nor slip the hospital's identifier in beside its own.
    let mut sneaky = patient(
        LAB,
        "L-1",
        "Ann",
        "Lee",
        "1990-03-04",
        "1 Elm St",
        "10001",
        None,
    );
    sneaky["identifier"]
        .as_array_mut()
        .expect("ids")
        .push(json!({ "system": HOSP, "value": "H-1" }));
    let (status, body, _) = put(&r.lab, &r.ex, LAB, "L-1", &sneaky).await;
    assert_eq!(status, 403, "{body}");
    // Broken requests are 400s naming the problem.
    let resp = r
        .lab
        .put(r.ex.url(&format!("Patient?identifier={LAB}|L-1")))
        .header("X-Purpose-Of-Use", "TREAT")
        .body("{not json")
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 400);
    let (status, body, _) = put(&r.lab, &r.ex, LAB, "L-2", &good).await;
    assert_eq!(status, 400, "identifier missing from the resource: {body}");
    let mut bad_date = patient(
        LAB,
        "L-3",
        "Ann",
        "Lee",
        "1990-13-45",
        "1 Elm St",
        "10001",
        None,
    );
    let (status, body, _) = put(&r.lab, &r.ex, LAB, "L-3", &bad_date).await;
    assert_eq!(status, 400);
    assert_eq!(body["issue"][0]["expression"][0], "Patient.birthDate");
    bad_date["birthDate"] = json!("1990-03-04");
    bad_date["resourceType"] = json!("Observation");
    assert_eq!(put(&r.lab, &r.ex, LAB, "L-3", &bad_date).await.0, 400);
    // Nothing was written by any of the refused requests.
    let (_, found) = get(&r.hospital, &r.ex.url("Patient?family=lee"), "TREAT").await;
    assert_eq!(found["total"], 0, "{found}");
}
on_both_backends!(a_member_writes_only_its_own_identifiers);

async fn an_update_refiles_the_identifiers_it_changes(backend: Backend) {
    let r = region(&backend);
    let at = |ssn: &str| {
        patient(
            HOSP,
            "H-20",
            "Nadia",
            "Rahman",
            "1977-07-17",
            "2 Birch St",
            "30303",
            Some(ssn),
        )
    };
    assert_eq!(
        put(&r.hospital, &r.ex, HOSP, "H-20", &at("111-22-3333"))
            .await
            .0,
        201
    );
    assert_eq!(filed_identifiers(&r.ex), vec![format!("{SSN}|111223333")]);
    // The hospital corrects the SSN: the old one no longer finds her, the new one does.
    assert_eq!(
        put(&r.hospital, &r.ex, HOSP, "H-20", &at("111-22-4444"))
            .await
            .0,
        200
    );
    assert_eq!(filed_identifiers(&r.ex), vec![format!("{SSN}|111224444")]);
    assert_eq!(pix(&r, SSN, "111223333", None).await.0, 404);
    let (status, params) = pix(&r, SSN, "111-22-4444", Some(HOSP)).await;
    assert_eq!(status, 200, "{params}");
    assert_eq!(target_values(&params, HOSP), vec!["H-20"]);
    // Unchanged identifiers stay filed as they were.
    assert_eq!(
        put(&r.hospital, &r.ex, HOSP, "H-20", &at("111224444"))
            .await
            .0,
        200
    );
    assert_eq!(filed_identifiers(&r.ex), vec![format!("{SSN}|111224444")]);
}
on_both_backends!(an_update_refiles_the_identifiers_it_changes);

async fn pix_follows_ihe_error_semantics(backend: Backend) {
    let r = region(&backend);
    put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-5",
        &patient(
            HOSP,
            "H-5",
            "Omar",
            "Haddad",
            "1985-06-07",
            "5 Pine St",
            "20002",
            None,
        ),
    )
    .await;
    let (status, body) = pix(&r, "urn:oid:9.9.9", "X", None).await;
    assert_eq!(status, 400, "unknown assigning authority: {body}");
    let (status, body) = pix(&r, HOSP, "NOPE", None).await;
    assert_eq!(status, 404, "unknown patient: {body}");
    assert!(body["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .contains("not found"));
    let (status, body) = pix(&r, HOSP, "H-5", Some("urn:oid:7.7.7")).await;
    assert_eq!(status, 403, "unknown target system: {body}");
    let (status, _) = pix(&r, HOSP, "H-5", Some(LAB)).await;
    assert_eq!(
        status, 200,
        "known target with no identifier there is an empty answer"
    );
}
on_both_backends!(pix_follows_ihe_error_semantics);

async fn look_alikes_are_never_auto_linked(backend: Backend) {
    let r = region(&backend);
    let cases = [
        // Twins: same surname, birth date and address, different given names.
        (
            ("Alice", "Moreau", "2001-05-05", "4 Main St", "30003"),
            ("Emily", "Moreau", "2001-05-05", "4 Main St", "30003"),
        ),
        // Junior and senior: same name and address, birth dates decades apart.
        (
            ("John", "Carter", "1950-05-05", "9 Hill Rd", "40004"),
            ("John", "Carter", "1978-09-12", "9 Hill Rd", "40004"),
        ),
        // Siblings: same surname and address, different names and birth dates.
        (
            ("Maria", "Okafor", "1992-01-10", "7 Bay St", "50005"),
            ("Daniel", "Okafor", "1995-08-22", "7 Bay St", "50005"),
        ),
        // Different people with a common name and the same birthday.
        (
            ("James", "Smith", "1980-01-01", "1 First Ave", "60006"),
            ("James", "Smith", "1980-01-01", "200 Lake Dr", "61234"),
        ),
    ];
    for (i, (a, b)) in cases.iter().enumerate() {
        let (ha, la) = (format!("H-{i}"), format!("L-{i}"));
        put(
            &r.hospital,
            &r.ex,
            HOSP,
            &ha,
            &patient(HOSP, &ha, a.0, a.1, a.2, a.3, a.4, None),
        )
        .await;
        let (_, _, outcome) = put(
            &r.lab,
            &r.ex,
            LAB,
            &la,
            &patient(LAB, &la, b.0, b.1, b.2, b.3, b.4, None),
        )
        .await;
        assert!(
            !outcome.starts_with("linked"),
            "case {i} must not be linked: {outcome}"
        );
        assert!(
            !same_person(&r, (HOSP, &ha), (LAB, &la)).await,
            "case {i} linked"
        );
    }
    // The twins are queued for an operator, with the reason.
    let (status, queue) = get(&r.ops, &r.ex.url("Patient/$review-queue"), "HOPERAT").await;
    assert_eq!(status, 200);
    assert!(
        queue.to_string().contains("twin"),
        "{}",
        serde_json::to_string_pretty(&queue).unwrap_or_default()
    );
}
on_both_backends!(look_alikes_are_never_auto_linked);

async fn known_variations_still_link(backend: Backend) {
    let r = region(&backend);
    let cases = [
        // Married-name change: new surname, same given name, birth date and national id.
        (
            (
                "Sarah",
                "Brown",
                "1988-11-23",
                "3 Rose St",
                "70007",
                "111-22-3333",
            ),
            (
                "Sarah",
                "Whitfield",
                "1988-11-23",
                "3 Rose St",
                "70007",
                "111223333",
            ),
        ),
        // A move: new address, same national id.
        (
            (
                "Peter",
                "Novak",
                "1975-04-17",
                "8 Ash St",
                "80008",
                "222-33-4444",
            ),
            (
                "Peter",
                "Novak",
                "1975-04-17",
                "99 Cedar Ave",
                "80100",
                "222334444",
            ),
        ),
        // Typos and a nickname.
        (
            (
                "Elizabeth",
                "Fitzgerald",
                "1966-07-30",
                "15 Birch Ln",
                "90009",
                "333-44-5555",
            ),
            (
                "Liz",
                "Fitzgerlad",
                "1966-07-30",
                "15 Birch Lane",
                "90009",
                "333445555",
            ),
        ),
    ];
    for (i, (a, b)) in cases.iter().enumerate() {
        let (ha, la) = (format!("H-{i}"), format!("L-{i}"));
        put(
            &r.hospital,
            &r.ex,
            HOSP,
            &ha,
            &patient(HOSP, &ha, a.0, a.1, a.2, a.3, a.4, Some(a.5)),
        )
        .await;
        let (_, _, outcome) = put(
            &r.lab,
            &r.ex,
            LAB,
            &la,
            &patient(LAB, &la, b.0, b.1, b.2, b.3, b.4, Some(b.5)),
        )
        .await;
        assert!(
            outcome.starts_with("linked"),
            "case {i} should link: {outcome}"
        );
        assert!(same_person(&r, (HOSP, &ha), (LAB, &la)).await, "case {i}");
    }
}
on_both_backends!(known_variations_still_link);

async fn er_finds_a_stranger_with_match(backend: Backend) {
    let r = region(&backend);
    let er = r.ex.client(&r.ex.enroll("city-er", "emergency", &[]));
    let mut p = patient(
        HOSP,
        "H-9",
        "Grace",
        "Kim",
        "1959-12-01",
        "42 Harbor Rd",
        "11011",
        Some("555-66-7777"),
    );
    p["gender"] = json!("female");
    p["telecom"] = json!([{ "system": "phone", "value": "(555) 010-9999" }]);
    put(&r.hospital, &r.ex, HOSP, "H-9", &p).await;
    put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-10",
        &patient(
            HOSP,
            "H-10",
            "Grace",
            "Kim",
            "1961-02-03",
            "5 Other St",
            "22022",
            None,
        ),
    )
    .await;
    // Unconscious, no name: a birth date from a bracelet, the postcode, a phone number in the wallet.
    let query = json!({ "resourceType": "Parameters", "parameter": [
        { "name": "resource", "resource": {
            "resourceType": "Patient", "gender": "female", "birthDate": "1959-12-01",
            "telecom": [{ "system": "phone", "value": "555-010-9999" }],
            "address": [{ "postalCode": "11011" }] } },
        { "name": "count", "valueInteger": 5 }
    ]});
    let (status, bundle) = post(&er, &r.ex.url("Patient/$match"), "ETREAT", &query).await;
    assert_eq!(status, 200, "{bundle}");
    let first = &bundle["entry"][0];
    assert!(
        first["resource"]["identifier"].to_string().contains("H-9"),
        "{bundle}"
    );
    let score = first["search"]["score"].as_f64().expect("score");
    assert!(score > 0.5 && score <= 1.0, "{score}");
    assert!(first["search"]["extension"][0]["url"]
        .as_str()
        .unwrap_or_default()
        .ends_with("match-grade"));
    // With name and national id it is certain; onlyCertainMatches returns exactly that one.
    let certain = json!({ "resourceType": "Parameters", "parameter": [
        { "name": "resource", "resource": {
            "resourceType": "Patient", "name": [{ "family": "Kim", "given": ["Grace"] }], "birthDate": "1959-12-01",
            "identifier": [{ "system": SSN, "value": "555667777" }] } },
        { "name": "onlyCertainMatches", "valueBoolean": true }
    ]});
    let (_, bundle) = post(&er, &r.ex.url("Patient/$match"), "ETREAT", &certain).await;
    assert_eq!(bundle["total"], 1, "{bundle}");
    assert_eq!(
        bundle["entry"][0]["search"]["extension"][0]["valueCode"],
        "certain"
    );
    let (status, _) = post(
        &er,
        &r.ex.url("Patient/$match"),
        "ETREAT",
        &json!({ "resourceType": "Parameters" }),
    )
    .await;
    assert_eq!(status, 400);
}
on_both_backends!(er_finds_a_stranger_with_match);

async fn a_member_merges_its_duplicate_records(backend: Backend) {
    let r = region(&backend);
    put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-1",
        &patient(
            HOSP,
            "H-1",
            "Noah",
            "Fischer",
            "2010-10-10",
            "2 Lake St",
            "33033",
            Some("777-88-9999"),
        ),
    )
    .await;
    let (_, _, outcome) = put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-2",
        &patient(
            HOSP,
            "H-2",
            "Noah",
            "Fischer",
            "2010-10-10",
            "2 Lake St",
            "33033",
            Some("777889999"),
        ),
    )
    .await;
    assert!(
        outcome.contains("review(s) queued") || outcome.starts_with("linked"),
        "{outcome}"
    );
    // Flagged for the member as a potential duplicate.
    let (_, queue) = get(&r.ops, &r.ex.url("Patient/$review-queue"), "HOPERAT").await;
    assert!(queue.to_string().contains("potential-duplicate"), "{queue}");
    // ITI-104 merge: H-2 is replaced by H-1.
    let mut old = patient(
        HOSP,
        "H-2",
        "Noah",
        "Fischer",
        "2010-10-10",
        "2 Lake St",
        "33033",
        None,
    );
    old["active"] = json!(false);
    old["link"] = json!([{ "type": "replaced-by", "other": { "identifier": { "system": HOSP, "value": "H-1" } } }]);
    let (status, body, outcome) = put(&r.hospital, &r.ex, HOSP, "H-2", &old).await;
    assert_eq!(status, 200, "{body}");
    assert!(outcome.starts_with("merged"), "{outcome}");
    // The old identifier now resolves to the surviving record's person.
    let (status, params) = pix(&r, HOSP, "H-2", None).await;
    assert_eq!(status, 200);
    assert!(
        target_values(&params, HOSP).contains(&"H-1".to_string()),
        "{params}"
    );
    // Another member may not merge the hospital's records.
    let mut theirs = patient(
        LAB,
        "L-1",
        "Noah",
        "Fischer",
        "2010-10-10",
        "2 Lake St",
        "33033",
        None,
    );
    theirs["link"] = json!([{ "type": "replaced-by", "other": { "identifier": { "system": HOSP, "value": "H-1" } } }]);
    put(
        &r.lab,
        &r.ex,
        LAB,
        "L-1",
        &patient(
            LAB,
            "L-1",
            "Noah",
            "Fischer",
            "2010-10-10",
            "2 Lake St",
            "33033",
            None,
        ),
    )
    .await;
    assert_eq!(put(&r.lab, &r.ex, LAB, "L-1", &theirs).await.0, 403);
    // Conditional delete.
    let resp = r
        .hospital
        .delete(r.ex.url(&format!("Patient?identifier={HOSP}|H-1")))
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 204);
    assert_eq!(pix(&r, HOSP, "H-1", None).await.0, 404);
}
on_both_backends!(a_member_merges_its_duplicate_records);

async fn operators_review_link_merge_and_unmerge(backend: Backend) {
    let r = region(&backend);
    // A twin-like pair goes to review.
    put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-1",
        &patient(
            HOSP,
            "H-1",
            "Lena",
            "Vogel",
            "1999-09-09",
            "6 Park St",
            "44044",
            None,
        ),
    )
    .await;
    put(
        &r.lab,
        &r.ex,
        LAB,
        "L-1",
        &patient(
            LAB,
            "L-1",
            "Mia",
            "Vogel",
            "1999-09-09",
            "6 Park St",
            "44044",
            None,
        ),
    )
    .await;
    let (status, denied) = get(&r.hospital, &r.ex.url("Patient/$review-queue"), "TREAT").await;
    assert_eq!(status, 403, "{denied}");
    let (_, queue) = get(&r.ops, &r.ex.url("Patient/$review-queue"), "HOPERAT").await;
    let item = queue["parameter"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .find(|i| i["part"][1]["valueCode"] == "potential-match")
        })
        .cloned()
        .expect("queued");
    let id = item["part"][0]["valueInteger"].as_i64().expect("id");
    // Not the same person: remembered, so an update never links them.
    let resolve = |res: &str| {
        json!({ "resourceType": "Parameters", "parameter": [
        { "name": "review", "valueInteger": id }, { "name": "resolution", "valueCode": res } ] })
    };
    let (status, body) = post(
        &r.ops,
        &r.ex.url("Patient/$resolve-review"),
        "HOPERAT",
        &resolve("not-same-person"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(
        &r.ops,
        &r.ex.url("Patient/$resolve-review"),
        "HOPERAT",
        &resolve("same-person"),
    )
    .await;
    assert_eq!(status, 409, "already resolved");
    let (_, _, outcome) = put(
        &r.lab,
        &r.ex,
        LAB,
        "L-1",
        &patient(
            LAB,
            "L-1",
            "Lena",
            "Vogel",
            "1999-09-09",
            "6 Park St",
            "44044",
            None,
        ),
    )
    .await;
    assert!(
        !outcome.starts_with("linked"),
        "not-a-match is remembered: {outcome}"
    );
    assert!(!same_person(&r, (HOSP, "H-1"), (LAB, "L-1")).await);

    // Merge two identities by hand, then undo it.
    let a = put(
        &r.hospital,
        &r.ex,
        HOSP,
        "H-2",
        &patient(
            HOSP,
            "H-2",
            "Tom",
            "Ruiz",
            "1960-01-01",
            "1 A St",
            "55055",
            None,
        ),
    )
    .await
    .1;
    let b = put(
        &r.lab,
        &r.ex,
        LAB,
        "L-2",
        &patient(
            LAB,
            "L-2",
            "Tomas",
            "Ruis",
            "1961-06-06",
            "77 B Ave",
            "56056",
            None,
        ),
    )
    .await
    .1;
    let (pa, pb) = (person_of(&a), person_of(&b));
    assert_ne!(pa, pb);
    let merge = json!({ "resourceType": "Parameters", "parameter": [
        { "name": "source", "valueReference": { "reference": pb } }, { "name": "target", "valueReference": { "reference": pa } } ] });
    let (status, body) = post(&r.ops, &r.ex.url("Patient/$merge"), "HOPERAT", &merge).await;
    assert_eq!(status, 200, "{body}");
    assert!(same_person(&r, (HOSP, "H-2"), (LAB, "L-2")).await);
    let unmerge = json!({ "resourceType": "Parameters", "parameter": [{ "name": "patient", "valueReference": { "reference": pb } }] });
    let (status, body) = post(&r.ops, &r.ex.url("Patient/$unmerge"), "HOPERAT", &unmerge).await;
    assert_eq!(status, 200, "{body}");
    assert!(!same_person(&r, (HOSP, "H-2"), (LAB, "L-2")).await);

    // Every decision is in the audit trail.
    let (_, trail) = get(&r.ops, &r.ex.url("AuditEvent?subtype=mpi-merge"), "HOPERAT").await;
    assert_eq!(trail["entry"].as_array().map(Vec::len), Some(1), "{trail}");
    let (_, trail) = get(
        &r.ops,
        &r.ex.url("AuditEvent?subtype=patient-feed&_count=100"),
        "HOPERAT",
    )
    .await;
    assert!(trail["entry"].as_array().map(Vec::len).unwrap_or(0) >= 5);
    assert!(r.ex.hie_ok(&["audit", "verify"]).contains("intact"));
    let reviewed = r.ex.hie_ok(&["mpi", "review", "--status", "different"]);
    assert!(
        reviewed.contains("potential-match") && reviewed.contains("hazards: twin"),
        "{reviewed}"
    );
}
on_both_backends!(operators_review_link_merge_and_unmerge);

async fn batch_bundles_and_bulk_import_feed_the_same_matching(backend: Backend) {
    let r = region(&backend);
    let bundle = json!({ "resourceType": "Bundle", "type": "batch", "entry": [
        { "resource": patient(LAB, "L-1", "Ivy", "Chen", "1993-03-03", "3 Oak St", "66066", None),
          "request": { "method": "PUT", "url": format!("Patient?identifier={LAB}|L-1") } },
        { "resource": patient(LAB, "L-2", "Raj", "Patel", "1970-07-07", "8 Elm St", "77077", None),
          "request": { "method": "PUT", "url": format!("Patient?identifier={LAB}|L-2") } },
        { "resource": patient(HOSP, "H-1", "Eve", "Stone", "1980-08-08", "1 Main St", "88088", None),
          "request": { "method": "PUT", "url": format!("Patient?identifier={HOSP}|H-1") } }
    ]});
    let (status, resp) = post(&r.lab, &r.ex.url(""), "TREAT", &bundle).await;
    assert_eq!(status, 200, "{resp}");
    let statuses: Vec<&str> = resp["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        statuses,
        vec!["201 Created", "201 Created", "403 Forbidden"]
    );

    // hie import: NDJSON from the hospital; Ivy links to the lab's record.
    let file = r.ex.dir.path().join("patients.ndjson");
    let lines = [
        patient(
            HOSP,
            "H-10",
            "Ivy",
            "Chen",
            "1993-03-03",
            "3 Oak Street",
            "66066",
            None,
        ),
        patient(
            HOSP,
            "H-11",
            "Zoe",
            "Park",
            "2000-02-02",
            "4 Elm St",
            "12312",
            None,
        ),
    ];
    std::fs::write(
        &file,
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
            + "\n{broken\n",
    )
    .expect("write");
    let out = r.ex.hie(&[
        "import",
        "--org",
        "general-hospital",
        &file.to_string_lossy(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("imported 2 record(s)")
            && stdout.contains("1 linked")
            && stdout.contains("1 refused"),
        "{stdout}"
    );
    assert!(same_person(&r, (HOSP, "H-10"), (LAB, "L-1")).await);
    // Neither path files a record's own identifier apart from its row.
    assert!(
        filed_identifiers(&r.ex).is_empty(),
        "{:?}",
        filed_identifiers(&r.ex)
    );
    let (_, lab_pix) = pix(&r, LAB, "L-1", None).await;
    assert_eq!(target_values(&lab_pix, HOSP), vec!["H-10"], "{lab_pix}");

    // The operator's command line: why a record was linked, and m/u weights fitted by EM.
    let (_, found) = get(
        &r.hospital,
        &r.ex.url(&format!("Patient?identifier={HOSP}|H-10")),
        "TREAT",
    )
    .await;
    let records: Vec<String> = found["entry"][0]["resource"]["link"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|x| x["other"]["reference"].as_str())
                .map(|s| s.trim_start_matches("Patient/").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(records.len(), 2, "{found}");
    let explain: String = records
        .iter()
        .map(|id| r.ex.hie_ok(&["mpi", "explain", id]))
        .collect();
    assert!(
        explain.contains("linked") && explain.contains("given"),
        "{explain}"
    );
    let estimate = r.ex.hie_ok(&["mpi", "estimate"]);
    let weights = hie_broker::mpi::score::Weights::parse(&estimate)
        .expect("estimate prints a valid weights file");
    assert!(weights.weight("birth_date", "exact") > 0.0, "{estimate}");
}
on_both_backends!(batch_bundles_and_bulk_import_feed_the_same_matching);

#[derive(diesel::QueryableByName)]
struct Filed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// The rows of `sql` in the exchange's database, either backend.
fn load_rows<T>(ex: &Exchange, sql: &str) -> Vec<T>
where
    T: diesel::QueryableByName<diesel::sqlite::Sqlite>
        + diesel::QueryableByName<diesel::pg::Pg>
        + 'static,
{
    use diesel::{Connection, RunQueryDsl};
    match ex.db_url.strip_prefix("sqlite://") {
        Some(path) => {
            let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
            diesel::sql_query(sql).load(&mut c).expect(sql)
        }
        None => {
            let mut c = diesel::PgConnection::establish(&ex.db_url).expect("open postgres");
            diesel::sql_query(sql).load(&mut c).expect(sql)
        }
    }
}

/// The identifiers filed in `source_identifiers`, as `system|value`, sorted.
fn filed_identifiers(ex: &Exchange) -> Vec<String> {
    let sql = "SELECT system || '|' || value AS id FROM source_identifiers ORDER BY 1";
    let rows: Vec<Filed> = load_rows(ex, sql);
    rows.into_iter().map(|r| r.id).collect()
}

#[derive(diesel::QueryableByName)]
struct StoredRecord {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    eid: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    golden: String,
}

#[derive(diesel::QueryableByName)]
struct Counted {
    #[diesel(sql_type = diesel::sql_types::Text)]
    kind: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The MPI as sets of records grouped by person (ids are not compared: only who is with whom),
/// each record's status, the review queue by kind, and each person's golden record.
type Grouping = (
    std::collections::BTreeSet<Vec<String>>,
    Vec<(String, String)>,
    Vec<(String, i64)>,
    std::collections::BTreeMap<Vec<String>, String>,
);

/// PostgreSQL: how many of the structures an initial load defers besides PDQm's indexes
/// (`db::mpi::defer_load_indexes`) are there — the blocking keys' and identifiers' primary
/// keys and `source_records`' two foreign keys. None on SQLite.
fn deferred_structures_present(ex: &Exchange) -> Option<i64> {
    use diesel::{Connection, RunQueryDsl};
    if ex.db_url.starts_with("sqlite://") {
        return None;
    }
    let mut c = diesel::PgConnection::establish(&ex.db_url).expect("open postgres");
    let counted: Counted = diesel::sql_query(
        "SELECT 'present' AS kind, COUNT(*) AS n FROM pg_constraint \
         WHERE conrelid IN ('blocking_keys'::regclass, 'source_records'::regclass, \
         'source_identifiers'::regclass) \
         AND conname IN ('blocking_keys_pkey', 'source_identifiers_pkey', \
         'source_records_enterprise_id_fkey', 'source_records_org_id_fkey')",
    )
    .get_result(&mut c)
    .expect("constraints");
    Some(counted.n)
}

/// Every match decision as stored, by its record's identifier: outcome, score (NULL as
/// "-") and breakdown, in order (`COPY` on PostgreSQL for a load's batches, statements
/// otherwise: `db::mpi::insert_bulk`).
fn decisions(ex: &Exchange) -> Vec<(String, String)> {
    let sql = "SELECT r.system || '|' || r.value AS kind, \
               d.outcome || ' ' || COALESCE(CAST(ROUND(CAST(d.score AS NUMERIC), 6) AS TEXT), '-') \
               || ' ' || d.breakdown AS detail \
               FROM match_decisions d JOIN source_records r ON r.id = d.source_id \
               ORDER BY kind, detail";
    text_pairs(ex, sql)
}

/// The rows of `sql`, two text columns `kind` and `detail`.
fn text_pairs(ex: &Exchange, sql: &str) -> Vec<(String, String)> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Text)]
        kind: String,
        #[diesel(sql_type = diesel::sql_types::Text)]
        detail: String,
    }
    let rows: Vec<Row> = load_rows(ex, sql);
    rows.into_iter().map(|r| (r.kind, r.detail)).collect()
}

/// The people's history as stored: each action with the records it names ("source" and
/// "candidate" of a link), by their identifiers.
fn history(ex: &Exchange) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let sql = "SELECT h.action AS kind, h.detail AS detail FROM identity_history h";
    let records = "SELECT CAST(id AS TEXT) AS kind, system || '|' || value AS detail \
                   FROM source_records";
    let names: HashMap<String, String> = text_pairs(ex, records).into_iter().collect();
    let mut rows: Vec<(String, String)> = text_pairs(ex, sql)
        .into_iter()
        .map(|(action, detail)| {
            let detail: Value = serde_json::from_str(&detail).unwrap_or_default();
            let named = |k: &str| {
                detail[k]
                    .as_i64()
                    .and_then(|id| names.get(&id.to_string()).cloned())
                    .unwrap_or_default()
            };
            (
                action,
                format!("{} {}", named("source"), named("candidate")),
            )
        })
        .collect();
    rows.sort();
    rows
}

fn grouping(ex: &Exchange) -> Grouping {
    use diesel::{Connection, RunQueryDsl};
    let records_sql =
        "SELECT r.system || '|' || r.value AS id, r.enterprise_id AS eid, r.status, i.golden \
         FROM source_records r JOIN identities i ON i.id = r.enterprise_id";
    let reviews_sql = "SELECT kind, COUNT(*) AS n FROM match_reviews GROUP BY kind ORDER BY kind";
    let (records, reviews): (Vec<StoredRecord>, Vec<Counted>) =
        match ex.db_url.strip_prefix("sqlite://") {
            Some(path) => {
                let mut c = diesel::SqliteConnection::establish(path).expect("open sqlite");
                (
                    diesel::sql_query(records_sql)
                        .load(&mut c)
                        .expect("records"),
                    diesel::sql_query(reviews_sql)
                        .load(&mut c)
                        .expect("reviews"),
                )
            }
            None => {
                let mut c = diesel::PgConnection::establish(&ex.db_url).expect("open postgres");
                (
                    diesel::sql_query(records_sql)
                        .load(&mut c)
                        .expect("records"),
                    diesel::sql_query(reviews_sql)
                        .load(&mut c)
                        .expect("reviews"),
                )
            }
        };
    let mut people: std::collections::BTreeMap<i64, (Vec<String>, String)> = Default::default();
    let mut statuses = Vec::new();
    for r in records {
        let person = people.entry(r.eid).or_default();
        person.0.push(r.id.clone());
        person.1 = r.golden;
        statuses.push((r.id, r.status));
    }
    statuses.sort();
    let goldens: std::collections::BTreeMap<Vec<String>, String> = people
        .into_values()
        .map(|(mut g, golden)| {
            g.sort();
            (g, golden)
        })
        .collect();
    (
        goldens.keys().cloned().collect(),
        statuses,
        reviews.into_iter().map(|c| (c.kind, c.n)).collect(),
        goldens,
    )
}

/// `hie import` (the batch path) must decide exactly as the online feed does, record by record
/// in file order: links across members, links and duplicate flags within the file, hazards kept
/// apart, an identifier sent twice (an update), a merge, refused lines. (Batches of 50 have
/// their stored candidates scored ahead on two threads, `PARALLEL_SCORING`.)
async fn bulk_import_decides_as_the_online_feed_does(backend: Backend) {
    import_against_online_feed(backend, true, 40).await
}
on_both_backends!(bulk_import_decides_as_the_online_feed_does);

/// An initial load — the file into an index that holds no record — is matched from memory
/// (`Matcher::resident`): records matched with those of earlier batches, already written,
/// without reading them back, until its updates (online records) send it to the database; it
/// must decide exactly as the online feed does. The lab's records come after it.
async fn initial_import_decides_as_the_online_feed_does(backend: Backend) {
    import_against_online_feed(backend, false, 40).await
}
on_both_backends!(initial_import_decides_as_the_online_feed_does);

/// The same in batches of one record, each its own transaction: past `RESIDENT_GROUPS`
/// batches the load reads its records back from the database, before its updates.
async fn initial_import_past_what_it_keeps_in_memory(backend: Backend) {
    const { assert!(hie_broker::mpi::bulk::RESIDENT_GROUPS < 100) };
    import_against_online_feed(backend, false, 1).await
}
on_both_backends!(initial_import_past_what_it_keeps_in_memory);

/// With `lab_first`, the lab's records are stored before the hospital's file is loaded;
/// otherwise after it, and the file's updates come late, after records matching people of its
/// first batches. `batch`: records per batch of the import.
async fn import_against_online_feed(backend: Backend, lab_first: bool, batch: usize) {
    use hie_broker::synth::{to_patient, Generator};
    let second = match &backend {
        Backend::Sqlite => Backend::Sqlite,
        Backend::Postgres(_) => Backend::postgres().expect("a second PostgreSQL schema"),
    };
    let online = region(&backend);
    let bulk = region(&second);

    let mut g = Generator::new(7);
    let people: Vec<_> = (0..120).map(|_| g.person()).collect();
    let mut lab_lines = Vec::new();
    let mut lines: Vec<Value> = Vec::new();
    for (i, p) in people.iter().enumerate() {
        lines.push(to_patient(p, HOSP, &format!("H-{i}")));
        if i % 3 == 0 {
            let v = g.variant(p);
            lab_lines.push(to_patient(&v, LAB, &format!("L-{i}")));
        }
        if i % 12 == 5 {
            // The same person registered twice at the hospital, later in the file.
            let v = g.variant(p);
            lines.push(to_patient(&v, HOSP, &format!("H-dup-{i}")));
        }
    }
    // Updates in the middle of the file (online records, decided as they are written: the
    // next batch is matched once they are), then another record of a person already there.
    // Loaded first, the updates come after records matching people of the first batches.
    let mut early = lines[10].clone();
    early["address"][0]["line"][0] = json!("1 Early Lane");
    let mut phone = lines[20].clone();
    phone["telecom"] = json!([{ "system": "phone", "value": "555-0100" }]);
    let (at_early, at_phone) = if lab_first { (45, 60) } else { (125, 126) };
    if !lab_first {
        for k in [1, 4, 7, 30, 50, 70, 90] {
            let v = g.variant(&people[k]);
            lines.insert(100 + k / 10, to_patient(&v, HOSP, &format!("H-late-{k}")));
        }
    }
    lines.insert(at_early, early);
    lines.insert(at_phone, phone);
    let again = g.variant(&people[3]);
    lines.insert(75, to_patient(&again, HOSP, "H-again-3"));
    // Twins, and a father and son: never linked.
    lines.push(patient(
        HOSP,
        "T-1",
        "Anna",
        "Berg",
        "2001-05-05",
        "4 Main St",
        "12345",
        None,
    ));
    lines.push(patient(
        HOSP,
        "T-2",
        "Emma",
        "Berg",
        "2001-05-05",
        "4 Main St",
        "12345",
        None,
    ));
    lines.push(patient(
        HOSP,
        "J-1",
        "John",
        "Berg",
        "1950-05-05",
        "4 Main St",
        "12345",
        None,
    ));
    lines.push(patient(
        HOSP,
        "J-2",
        "John",
        "Berg",
        "1979-09-12",
        "4 Main St",
        "12345",
        None,
    ));
    // An identifier sent twice (the second is an update), and a merge of a duplicate.
    let mut moved = lines[0].clone();
    moved["address"][0]["line"][0] = json!("99 Moved Avenue");
    lines.push(moved);
    let mut merged = lines[1].clone();
    merged["link"] = json!([{ "type": "replaced-by", "other": { "identifier": { "system": HOSP, "value": "H-2" } } }]);
    lines.push(merged);
    // Refused: another member's identifier system, and not a Patient.
    lines.push(patient(
        LAB,
        "L-999",
        "Foreign",
        "Record",
        "1990-01-01",
        "1 A St",
        "11111",
        None,
    ));
    lines.push(json!({ "resourceType": "Observation" }));

    // The lab's records, online, in both regions.
    let lab = || async {
        for l in &lab_lines {
            let mrn = l["identifier"][0]["value"].as_str().unwrap_or_default();
            for r in [&online, &bulk] {
                let (status, body, _) = put(&r.lab, &r.ex, LAB, mrn, l).await;
                assert!(status == 200 || status == 201, "{status} {body}");
            }
        }
    };
    if lab_first {
        lab().await;
    }
    // The hospital's: one PUT at a time, or one file.
    let mut refused_online = 0;
    for l in &lines {
        let mrn = l["identifier"][0]["value"].as_str().unwrap_or("none");
        let (status, _, _) = put(&online.hospital, &online.ex, HOSP, mrn, l).await;
        if status >= 400 {
            refused_online += 1;
        }
    }
    assert_eq!(refused_online, 2);
    let file = bulk.ex.dir.path().join("hospital.ndjson");
    let mut text: Vec<String> = lines.iter().map(Value::to_string).collect();
    // A line that is not JSON at all, in the second batch: reported with its number, skipped.
    // (Batches of 40: the first two share a transaction, which ends after the second — its
    // updates hold up the third — and the last two share one.)
    text.insert(
        70,
        r#"{"resourceType": "Patient", "name": [{"family": "#.into(),
    );
    std::fs::write(&file, text.join("\n") + "\n").expect("write");
    // Loaded first, each batch is a transaction of its own: the matcher merges the batches
    // written into what it keeps in memory as each commits.
    let batch = batch.to_string();
    let mut import = vec!["import", "--org", "general-hospital", "--batch", &batch];
    if !lab_first {
        import.extend(["--transaction-records", &batch]);
    }
    let file = file.to_string_lossy();
    import.push(&file);
    let out = bulk.ex.hie(&import);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("3 refused"), "{stdout}");
    assert!(stderr.contains("line 71: not JSON"), "{stderr}");
    // On PostgreSQL a load into the empty index deferred PDQm's indexes, the blocking keys'
    // and identifiers' primary keys and the foreign keys, and built them at its end — or as soon as it read the
    // database, past what it keeps in memory, before deciding on what they index.
    if let Some(n) = deferred_structures_present(&bulk.ex) {
        assert_eq!(n, 4, "{stdout}");
        if !lab_first {
            let built = if batch == "1" {
                "built 0 index(es)"
            } else {
                "built 9 index(es)"
            };
            assert!(stdout.contains(built), "{stdout}");
        }
    }
    if !lab_first {
        lab().await;
    }

    let (a, b) = (grouping(&online.ex), grouping(&bulk.ex));
    assert_eq!(a.1, b.1, "record statuses differ");
    assert_eq!(a.0, b.0, "records are grouped into people differently");
    assert_eq!(a.2, b.2, "review queues differ");
    assert_eq!(a.3, b.3, "golden records differ");
    assert_eq!(
        decisions(&online.ex),
        decisions(&bulk.ex),
        "decisions as stored differ"
    );
    let links = history(&online.ex);
    assert!(links.iter().filter(|(a, _)| a == "link").count() >= 35);
    assert_eq!(links, history(&bulk.ex), "the people's histories differ");
    // The hazards stayed apart, the duplicates were found.
    let together = |x: &str, y: &str| {
        a.0.iter()
            .any(|g| g.contains(&format!("{HOSP}|{x}")) && g.contains(&format!("{HOSP}|{y}")))
    };
    assert!(!together("T-1", "T-2") && !together("J-1", "J-2"));
    assert!(together("H-5", "H-dup-5") && together("H-1", "H-2"));
    assert!(
        a.2.iter()
            .any(|(k, n)| k == "potential-duplicate" && *n > 0),
        "{:?}",
        a.2
    );
    let linked =
        a.0.iter()
            .filter(|g| g.iter().any(|r| r.starts_with(LAB)))
            .filter(|g| g.len() > 1)
            .count();
    assert!(linked >= 35, "{linked} of 40 lab records linked");
    if !lab_first {
        // Linked across batches from memory.
        // (H-late-1's variant is too far from H-1 to link, in either region.)
        for k in [4, 7, 30, 50, 70, 90] {
            assert!(together(&format!("H-{k}"), &format!("H-late-{k}")), "H-{k}");
        }
    }
    assert!(bulk.ex.hie_ok(&["audit", "verify"]).contains("intact"));
}

/// Concurrent PUTs share the feed's batches: each is answered on its own (a refused one does
/// not fail its neighbours), one identifier sent twice at once is one record, and every record
/// fed is audited.
async fn concurrent_feeds_are_answered_one_by_one(backend: Backend) {
    let r = region(&backend);
    let ex = &r.ex;
    let mut calls = Vec::new();
    for i in 0..24 {
        let (client, system, mrn) = if i % 2 == 0 {
            (&r.hospital, HOSP, format!("C-{i}"))
        } else {
            (&r.lab, LAB, format!("C-{i}"))
        };
        let body = patient(
            system,
            &mrn,
            &format!("Given{i}"),
            "Concurrent",
            "1990-01-01",
            &format!("{i} Parallel St"),
            "55555",
            None,
        );
        calls.push(async move { put(client, ex, system, &mrn, &body).await });
    }
    // The lab feeding an identifier in the hospital's system, among them.
    let foreign = patient(
        HOSP,
        "C-0",
        "Mallory",
        "Concurrent",
        "1990-01-01",
        "1 X St",
        "55555",
        None,
    );
    let same = patient(
        LAB,
        "C-1",
        "Given1",
        "Concurrent",
        "1990-01-01",
        "1 Parallel St",
        "55555",
        None,
    );
    let (results, refused, again) = tokio::join!(
        futures_util::future::join_all(calls),
        put(&r.lab, &r.ex, HOSP, "C-0", &foreign),
        put(&r.lab, &r.ex, LAB, "C-1", &same),
    );
    for (status, body, outcome) in &results {
        assert!(*status == 200 || *status == 201, "{status} {body}");
        assert!(outcome.contains("ent-"), "{outcome}");
    }
    // Each answer is the record as stored (a batch answers new records with the rows it wrote).
    // (C-1, sent twice, may have been updated after its first answer.)
    for (i, (_, body, _)) in results.iter().enumerate().filter(|(i, _)| *i != 1) {
        let client = if i % 2 == 0 { &r.hospital } else { &r.lab };
        let id = body["id"].as_str().expect("the answer names its record");
        let (status, read) = get(client, &ex.url(&format!("Patient/{id}")), "TREAT").await;
        assert_eq!(status, 200, "{read}");
        assert_eq!(&read, body);
    }
    assert_eq!(refused.0, 403, "{}", refused.1);
    assert!(again.0 == 200 || again.0 == 201, "{} {}", again.0, again.1);
    let (g, ..) = grouping(&r.ex);
    let records: usize = g.iter().map(Vec::len).sum();
    assert_eq!(records, 24, "{g:?}");
    assert!(r.ex.hie_ok(&["audit", "verify"]).contains("intact"));
}
on_both_backends!(concurrent_feeds_are_answered_one_by_one);

/// Another process (the `hie` command) appends to the audit chain between the broker's feed
/// writes: the broker's guess of the chain's head is then stale, and its next append must
/// notice and chain after the other's records, not fork the chain.
async fn the_audit_chain_stays_linear_when_another_process_appends(backend: Backend) {
    let r = region(&backend);
    for i in 0..3 {
        let mrn = format!("A-{i}");
        let body = patient(
            HOSP,
            &mrn,
            "Ines",
            &format!("Chained{i}"),
            "1972-03-04",
            "9 Ledger Rd",
            "40404",
            None,
        );
        let (status, body, _) = put(&r.hospital, &r.ex, HOSP, &mrn, &body).await;
        assert_eq!(status, 201, "{body}");
        // Enrolling a member is audited by the `hie` process itself.
        r.ex.enroll(&format!("clinic-{i}"), "clinic", &[]);
    }
    let verified = r.ex.hie_ok(&["audit", "verify"]);
    assert!(verified.contains("intact"), "{verified}");
    let (_, trail) = get(
        &r.ops,
        &r.ex.url("AuditEvent?subtype=patient-feed&_count=100"),
        "HOPERAT",
    )
    .await;
    assert_eq!(trail["entry"].as_array().map(Vec::len), Some(3), "{trail}");
}
on_both_backends!(the_audit_chain_stays_linear_when_another_process_appends);

/// Eight hospital records of eight people fed at once (`{prefix}-{from}` onwards, family name
/// `family`): each answer.
async fn eight_at_once(
    r: &Region,
    prefix: &str,
    family: &str,
    from: usize,
) -> Vec<(u16, Value, String)> {
    futures_util::future::join_all((from..from + 8).map(|i| async move {
        let mrn = format!("{prefix}-{i}");
        let body = patient(
            HOSP,
            &mrn,
            &format!("Given{i}"),
            family,
            "1980-02-03",
            &format!("{i} Restart Rd"),
            "44444",
            None,
        );
        put(&r.hospital, &r.ex, HOSP, &mrn, &body).await
    }))
    .await
}

/// On PostgreSQL only: a region whose broker names its connections `{prefix}_{pid}` (their
/// `application_name`), so that `pg_stat_activity` tells them apart; with the server's URL
/// and that name.
fn named_postgres_region(prefix: &str) -> Option<(String, String, Region)> {
    let Some(Backend::Postgres(url)) = Backend::postgres() else {
        return None;
    };
    let tag = format!("{prefix}_{}", std::process::id());
    let r = region(&Backend::Postgres(format!("{url}&application_name={tag}")));
    Some((url, tag, r))
}

/// PostgreSQL drops every connection of the broker (a restart, a failover, an operator's
/// `pg_terminate_backend`) between two rounds of concurrent feeds: the connections the feed
/// keeps between batches are dead, yet every request of the next round is answered, and the
/// audit chain holds every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_survives_postgresql_dropping_its_connections() {
    use diesel::{Connection, RunQueryDsl};
    // The broker's connections carry a name of their own, so that only they are dropped.
    let Some((url, tag, r)) = named_postgres_region("hie_drop") else {
        return;
    };
    let round = |from: usize| eight_at_once(&r, "D", "Dropped", from);
    for (status, body, _) in round(0).await {
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    let mut admin = diesel::PgConnection::establish(&url).expect("postgres");
    let dropped = diesel::sql_query(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{tag}'"
    ))
    .execute(&mut admin)
    .expect("terminate");
    assert!(dropped > 0, "the broker holds no connection to drop");
    for (status, body, _) in round(8).await {
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    let (g, ..) = grouping(&r.ex);
    assert_eq!(g.iter().map(Vec::len).sum::<usize>(), 16, "{g:?}");
    assert!(r.ex.hie_ok(&["audit", "verify"]).contains("intact"));
}

/// On PostgreSQL the feed's writer begins its next transaction in the round trip that commits
/// the last (and its matcher reads outside any transaction). Once the feed idles, no connection
/// of the broker may stay "idle in transaction" — an operator watching `pg_stat_activity`, or a
/// `CREATE INDEX CONCURRENTLY` waiting for old transactions, would see it — and the feed goes on
/// afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_feed_leaves_no_transaction_open() {
    use diesel::{Connection, RunQueryDsl};
    let Some((url, tag, r)) = named_postgres_region("hie_idle") else {
        return;
    };
    let round = |from: usize| eight_at_once(&r, "I", "Idle", from);
    #[derive(diesel::QueryableByName)]
    struct Open {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut admin = diesel::PgConnection::establish(&url).expect("postgres");
    let mut open_now = || {
        diesel::sql_query(format!(
            "SELECT count(*) AS n FROM pg_stat_activity \
             WHERE application_name = '{tag}' AND state LIKE 'idle in transaction%'"
        ))
        .get_result::<Open>(&mut admin)
        .expect("pg_stat_activity")
        .n
    };
    for from in [0, 8] {
        for (status, body, _) in round(from).await {
            assert!(status == 200 || status == 201, "{status} {body}");
        }
        // The feed keeps its connections for a second after its last batch.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        assert_eq!(open_now(), 0, "a connection left idle in a transaction");
    }
    let (g, ..) = grouping(&r.ex);
    assert_eq!(g.iter().map(Vec::len).sum::<usize>(), 16, "{g:?}");
}

/// On PostgreSQL a feed batch commits while the next is written on top of it. A commit that
/// fails (here a deferred trigger that, for one MRN, waits a moment and then raises at commit
/// time, as a full disk or a dropped connection would) must take with it only its own
/// request: the batch written on top is rolled back and fed again, everyone else is answered
/// as stored, nothing of the failed record remains, and the audit chain holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_batch_that_fails_to_commit_takes_only_its_own_request() {
    use diesel::{Connection, RunQueryDsl};
    let Some(backend @ Backend::Postgres(_)) = Backend::postgres() else {
        return;
    };
    let r = region(&backend);
    let mut admin = diesel::PgConnection::establish(&r.ex.db_url).expect("postgres");
    diesel::sql_query(
        "CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.value = 'C-3' THEN PERFORM pg_sleep(0.3); \
         RAISE EXCEPTION 'simulated failure at commit'; END IF; RETURN NULL; END $$",
    )
    .execute(&mut admin)
    .expect("trigger function");
    diesel::sql_query(
        "CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON source_records \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_at_commit()",
    )
    .execute(&mut admin)
    .expect("trigger");
    const FAMILIES: [&str; 16] = [
        "Abbott", "Baxter", "Carver", "Dalton", "Ellery", "Fenwick", "Garland", "Hollis", "Irving",
        "Jessop", "Kendal", "Lowry", "Marsh", "Norwood", "Oakley", "Pryor",
    ];
    const GIVENS: [&str; 16] = [
        "Alma", "Bruno", "Cecil", "Delia", "Edgar", "Flora", "Gideon", "Hazel", "Ivor", "Juno",
        "Klaus", "Lena", "Milo", "Nora", "Otis", "Pearl",
    ];
    let person = |system: &str, mrn: &str, i: usize| {
        patient(
            system,
            mrn,
            GIVENS[i],
            FAMILIES[i],
            &format!("{}-0{}-1{}", 1940 + 3 * i, 1 + i % 9, i % 10),
            &format!("{} Flush Lane", 10 + i),
            &format!("{}", 55000 + 37 * i),
            None,
        )
    };
    // C-3 first: its batch is committing (for 0.3 s) when the others arrive, so they are
    // written on top of it — among them the lab's record of the same person, matched to C-3
    // while it was pending.
    let (ex, hospital, lab) = (&r.ex, &r.hospital, &r.lab);
    let failing_body = person(HOSP, "C-3", 3);
    let failing = put(hospital, ex, HOSP, "C-3", &failing_body);
    let lab_body = person(LAB, "L-3", 3);
    let others = async {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let lab = put(lab, ex, LAB, "L-3", &lab_body);
        let hospital = futures_util::future::join_all((0..8).filter(|i| *i != 3).map(|i| {
            let mrn = format!("C-{i}");
            let body = person(HOSP, &mrn, i);
            async move { put(hospital, ex, HOSP, &mrn, &body).await }
        }));
        let (lab, hospital) = tokio::join!(lab, hospital);
        hospital.into_iter().chain([lab]).collect::<Vec<_>>()
    };
    let ((status, body, _), answered) = tokio::join!(failing, others);
    assert!(status >= 500, "{status} {body}");
    for (status, body, _) in answered {
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    // The feed goes on.
    let next = futures_util::future::join_all((8..16).map(|i| {
        let mrn = format!("C-{i}");
        let body = person(HOSP, &mrn, i);
        async move { put(hospital, ex, HOSP, &mrn, &body).await }
    }))
    .await;
    for (status, body, _) in next {
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    let (g, ..) = grouping(&r.ex);
    let stored: Vec<&String> = g.iter().flatten().collect();
    assert_eq!(stored.len(), 16, "{g:?}");
    assert!(!stored.iter().any(|id| id.ends_with("|C-3")), "{g:?}");
    // Everyone a person of their own: the lab's record, matched to C-3 while that was
    // pending, was decided again without it.
    assert_eq!(g.len(), 16, "{g:?}");
    assert!(r.ex.hie_ok(&["audit", "verify"]).contains("intact"));
}

/// A database of `backend` opened in-process, with hospital A and `n` synthetic patients fed
/// through the real matching path, then `extra` Patients (which carry `MRN-n`, `MRN-n+1`…).
fn loaded_db(
    backend: &Backend,
    n: usize,
    extra: &[Value],
) -> (tempfile::TempDir, hie_broker::db::PooledConn) {
    let l = loaded(backend, n, extra);
    (l.work, l.conn)
}

/// A database of one member (hospital-a, `urn:hospital-a`), loaded with `n` generated
/// people and `extra`, through the library.
struct Loaded {
    work: tempfile::TempDir,
    db: hie_broker::db::Db,
    settings: hie_broker::mpi::MpiSettings,
    org: hie_broker::orgs::Organization,
    conn: hie_broker::db::PooledConn,
}

fn loaded(backend: &Backend, n: usize, extra: &[Value]) -> Loaded {
    use hie_broker::audit::Actor;
    use hie_broker::synth::{to_patient, Generator};
    let work = tempfile::tempdir().expect("tempdir");
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", work.path().join("hie.db").display()),
        Backend::Postgres(url) => url.clone(),
    };
    let mut config = hie_broker::config::Config::load_with_env(None, |_| None).expect("config");
    config.database.url = url;
    let settings = hie_broker::mpi::MpiSettings::from_config(&config).expect("settings");
    let db = hie_broker::db::Db::open(&config.database).expect("db");
    let mut conn = db.get().expect("conn");
    let org = hie_broker::orgs::add(
        &mut conn,
        hie_broker::orgs::NewOrganization {
            id: hie_broker::ids::OrgId::parse("hospital-a").expect("id"),
            name: "Hospital A".into(),
            org_type: hie_broker::orgs::OrgType::Hospital,
            fhir_base: None,
            identifier_systems: vec!["urn:hospital-a".into()],
        },
        &hie_broker::certs::CertInfo {
            fingerprint: hie_broker::ids::Fingerprint::of_der(b"hospital-a"),
            subject: "CN=hospital-a".into(),
            issuer: "CN=test".into(),
            serial: "01".into(),
            not_before: 0,
            not_after: i64::MAX,
        },
        &Actor::cli(),
    )
    .expect("org");
    let mut g = Generator::new(7);
    let patients: Vec<Value> = (0..n)
        .map(|i| to_patient(&g.person(), "urn:hospital-a", &format!("MRN-{i}")))
        .chain(extra.iter().cloned())
        .collect();
    for (i, p) in patients.iter().enumerate() {
        let value = format!("MRN-{i}");
        let req = hie_broker::mpi::FeedRequest {
            system: "urn:hospital-a",
            value: &value,
            patient: p,
        };
        hie_broker::mpi::feed(&mut conn, &settings, &org, &req, &Actor::cli()).expect("feed");
    }
    Loaded {
        work,
        db,
        settings,
        org,
        conn,
    }
}

/// The feed's pipeline matches a batch while the one before it is written: the unwritten
/// batch's records are candidates as if stored, and a batch whose matching went stale (a
/// record added by another process, another write of this one) is matched again when
/// written, so the decisions stay those of one record after the other.
async fn pipelined_matching_sees_unwritten_batches_and_notices_stale_ones(backend: Backend) {
    use hie_broker::audit::Actor;
    use hie_broker::mpi::bulk::{write_group, Matcher, Pipeline, Submission, Written};
    let mut l = loaded(&backend, 30, &[]);
    let mut reader = l.db.get().expect("reader");
    let pipe = Pipeline::new(l.db.writes());
    let mut matcher = Matcher::default();
    let mut written = Written::default();
    let person = |mrn: &str, given: &str, family: &str, dob: &str| {
        patient(
            "urn:hospital-a",
            mrn,
            given,
            family,
            dob,
            "4 Main St",
            "12345",
            None,
        )
    };
    let one = |mrn: &str, given: &str, family: &str, dob: &str| {
        vec![Submission::from(person(mrn, given, family, dob))]
    };
    let write = |conn: &mut hie_broker::db::PooledConn,
                 written: &mut Written,
                 m: hie_broker::mpi::bulk::Matched| {
        let group = m.group();
        let r = hie_broker::db::write_tx(conn, |c| {
            write_group(c, &l.settings, written, m, Some(&pipe), |_, _| Ok(()))
        })
        .expect("write");
        pipe.finished(group);
        r.into_iter().next().expect("one").expect("fed")
    };
    let mut match_one = |subs| {
        matcher
            .match_group(&mut reader, &l.settings, &l.org, subs, Some(&pipe))
            .expect("match")
    };

    // A duplicate registration matched while the first record is still unwritten links to it.
    let first = match_one(one("P-1", "Ingrid", "Vasquez", "1966-03-14"));
    let second = match_one(one("P-2", "Ingrid", "Vasquez", "1966-03-14"));
    let a = write(&mut l.conn, &mut written, first);
    let b = write(&mut l.conn, &mut written, second);
    assert_eq!(a.outcome, "new-identity");
    assert_eq!(b.outcome, "linked");
    assert_eq!(a.enterprise_id, b.enterprise_id);
    assert_eq!(written.matched_again(), 0, "both were written as decided");

    // Another process adds the same person between matching and writing: matched again. P-3
    // was matched as a person alone, so its parsed Patient was let go before the write; its
    // phone reaches the person's golden record all the same.
    let mut p3 = person("P-3", "Tobias", "Lindqvist", "1971-11-02");
    p3["telecom"] = json!([{ "system": "phone", "value": "555-010-3377" }]);
    let stale = match_one(vec![Submission::from(p3)]);
    let req_patient = person("P-4", "Tobias", "Lindqvist", "1971-11-02");
    let other = hie_broker::mpi::feed(
        &mut l.conn,
        &l.settings,
        &l.org,
        &hie_broker::mpi::FeedRequest {
            system: "urn:hospital-a",
            value: "P-4",
            patient: &req_patient,
        },
        &Actor::cli(),
    )
    .expect("feed");
    let c = write(&mut l.conn, &mut written, stale);
    assert_eq!(written.matched_again(), 1);
    assert_eq!(c.outcome, "linked");
    assert_eq!(c.enterprise_id, other.enterprise_id);
    let person =
        hie_broker::db::mpi::get_identities(&mut l.conn, &[c.enterprise_id]).expect("person");
    assert!(
        person[0].golden.contains("555-010-3377"),
        "{}",
        person[0].golden
    );

    // Any other write of this process meanwhile (an operator's link change, say): matched again.
    let quiet = match_one(one("P-5", "Oksana", "Brandt", "1990-07-21"));
    l.db.writes()
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = write(&mut l.conn, &mut written, quiet);
    assert_eq!(written.matched_again(), 2);
    assert_eq!(d.outcome, "new-identity");

    // And after all that, the pipeline writes as decided again.
    let next = match_one(one("P-6", "Oksana", "Brandt", "1990-07-21"));
    let e = write(&mut l.conn, &mut written, next);
    assert_eq!(written.matched_again(), 2);
    assert_eq!(e.enterprise_id, d.enterprise_id);

    // A read taken while a batch is pending can run after that batch is written: the stored
    // copy is dropped, not scored a second time (it was: twins, held for review, queued the
    // same review twice and the batch was refused).
    let pending = match_one(one("P-7", "Anna", "Okafor", "1985-02-03"));
    let read = matcher
        .begin(
            &l.settings,
            &l.org,
            one("P-8", "Emma", "Okafor", "1985-02-03"),
            Some(&pipe),
        )
        .expect("begin");
    let f = write(&mut l.conn, &mut written, pending);
    let reading = read
        .run(&mut reader, &l.settings, Some(&pipe))
        .expect("read");
    let late = matcher.finish(&l.settings, &l.org, reading, true);
    let h = write(&mut l.conn, &mut written, late);
    assert_ne!(h.enterprise_id, f.enterprise_id, "twins are never linked");
    assert_eq!(h.reviews_queued, 1, "one potential duplicate, not two");
    assert_eq!(written.matched_again(), 2);

    // Another process updates a record between a read on the writing connection and the
    // write: on SQLite that connection's `data_version` moved, so the batch is matched again.
    // (PostgreSQL has no such counter: there only added records are noticed, see
    // ARCHITECTURE.md.)
    let read = matcher
        .begin(
            &l.settings,
            &l.org,
            one("P-9", "Ruth", "Nakamura", "1958-12-30"),
            Some(&pipe),
        )
        .expect("begin")
        .on_writer();
    let reading = read
        .run(&mut l.conn, &l.settings, Some(&pipe))
        .expect("read");
    let ruth = matcher.finish(&l.settings, &l.org, reading, true);
    let moved = patient(
        "urn:hospital-a",
        "P-1",
        "Ingrid",
        "Vasquez",
        "1966-03-14",
        "9 Other Rd",
        "54321",
        None,
    );
    hie_broker::mpi::feed(
        &mut reader,
        &l.settings,
        &l.org,
        &hie_broker::mpi::FeedRequest {
            system: "urn:hospital-a",
            value: "P-1",
            patient: &moved,
        },
        &Actor::cli(),
    )
    .expect("update");
    let r = write(&mut l.conn, &mut written, ruth);
    assert_eq!(r.outcome, "new-identity");
    let expected = match backend {
        Backend::Sqlite => 3,
        Backend::Postgres(_) => 2,
    };
    assert_eq!(written.matched_again(), expected);
}
on_both_backends!(pipelined_matching_sees_unwritten_batches_and_notices_stale_ones);

/// A record whose match would merge two people is decided as it is written, after its batch.
/// The batches after it are matched meanwhile, with it as a candidate whose person is not yet
/// known: one that scored it (a twin held for review) is matched again when written, and
/// decides as one record after the other would; one about somebody else is written as
/// decided. Neither waits for the merge.
async fn a_merge_decided_as_written_holds_up_only_the_batches_it_touches(backend: Backend) {
    use hie_broker::audit::Actor;
    use hie_broker::mpi::bulk::{write_group, Matcher, Pipeline, Submission, Written};
    let mut l = loaded(&backend, 30, &[]);
    let ingrid = |mrn: &str| {
        patient(
            "urn:hospital-a",
            mrn,
            "Ingrid",
            "Vasquez",
            "1966-03-14",
            "4 Main St",
            "12345",
            None,
        )
    };
    let feed = |conn: &mut hie_broker::db::PooledConn, mrn: &str, p: &Value| {
        hie_broker::mpi::feed(
            conn,
            &l.settings,
            &l.org,
            &hie_broker::mpi::FeedRequest {
                system: "urn:hospital-a",
                value: mrn,
                patient: p,
            },
            &Actor::cli(),
        )
        .expect("feed")
    };
    // One person split in two by an operator's unlink: two identities a new record of hers is
    // certain for.
    let first = feed(&mut l.conn, "M-1", &ingrid("M-1"));
    let second = feed(&mut l.conn, "M-2", &ingrid("M-2"));
    assert_eq!(first.enterprise_id, second.enterprise_id);
    let split =
        hie_broker::mpi::unlink(&mut l.conn, second.source_id, &Actor::cli()).expect("unlink");
    assert_ne!(split, first.enterprise_id);

    let mut reader = l.db.get().expect("reader");
    let pipe = Pipeline::new(l.db.writes());
    let mut matcher = Matcher::default();
    let mut written = Written::default();
    let mut match_one = |matcher: &mut Matcher, p: Value| {
        matcher
            .match_group(
                &mut reader,
                &l.settings,
                &l.org,
                vec![Submission::from(p)],
                Some(&pipe),
            )
            .expect("match")
    };
    let merging = match_one(&mut matcher, ingrid("M-3"));
    assert!(
        !matcher.needs_flush(),
        "the next batch need not wait for the merge"
    );
    let other = match_one(
        &mut matcher,
        patient(
            "urn:hospital-a",
            "M-5",
            "Tobias",
            "Lindqvist",
            "1971-11-02",
            "8 Elm Rd",
            "54321",
            None,
        ),
    );
    let twin = match_one(
        &mut matcher,
        patient(
            "urn:hospital-a",
            "M-4",
            "Anna",
            "Vasquez",
            "1966-03-14",
            "4 Main St",
            "12345",
            None,
        ),
    );
    let mut write = |written: &mut Written, m: hie_broker::mpi::bulk::Matched| {
        let group = m.group();
        let r = hie_broker::db::write_tx(&mut l.conn, |c| {
            write_group(c, &l.settings, written, m, Some(&pipe), |_, _| Ok(()))
        })
        .expect("write");
        pipe.finished(group);
        r.into_iter().next().expect("one").expect("fed")
    };
    let merged = write(&mut written, merging);
    assert_eq!(merged.outcome, "linked");
    assert!([first.enterprise_id, split].contains(&merged.enterprise_id));
    let tobias = write(&mut written, other);
    assert_eq!(
        written.matched_again(),
        0,
        "somebody else's batch is written as decided"
    );
    let anna = write(&mut written, twin);
    assert_eq!(
        written.matched_again(),
        1,
        "the twin's batch was matched again"
    );
    // As one record after the other: the twin stays apart, held for review against all three
    // of her sister's records, the one written by the merge included.
    assert_eq!(anna.outcome, "review");
    assert_eq!(anna.reviews_queued, 3);
    assert_eq!(tobias.outcome, "new-identity");
    // The merge itself: the split person is one again.
    for mrn in ["M-1", "M-2", "M-3"] {
        let row = hie_broker::db::mpi::find_source(&mut l.conn, "urn:hospital-a", mrn)
            .expect("read")
            .expect("stored");
        assert_eq!(row.enterprise_id, merged.enterprise_id, "{mrn}");
    }
}
on_both_backends!(a_merge_decided_as_written_holds_up_only_the_batches_it_touches);

/// An upgrade from a database whose blocking keys are text. The re-keying migrations that
/// filed existing records under a new or changed key (birth date + initials; the street key's
/// new form) file them exactly as `Demographics::blocking_keys` does for new ones: run each
/// again on such a database whose keys of that kind were removed, and the same keys come back.
/// Then the move to key ids (migration 9, and `rekey_blocking_keys` after it, as `migrate`
/// runs them) files every record as the code now does, and drops the text table.
async fn upgrading_from_text_keys_files_keys_as_the_code_does(backend: Backend) {
    use diesel::connection::SimpleConnection;
    use diesel::sql_types::{BigInt, Text};
    use diesel::{ExpressionMethods, QueryDsl, QueryableByName, RunQueryDsl};
    use hie_broker::db::schema::{blocking_keys::dsl as bk, source_records::dsl as sr};
    use hie_broker::mpi::normalize::Demographics;
    #[derive(QueryableByName, PartialEq, Eq, PartialOrd, Ord, Debug)]
    struct TextKey {
        #[diesel(sql_type = Text)]
        key: String,
        #[diesel(sql_type = BigInt)]
        source_id: i64,
    }
    let pg = matches!(backend, Backend::Postgres(_));
    let (_work, mut conn) = loaded_db(&backend, 60, &[]);
    let filed: Vec<(i64, i64)> = bk::blocking_keys
        .select((bk::key, bk::source_id))
        .order((bk::key, bk::source_id))
        .load(&mut *conn)
        .expect("key ids");
    // What the earlier version filed: every active record's keys, as text.
    let records: Vec<(i64, String)> = sr::source_records
        .filter(sr::status.eq("active"))
        .select((sr::id, sr::demographics))
        .load(&mut *conn)
        .expect("records");
    let mut text: Vec<TextKey> = records
        .iter()
        .flat_map(|(id, demo)| {
            let d: Demographics = serde_json::from_str(demo).expect("demographics");
            d.blocking_keys().into_iter().map(|key| TextKey {
                key,
                source_id: *id,
            })
        })
        .collect();
    text.sort();
    assert!(text.len() >= 500, "{}", text.len());
    let text_table = if pg {
        "CREATE TABLE blocking_keys (key TEXT NOT NULL, source_id BIGINT NOT NULL, \
         PRIMARY KEY (key, source_id))"
    } else {
        "CREATE TABLE blocking_keys (key TEXT NOT NULL, source_id BIGINT NOT NULL, \
         PRIMARY KEY (key, source_id)) WITHOUT ROWID"
    };
    conn.batch_execute(&format!("DROP TABLE blocking_keys; {text_table}"))
        .expect("text keys table");
    let read = |conn: &mut hie_broker::db::PooledConn| -> Vec<TextKey> {
        diesel::sql_query("SELECT key, source_id FROM blocking_keys ORDER BY key, source_id")
            .load(&mut **conn)
            .expect("text keys")
    };
    let (rekeying, move_to_ids) = if pg {
        (
            [
                include_str!(
                    "../migrations/postgres/2026-11-24-000007_birth_date_initials_key/up.sql"
                ),
                include_str!("../migrations/postgres/2026-11-25-000008_street_key/up.sql"),
            ],
            include_str!("../migrations/postgres/2026-11-25-000009_blocking_key_ids/up.sql"),
        )
    } else {
        (
            [
                include_str!(
                    "../migrations/sqlite/2026-11-24-000007_birth_date_initials_key/up.sql"
                ),
                include_str!("../migrations/sqlite/2026-11-25-000008_street_key/up.sql"),
            ],
            include_str!("../migrations/sqlite/2026-11-25-000009_blocking_key_ids/up.sql"),
        )
    };
    // Filed as the earlier version would, but for the keys the two migrations add.
    for k in text
        .iter()
        .filter(|k| !k.key.starts_with("di:") && !k.key.starts_with("ad:"))
    {
        diesel::sql_query(if pg {
            "INSERT INTO blocking_keys (key, source_id) VALUES ($1, $2)"
        } else {
            "INSERT INTO blocking_keys (key, source_id) VALUES (?, ?)"
        })
        .bind::<Text, _>(&k.key)
        .bind::<BigInt, _>(k.source_id)
        .execute(&mut *conn)
        .expect("text key");
    }
    assert!(read(&mut conn).len() < text.len());
    for up in rekeying {
        conn.batch_execute(up).expect("re-keying");
    }
    assert_eq!(read(&mut conn), text);

    conn.batch_execute(move_to_ids).expect("migration 9");
    // Pages of seven keys: many pages, and a page boundary inside keys several records share.
    let moved = hie_broker::db::mpi::rekey_blocking_keys(&mut conn, 7).expect("rekey");
    assert_eq!(moved, text.len());
    let now: Vec<(i64, i64)> = bk::blocking_keys
        .select((bk::key, bk::source_id))
        .order((bk::key, bk::source_id))
        .load(&mut *conn)
        .expect("key ids");
    assert_eq!(now, filed);
    // The text table is gone: a second run finds nothing to move.
    assert_eq!(
        hie_broker::db::mpi::rekey_blocking_keys(&mut conn, 7).expect("again"),
        0
    );
}
on_both_backends!(upgrading_from_text_keys_files_keys_as_the_code_does);

/// `hie mpi estimate`'s term frequencies, on both backends: a surname held by many records is
/// listed with its share and weighs less when it agrees; names held by few are not listed.
async fn estimate_lists_common_names_with_their_share(backend: Backend) {
    use hie_broker::mpi::{estimate, score::Weights};
    let smiths: Vec<Value> = (0..8)
        .map(|i| {
            json!({ "resourceType": "Patient",
                "identifier": [{ "system": "urn:hospital-a", "value": format!("MRN-{}", 40 + i) }],
                "name": [{ "family": "Smith", "given": [format!("Given{i}")] }],
                "birthDate": format!("19{:02}-01-01", 40 + i) })
        })
        .collect();
    let (_work, mut conn) = loaded_db(&backend, 40, &smiths);
    let plain = Weights::defaults();
    let common = estimate::term_frequencies(&mut conn, &plain, 1000).expect("frequencies");
    let share = common["family"]["smith"];
    assert!(share > 0.1 && share < 0.25, "{common:?}");
    assert!(
        common["family"].len() < 5,
        "rare names are not listed: {common:?}"
    );
    let adjusted = plain.clone().with_frequencies(common);
    assert!(adjusted.exact_weight("family", "smith") < plain.weight("family", "exact"));
}
on_both_backends!(estimate_lists_common_names_with_their_share);

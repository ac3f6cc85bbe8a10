//! Consent directives, purpose of use, break-the-glass and the accounting of disclosures, over
//! real mutual TLS, on SQLite and PostgreSQL.

mod common;

use common::{assert_valid_fhir, Backend, Exchange, MemberSim};
use serde_json::{json, Value};

const HOSP: &str = "urn:oid:2.16.840.1.113883.3.1";
const LAB: &str = "urn:oid:2.16.840.1.113883.3.2";
const CLINIC: &str = "urn:oid:2.16.840.1.113883.3.3";
const ER: &str = "urn:oid:2.16.840.1.113883.3.4";
const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
const CONF: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ACT: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

struct Region {
    ex: Exchange,
    hospital: reqwest::Client,
    lab: reqwest::Client,
    clinic: reqwest::Client,
    er: reqwest::Client,
    ops: reqwest::Client,
    repo: MemberSim,
}

fn region(backend: &Backend, extra: &str) -> Region {
    let ex = Exchange::start_with(backend, extra);
    let (h, repo) = ex.enroll_with_repository("general-hospital", "hospital", HOSP, 0);
    let lab = ex.client(&ex.enroll("city-lab", "lab", &["--identifier-system", LAB]));
    let clinic = ex.client(&ex.enroll("city-clinic", "clinic", &["--identifier-system", CLINIC]));
    let er = ex.client(&ex.enroll("county-er", "emergency", &["--identifier-system", ER]));
    let ops = ex.client(&ex.enroll("exchange-ops", "operator", &[]));
    Region {
        hospital: ex.client(&h),
        lab,
        clinic,
        er,
        ops,
        ex,
        repo,
    }
}

async fn call(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    purpose: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = client
        .request(method, url)
        .header("X-Purpose-Of-Use", purpose)
        .header("X-User-Id", "user-1")
        .header("X-User-Role", "physician");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/fhir+json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

async fn get(client: &reqwest::Client, r: &Region, path: &str, purpose: &str) -> (u16, Value) {
    let (s, b, _) = call(
        client,
        reqwest::Method::GET,
        &r.ex.url(path),
        purpose,
        &[],
        None,
    )
    .await;
    (s, b)
}

const BTG: [(&str, &str); 1] = [("X-Break-Glass-Reason", "unconscious, no identification")];

async fn get_btg(r: &Region, path: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    call(
        &r.er,
        reqwest::Method::GET,
        &r.ex.url(path),
        "ETREAT",
        &BTG,
        None,
    )
    .await
}

fn patient(system: &str, mrn: &str, given: &str, family: &str, dob: &str, ssn: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{ "system": system, "value": mrn }, { "system": SSN, "value": ssn }],
        "name": [{ "family": family, "given": [given] }],
        "gender": "female",
        "birthDate": dob,
        "address": [{ "line": ["4 Birch Road"], "city": "Springfield", "postalCode": "62704" }]
    })
}

/// Feeds P (hospital + lab) and Q (hospital), registers a normal and a mental-health document
/// for P. Returns (P's hospital source id, P's enterprise id, normal doc id, PSY doc id).
async fn setup(r: &Region) -> (String, String, String, String) {
    let mut src = Vec::new();
    for (c, system, mrn, given, family, dob, ssn) in [
        (
            &r.hospital,
            HOSP,
            "H-1",
            "Imogen",
            "Castellano",
            "1979-05-14",
            "222-33-4444",
        ),
        (
            &r.lab,
            LAB,
            "L-1",
            "Imogen",
            "Castellano",
            "1979-05-14",
            "222-33-4444",
        ),
        (
            &r.hospital,
            HOSP,
            "H-2",
            "Beatrix",
            "Lindqvist",
            "1990-10-02",
            "555-66-7777",
        ),
    ] {
        let (s, b, h) = call(
            c,
            reqwest::Method::PUT,
            &r.ex.url(&format!("Patient?identifier={system}|{mrn}")),
            "TREAT",
            &[],
            Some(&patient(system, mrn, given, family, dob, ssn)),
        )
        .await;
        assert!(s == 201 || s == 200, "{b}");
        let outcome = h
            .get("x-mpi-outcome")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        src.push((b["id"].as_str().unwrap_or_default().to_string(), outcome));
    }
    let eid = src[1]
        .1
        .split_whitespace()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        src[1].1.starts_with("linked"),
        "the lab's record must link: {}",
        src[1].1
    );
    let mut docs = Vec::new();
    for (name, labels) in [
        (
            "visit.txt",
            json!([{ "coding": [{ "system": CONF, "code": "N" }] }]),
        ),
        (
            "psych.txt",
            json!([{ "coding": [{ "system": CONF, "code": "R" }] }, { "coding": [{ "system": ACT, "code": "PSY" }] }]),
        ),
    ] {
        let (url, size, hash) = r
            .repo
            .put_document(name, format!("{name}: synthetic").as_bytes());
        let subject = json!({ "reference": format!("Patient/{}", src[0].0) });
        let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
            { "fullUrl": "urn:uuid:s", "request": { "method": "POST", "url": "List" }, "resource": {
                "resourceType": "List", "identifier": [{ "use": "usual", "value": format!("urn:set:{name}") }],
                "status": "current", "mode": "working", "subject": subject, "date": "2026-11-01T00:00:00Z",
                "code": { "coding": [{ "system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset" }] },
                "entry": [{ "item": { "reference": "urn:uuid:d" } }] } },
            { "fullUrl": "urn:uuid:d", "request": { "method": "POST", "url": "DocumentReference" }, "resource": {
                "resourceType": "DocumentReference", "masterIdentifier": { "value": format!("urn:doc:{name}") },
                "status": "current", "subject": subject, "date": "2026-11-01T00:00:00Z",
                "type": { "coding": [{ "system": "http://loinc.org", "code": "11506-3" }] },
                "category": [{ "coding": [{ "system": "http://loinc.org", "code": "11506-3" }] }],
                "securityLabel": labels,
                "content": [{ "attachment": { "contentType": "text/plain", "url": url, "size": size, "hash": hash },
                              "format": { "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient" } }] } }
        ] });
        let (s, b, _) = call(
            &r.hospital,
            reqwest::Method::POST,
            &r.ex.url(""),
            "TREAT",
            &[],
            Some(&bundle),
        )
        .await;
        assert_eq!(s, 200, "{b}");
        docs.push(
            b["entry"][1]["response"]["location"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("DocumentReference/")
                .to_string(),
        );
    }
    (src[0].0.clone(), eid, docs[0].clone(), docs[1].clone())
}

fn consent(patient: Value, provision: Value) -> Value {
    json!({ "resourceType": "Consent", "status": "active", "patient": patient, "provision": provision })
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|x| x["resource"]["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn btg(bundle: &Value) -> bool {
    bundle["meta"]["security"].to_string().contains("BTG")
}

async fn directives_on_every_read_path(backend: Backend) {
    let r = region(&backend, "");
    let (h_src, eid, normal, psych) = setup(&r).await;
    let pdq = "Patient?family=castellano&birthdate=1979-05-14";
    let docs = format!("DocumentReference?patient.identifier={LAB}|L-1");
    let (s, found) = get(&r.lab, &r, pdq, "TREAT").await;
    assert_eq!((s, found["total"].clone()), (200, json!(1)), "{found}");
    let (_, d) = get(&r.lab, &r, &docs, "TREAT").await;
    assert_eq!(d["total"], 2);

    // Purposes of use by member type: only emergency departments assert ETREAT.
    let (s, o) = get(&r.lab, &r, pdq, "ETREAT").await;
    assert_eq!(s, 403, "{o}");
    let (s, o, _) = call(
        &r.lab,
        reqwest::Method::GET,
        &r.ex.url(pdq),
        "TREAT",
        &BTG,
        None,
    )
    .await;
    assert_eq!(s, 400, "a reason without ETREAT: {o}");
    let (s, _) = get(&r.ops, &r, pdq, "TREAT").await;
    assert_eq!(s, 403, "operators run the exchange; they do not treat");
    // Recording a directive takes the patient's request (PATRQT) or an operator.
    let restrict = consent(
        json!({ "reference": format!("Patient/{h_src}") }),
        json!({ "type": "deny", "securityLabel": [{ "system": ACT, "code": "PSY" }] }),
    );
    let (s, o, _) = call(
        &r.hospital,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "TREAT",
        &[],
        Some(&restrict),
    )
    .await;
    assert_eq!(s, 403, "{o}");
    let (s, o, _) = call(
        &r.clinic,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "PATRQT",
        &[],
        Some(&restrict),
    )
    .await;
    assert_eq!(
        s, 422,
        "a member records directives only for patients it holds: {o}"
    );

    // 1. Restrict a sensitive category: the mental-health document disappears without a trace.
    let (s, c, h) = call(
        &r.hospital,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "PATRQT",
        &[],
        Some(&restrict),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    assert_valid_fhir(&c);
    assert_eq!(c["meta"]["versionId"], "1");
    assert!(h.get("etag").is_some());
    let consent_id = c["id"].as_str().unwrap_or_default().to_string();
    let (_, d) = get(&r.lab, &r, &docs, "TREAT").await;
    assert_eq!(
        (d["total"].clone(), ids(&d)),
        (json!(1), vec![normal.clone()])
    );
    let (_, page) = get(&r.lab, &r, &format!("{docs}&_count=1"), "TREAT").await;
    assert!(
        !page.to_string().contains("\"next\""),
        "paging must not reveal the withheld document: {page}"
    );
    let (s, hidden) = get(&r.lab, &r, &format!("Binary/{psych}"), "TREAT").await;
    let (s2, unknown) = get(&r.lab, &r, "Binary/doc-999999", "TREAT").await;
    assert_eq!((s, s2), (404, 404));
    assert_eq!(
        hidden["issue"][0]["diagnostics"]
            .as_str()
            .map(|t| t.replace(&psych, "X")),
        unknown["issue"][0]["diagnostics"]
            .as_str()
            .map(|t| t.replace("doc-999999", "X")),
        "a withheld document is answered exactly like one that does not exist"
    );
    let (s, _) = get(&r.lab, &r, &format!("DocumentReference/{psych}"), "TREAT").await;
    assert_eq!(s, 404);
    // ETREAT alone does not override; with a reason it does, and says so.
    let (_, d) = get(&r.er, &r, &docs, "ETREAT").await;
    assert_eq!(d["total"], 1);
    assert!(!btg(&d));
    let (_, d, _) = get_btg(&r, &docs).await;
    assert_eq!(d["total"], 2);
    assert!(btg(&d), "{d}");
    let (s, bytes, h) = get_btg(&r, &format!("Binary/{psych}")).await;
    assert_eq!(s, 200, "{bytes}");
    assert_eq!(
        h.get("x-break-glass").and_then(|v| v.to_str().ok()),
        Some("released")
    );

    // 2. Deny one organisation (recorded by an operator): the clinic gets nothing, the lab still does.
    let deny_clinic = consent(
        json!({ "identifier": { "system": HOSP, "value": "H-1" } }),
        json!({ "type": "deny", "actor": [{ "reference": { "reference": "Organization/city-clinic" } }] }),
    );
    let (s, c, _) = call(
        &r.ops,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "HOPERAT",
        &[],
        Some(&deny_clinic),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    let (_, found) = get(&r.clinic, &r, pdq, "TREAT").await;
    assert_eq!((found["total"].clone(), ids(&found)), (json!(0), vec![]));
    let (s, pix) = get(
        &r.clinic,
        &r,
        &format!("Patient/$ihe-pix?sourceIdentifier={HOSP}|H-1"),
        "TREAT",
    )
    .await;
    let (_, pix_unknown) = get(
        &r.clinic,
        &r,
        &format!("Patient/$ihe-pix?sourceIdentifier={HOSP}|H-404"),
        "TREAT",
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        pix["issue"], pix_unknown["issue"],
        "denied is answered like unknown"
    );
    let (_, d) = get(
        &r.clinic,
        &r,
        &format!("DocumentReference?patient.identifier={HOSP}|H-1"),
        "TREAT",
    )
    .await;
    assert_eq!(d["total"], 0);
    let (s, _) = get(&r.clinic, &r, &format!("Patient/{eid}"), "TREAT").await;
    assert_eq!(s, 404);
    let (s, _) = get(
        &r.clinic,
        &r,
        &format!("federated/Observation?patient.identifier={HOSP}|H-1"),
        "TREAT",
    )
    .await;
    assert_eq!(s, 404);
    let m = json!({ "resourceType": "Parameters", "parameter": [{ "name": "resource", "resource": { "resourceType": "Patient", "name": [{ "family": "Castellano", "given": ["Imogen"] }], "birthDate": "1979-05-14" } }] });
    let (_, matched, _) = call(
        &r.clinic,
        reqwest::Method::POST,
        &r.ex.url("Patient/$match"),
        "TREAT",
        &[],
        Some(&m),
    )
    .await;
    assert_eq!(matched["total"], 0, "{matched}");
    let (_, matched, _) = call(
        &r.lab,
        reqwest::Method::POST,
        &r.ex.url("Patient/$match"),
        "TREAT",
        &[],
        Some(&m),
    )
    .await;
    assert_eq!(matched["total"], 1, "{matched}");
    let (_, found) = get(&r.lab, &r, pdq, "TREAT").await;
    assert_eq!(found["total"], 1);

    // 3. Versions, never silently overwritten.
    let mut withdrawn = restrict.clone();
    withdrawn["status"] = json!("inactive");
    let url = r.ex.url(&format!("Consent/{consent_id}"));
    let (s, _, _) = call(
        &r.hospital,
        reqwest::Method::PUT,
        &url,
        "PATRQT",
        &[],
        Some(&withdrawn),
    )
    .await;
    assert_eq!(s, 400, "If-Match is required");
    let (s, _, _) = call(
        &r.hospital,
        reqwest::Method::PUT,
        &url,
        "PATRQT",
        &[("If-Match", "W/\"7\"")],
        Some(&withdrawn),
    )
    .await;
    assert_eq!(s, 409, "a stale version is refused");
    let (s, c, _) = call(
        &r.hospital,
        reqwest::Method::PUT,
        &url,
        "PATRQT",
        &[("If-Match", "W/\"1\"")],
        Some(&withdrawn),
    )
    .await;
    assert_eq!(
        (s, c["meta"]["versionId"].clone()),
        (200, json!("2")),
        "{c}"
    );
    let (_, hist) = get(
        &r.hospital,
        &r,
        &format!("Consent/{consent_id}/_history"),
        "PATRQT",
    )
    .await;
    assert_eq!(hist["total"], 2);
    assert_valid_fhir(&hist);
    let (_, listed) = get(
        &r.hospital,
        &r,
        &format!("Consent?patient=Patient/{eid}"),
        "PATRQT",
    )
    .await;
    assert_eq!(listed["total"], 2, "{listed}");
    let (_, d) = get(&r.lab, &r, &docs, "TREAT").await;
    assert_eq!(d["total"], 2, "the withdrawn restriction no longer applies");

    // 4. Opt out of the exchange entirely: hidden from ordinary treatment everywhere.
    let opt_out = consent(
        json!({ "reference": format!("Patient/{eid}") }),
        json!({ "type": "deny" }),
    );
    let (s, c, _) = call(
        &r.hospital,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "PATRQT",
        &[],
        Some(&opt_out),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    for client in [&r.lab, &r.hospital] {
        let (_, found) = get(client, &r, pdq, "TREAT").await;
        assert_eq!(found["total"], 0, "{found}");
    }
    let (_, matched, _) = call(
        &r.lab,
        reqwest::Method::POST,
        &r.ex.url("Patient/$match"),
        "TREAT",
        &[],
        Some(&m),
    )
    .await;
    assert_eq!(matched["total"], 0);
    let (_, d) = get(&r.lab, &r, &docs, "TREAT").await;
    assert_eq!(d["total"], 0);
    let (s, _) = get(
        &r.lab,
        &r,
        &format!("Patient/$locate?identifier={LAB}|L-1"),
        "TREAT",
    )
    .await;
    assert_eq!(s, 404);
    // A record another member feeds later joins the person, and their opt-out with it.
    let (s, b, _) = call(
        &r.er,
        reqwest::Method::PUT,
        &r.ex.url(&format!("Patient?identifier={ER}|E-1")),
        "TREAT",
        &[],
        Some(&patient(
            ER,
            "E-1",
            "Imogen",
            "Castellano",
            "1979-05-14",
            "222-33-4444",
        )),
    )
    .await;
    assert!(s == 201, "{b}");
    let (_, found) = get(&r.lab, &r, pdq, "TREAT").await;
    assert_eq!(found["total"], 0, "{found}");
    // The other patient is untouched.
    let (_, q) = get(&r.lab, &r, "Patient?family=lindqvist", "TREAT").await;
    assert_eq!(q["total"], 1);
    // Break-the-glass opens it (the default model allows it) and says so.
    let (s, found, _) = get_btg(&r, pdq).await;
    assert_eq!((s, found["total"].clone()), (200, json!(1)));
    assert!(btg(&found));
    let (_, matched, _) = call(
        &r.er,
        reqwest::Method::POST,
        &r.ex.url("Patient/$match"),
        "ETREAT",
        &BTG,
        Some(&m),
    )
    .await;
    assert_eq!(matched["total"], 1);

    // 5. The accounting of disclosures, for the hospital acting on the patient's request.
    let account = format!("AuditEvent?patient=Patient/{eid}&_count=500");
    let (s, _) = get(&r.hospital, &r, &account, "TREAT").await;
    assert_eq!(s, 403);
    let (s, _) = get(&r.clinic, &r, &account, "PATRQT").await;
    assert_eq!(s, 403, "only a member holding the patient");
    let (s, acc) = get(&r.hospital, &r, &account, "PATRQT").await;
    assert_eq!(s, 200, "{acc}");
    let entries = acc["entry"].as_array().cloned().unwrap_or_default();
    let who = |e: &Value| {
        e["resource"]["agent"][0]["who"]["identifier"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(!entries.is_empty());
    assert!(
        entries.iter().all(|e| e["resource"]["outcome"] == "0"),
        "only what was disclosed"
    );
    assert!(
        !entries.iter().any(|e| who(e) == "city-clinic"),
        "the denied clinic saw nothing: {acc}"
    );
    let flagged = entries
        .iter()
        .filter(|e| e["resource"]["purposeOfEvent"].to_string().contains("BTG"))
        .count();
    // Break-the-glass disclosures: the document search, the retrieve, PDQm and $match.
    assert_eq!(flagged, 4, "{acc}");
    assert!(entries.iter().any(|e| who(e) == "city-lab"));
    assert_valid_fhir(&acc);

    // Operators list every break-the-glass access, by FHIR search and on the command line.
    let (s, list) = get(
        &r.ops,
        &r,
        "AuditEvent?break-glass=true&_count=100",
        "HOPERAT",
    )
    .await;
    assert_eq!(s, 200);
    let n = list["entry"].as_array().map(Vec::len).unwrap_or(0);
    assert!(n >= 4, "{list}");
    assert!(list["entry"].as_array().is_some_and(|e| e
        .iter()
        .all(|x| x["resource"]["purposeOfEvent"].to_string().contains("BTG"))));
    let out = r.ex.hie_ok(&["audit", "break-glass"]);
    assert!(
        out.contains("unconscious, no identification") && out.contains("county-er"),
        "{out}"
    );
    r.ex.hie_ok(&["audit", "verify"]);
}
on_both_backends!(directives_on_every_read_path);

async fn opt_in_model(backend: Backend) {
    let r = region(
        &backend,
        "[policy]\nmodel = \"opt-in\"\nbreak_glass_overrides_opt_out = false\n",
    );
    let (h_src, eid, _, _) = setup(&r).await;
    let pdq = "Patient?family=castellano";
    let (_, found) = get(&r.lab, &r, pdq, "TREAT").await;
    assert_eq!(
        found["total"], 0,
        "nothing is shared before the patient opts in"
    );
    let permit = consent(
        json!({ "reference": format!("Patient/{h_src}") }),
        json!({ "type": "permit" }),
    );
    let (s, c, _) = call(
        &r.hospital,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "PATRQT",
        &[],
        Some(&permit),
    )
    .await;
    assert_eq!(s, 201, "{c}");
    let (_, found) = get(&r.lab, &r, pdq, "TREAT").await;
    assert_eq!(found["total"], 1);
    // Opting out again, where break-the-glass may not override an opt-out.
    let opt_out = consent(
        json!({ "reference": format!("Patient/{eid}") }),
        json!({ "type": "deny" }),
    );
    let (s, _, _) = call(
        &r.hospital,
        reqwest::Method::POST,
        &r.ex.url("Consent"),
        "PATRQT",
        &[],
        Some(&opt_out),
    )
    .await;
    assert_eq!(s, 201);
    let (_, found, _) = get_btg(&r, pdq).await;
    assert_eq!(found["total"], 0, "{found}");
}
on_both_backends!(opt_in_model);

//! The document registry (MHD ITI-65/66/67/68) over real mutual TLS, with real member
//! repositories (`hie member-sim` processes with their own certificates), on SQLite and PostgreSQL.

mod common;

use common::{assert_valid_fhir, Backend, Exchange, MemberSim};
use serde_json::{json, Value};

const HOSP: &str = "urn:oid:2.16.840.1.113883.3.1";
const LAB: &str = "urn:oid:2.16.840.1.113883.3.2";
const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
const LOINC: &str = "http://loinc.org";

struct Region {
    ex: Exchange,
    hospital: reqwest::Client,
    lab: reqwest::Client,
    hospital_repo: MemberSim,
    lab_repo: MemberSim,
}

fn region(backend: &Backend, extra: &str, lab_delay_ms: u64) -> Region {
    let ex = Exchange::start_with(backend, extra);
    let (h, hospital_repo) = ex.enroll_with_repository("general-hospital", "hospital", HOSP, 0);
    let (l, lab_repo) = ex.enroll_with_repository("city-lab", "lab", LAB, lab_delay_ms);
    Region {
        hospital: ex.client(&h),
        lab: ex.client(&l),
        ex,
        hospital_repo,
        lab_repo,
    }
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    send_as(client, method, url, body, "TREAT").await
}

async fn send_as(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<&Value>,
    purpose: &str,
) -> (u16, Value) {
    let mut req = client
        .request(method, url)
        .header("X-Purpose-Of-Use", purpose)
        .header("X-User-Id", "dr-test");
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/fhir+json")
            .body(b.to_string());
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Feeds one person to both members (same SSN and demographics: linked). Returns the
/// hospital's and the lab's source record ids.
async fn feed_person(r: &Region) -> (String, String) {
    let mut ids = Vec::new();
    for (client, system, mrn) in [(&r.hospital, HOSP, "H-100"), (&r.lab, LAB, "L-900")] {
        let body = json!({
            "resourceType": "Patient",
            "identifier": [{ "system": system, "value": mrn }, { "system": SSN, "value": "123-45-6789" }],
            "name": [{ "family": "Okafor", "given": ["Adaeze"] }],
            "gender": "female",
            "birthDate": "1984-03-09",
            "address": [{ "line": ["12 Elm Street"], "city": "Springfield", "postalCode": "62701" }],
            "telecom": [{ "system": "phone", "value": "217-555-0143" }]
        });
        let (status, patient) = send(
            client,
            reqwest::Method::PUT,
            &r.ex.url(&format!("Patient?identifier={system}|{mrn}")),
            Some(&body),
        )
        .await;
        assert!(status == 201 || status == 200, "feed: {status} {patient}");
        ids.push(patient["id"].as_str().unwrap_or_default().to_string());
    }
    (ids[0].clone(), ids[1].clone())
}

struct Doc<'a> {
    master_id: &'a str,
    subject: Value,
    url: &'a str,
    size: usize,
    hash: &'a str,
    category: &'a str,
    doc_type: &'a str,
    date: &'a str,
    org: &'a str,
    confidentiality: &'a str,
}

fn document_reference(d: &Doc) -> Value {
    json!({
        "resourceType": "DocumentReference",
        "masterIdentifier": { "system": "urn:ietf:rfc:3986", "value": d.master_id },
        "status": "current",
        "type": { "coding": [{ "system": LOINC, "code": d.doc_type }] },
        "category": [{ "coding": [{ "system": LOINC, "code": d.category }] }],
        "subject": d.subject,
        "date": d.date,
        "author": [{ "reference": format!("Organization/{}", d.org) }],
        "securityLabel": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": d.confidentiality }] }],
        "content": [{
            "attachment": { "contentType": "text/plain", "url": d.url, "size": d.size, "hash": d.hash, "title": "note" },
            "format": { "system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient" }
        }],
        "context": { "practiceSetting": { "coding": [{ "system": "http://snomed.info/sct", "code": "394802001" }] } }
    })
}

/// A transaction Bundle: one SubmissionSet naming every DocumentReference.
fn submission(set_id: &str, subject: &Value, docs: Vec<Value>) -> Value {
    let mut entries = vec![];
    let items: Vec<Value> = (0..docs.len())
        .map(|i| json!({ "item": { "reference": format!("urn:uuid:00000000-0000-4000-8000-00000000000{i}") } }))
        .collect();
    entries.push(json!({
        "fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000ff",
        "resource": {
            "resourceType": "List",
            "identifier": [{ "use": "usual", "system": "urn:ietf:rfc:3986", "value": set_id }],
            "status": "current",
            "mode": "working",
            "code": { "coding": [{ "system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes", "code": "submissionset" }] },
            "subject": subject,
            "date": "2026-11-20T09:00:00Z",
            "entry": items
        },
        "request": { "method": "POST", "url": "List" }
    }));
    for (i, d) in docs.into_iter().enumerate() {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:00000000-0000-4000-8000-00000000000{i}"),
            "resource": d,
            "request": { "method": "POST", "url": "DocumentReference" }
        }));
    }
    json!({ "resourceType": "Bundle", "type": "transaction", "entry": entries })
}

async fn submit(client: &reqwest::Client, ex: &Exchange, bundle: &Value) -> (u16, Value) {
    send(client, reqwest::Method::POST, &ex.url(""), Some(bundle)).await
}

async fn search(client: &reqwest::Client, ex: &Exchange, query: &str) -> (u16, Value) {
    send(
        client,
        reqwest::Method::GET,
        &ex.url(&format!("DocumentReference?{query}")),
        None,
    )
    .await
}

fn ids_of(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|x| x["resource"]["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn issue_text(outcome: &Value) -> String {
    outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn retrieve(client: &reqwest::Client, url: &str) -> (u16, Result<Vec<u8>, String>) {
    let resp = client
        .get(url)
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await
        .expect("retrieve");
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| format!("{e:?}"));
    (status, body)
}

/// Registers one document of `repo` for `subject`; returns its DocumentReference id.
async fn register_one(
    r: &Region,
    client: &reqwest::Client,
    repo: &MemberSim,
    subject: Value,
    name: &str,
    bytes: &[u8],
    category: &str,
) -> String {
    let (url, size, hash) = repo.put_document(name, bytes);
    let doc = document_reference(&Doc {
        master_id: &format!("urn:oid:1.2.3.{name}"),
        subject: subject.clone(),
        url: &url,
        size,
        hash: &hash,
        category,
        doc_type: "11506-3",
        date: "2026-11-20T08:00:00Z",
        org: &repo.org,
        confidentiality: "N",
    });
    let (status, resp) = submit(
        client,
        &r.ex,
        &submission(&format!("urn:oid:9.9.{name}"), &subject, vec![doc]),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    resp["entry"][1]["response"]["location"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("DocumentReference/")
        .to_string()
}

async fn register_find_retrieve(backend: Backend) {
    let r = region(&backend, "", 0);
    let (hosp_src, lab_src) = feed_person(&r).await;

    // The hospital registers a discharge summary, naming the patient by its own MRN.
    let note = b"Discharge summary: synthetic patient, no real data.\n".repeat(40);
    let (url, size, hash) = r.hospital_repo.put_document("discharge-1.txt", &note);
    let hospital_subject = json!({ "identifier": { "system": HOSP, "value": "H-100" } });
    let bundle = submission(
        "urn:oid:9.9.1",
        &hospital_subject,
        vec![document_reference(&Doc {
            master_id: "urn:oid:1.2.3.1",
            subject: hospital_subject.clone(),
            url: &url,
            size,
            hash: &hash,
            category: "18842-5",
            doc_type: "18842-5",
            date: "2026-11-01T10:00:00Z",
            org: "general-hospital",
            confidentiality: "N",
        })],
    );
    let (status, resp) = submit(&r.hospital, &r.ex, &bundle).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    assert_eq!(resp["entry"][0]["response"]["status"], "201 Created");
    assert_valid_fhir(&resp);

    // Resubmitting the identical submission changes nothing and answers the same locations.
    let (status, again) = submit(&r.hospital, &r.ex, &bundle).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["entry"][1]["response"]["status"], "200 OK");
    assert_eq!(
        again["entry"][1]["response"]["location"],
        resp["entry"][1]["response"]["location"]
    );

    // The lab registers a result report for the same person, by the Patient the MPI returned.
    let lab_subject = json!({ "reference": format!("Patient/{lab_src}") });
    let report = b"CBC: within normal limits (synthetic)\n";
    let lab_doc = register_one(
        &r,
        &r.lab,
        &r.lab_repo,
        lab_subject,
        "cbc-1.txt",
        report,
        "11502-2",
    )
    .await;

    // Any identifier linked to the person finds the documents of every member.
    for query in [
        format!("patient.identifier={HOSP}|H-100"),
        format!("patient.identifier={LAB}|L-900"),
        format!("patient.identifier={SSN}|123-45-6789"),
        format!("patient=Patient/{hosp_src}"),
    ] {
        let (status, found) = search(&r.hospital, &r.ex, &query).await;
        assert_eq!(status, 200, "{query}: {found}");
        assert_eq!(found["total"], 2, "{query}: {found}");
        assert_valid_fhir(&found);
    }
    let (_, found) = search(
        &r.hospital,
        &r.ex,
        &format!("patient.identifier={HOSP}|H-100"),
    )
    .await;
    // Newest first; each says which member holds it; urls point at the broker.
    let entries = found["entry"].as_array().cloned().unwrap_or_default();
    assert_eq!(entries[0]["resource"]["id"], lab_doc.as_str());
    assert_eq!(
        entries[0]["resource"]["meta"]["source"],
        "Organization/city-lab"
    );
    assert_eq!(
        entries[0]["resource"]["custodian"]["reference"],
        "Organization/city-lab"
    );
    assert_eq!(
        entries[1]["resource"]["meta"]["source"],
        "Organization/general-hospital"
    );
    for e in &entries {
        let url = e["resource"]["content"][0]["attachment"]["url"]
            .as_str()
            .unwrap_or_default();
        assert!(
            url.starts_with(&r.ex.base) && url.contains("/Binary/doc-"),
            "{url}"
        );
    }

    // Filters, sorting and paging.
    let p = format!("patient.identifier={HOSP}|H-100");
    for (query, expect) in [
        (
            format!("{p}&category={LOINC}|11502-2"),
            vec![lab_doc.clone()],
        ),
        (format!("{p}&type=18842-5"), vec![ids_of(&found)[1].clone()]),
        (format!("{p}&date=ge2026-11-10"), vec![lab_doc.clone()]),
        (
            format!("{p}&date=lt2026-11-10"),
            vec![ids_of(&found)[1].clone()],
        ),
        (
            format!("{p}&author=Organization/city-lab"),
            vec![lab_doc.clone()],
        ),
        (
            format!("{p}&security-label=N&setting=394802001"),
            ids_of(&found),
        ),
        (
            format!("{p}&format=urn:ihe:iti:xds:2017:mimeTypeSufficient&_sort=date"),
            ids_of(&found).into_iter().rev().collect(),
        ),
        (format!("{p}&status=superseded"), vec![]),
        (
            "identifier=urn:oid:1.2.3.1".to_string(),
            vec![ids_of(&found)[1].clone()],
        ),
    ] {
        let (status, b) = search(&r.lab, &r.ex, &query).await;
        assert_eq!(status, 200, "{query}: {b}");
        assert_eq!(ids_of(&b), expect, "{query}");
    }
    let (_, page1) = search(&r.hospital, &r.ex, &format!("{p}&_count=1")).await;
    assert_eq!(page1["total"], 2);
    assert_eq!(ids_of(&page1).len(), 1);
    let next = page1["link"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["relation"] == "next"))
        .and_then(|x| x["url"].as_str())
        .unwrap_or_default()
        .to_string();
    let (status, page2) = send(&r.hospital, reqwest::Method::GET, &next, None).await;
    assert_eq!(status, 200, "{page2}");
    assert_eq!(ids_of(&page2), vec![ids_of(&found)[1].clone()]);

    // POST _search, form-encoded.
    let resp = r
        .lab
        .post(r.ex.url("DocumentReference/_search"))
        .header("X-Purpose-Of-Use", "TREAT")
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("patient.identifier={LAB}%7CL-900&category=18842-5"))
        .send()
        .await
        .expect("post search");
    assert_eq!(resp.status().as_u16(), 200);
    let b: Value = resp.json().await.expect("json");
    assert_eq!(ids_of(&b), vec![ids_of(&found)[1].clone()]);

    let (status, capability) =
        send(&r.lab, reqwest::Method::GET, &r.ex.url("metadata"), None).await;
    assert_eq!(status, 200);
    assert_valid_fhir(&capability);
    let (status, one) = send(
        &r.lab,
        reqwest::Method::GET,
        &r.ex.url(&format!("DocumentReference/{lab_doc}")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_valid_fhir(&one);

    // ITI-66: the SubmissionSets of the person.
    let (status, lists) = send(
        &r.lab,
        reqwest::Method::GET,
        &r.ex.url(&format!("List?{p}&code=submissionset")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{lists}");
    assert_eq!(lists["total"], 2);
    assert_valid_fhir(&lists);

    // ITI-68: the hospital retrieves the lab's report and the lab the hospital's summary,
    // both through the broker, which fetches them with its own certificate.
    let (status, bytes) = retrieve(&r.hospital, &r.ex.url(&format!("Binary/{lab_doc}"))).await;
    assert_eq!(status, 200);
    assert_eq!(bytes.as_deref().ok(), Some(&report[..]));
    let (status, bytes) = retrieve(
        &r.lab,
        entries[1]["resource"]["content"][0]["attachment"]["url"]
            .as_str()
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bytes.ok(), Some(note));

    // A member's own client certificate does not open another member's repository directly:
    // the repository trusts the exchange CA, but a client without a certificate gets nothing.
    let direct = r.ex.client_without_cert().get(&url).send().await;
    assert!(
        direct.is_err(),
        "repository answered without a client certificate"
    );

    // Every retrieve is on the record, with the person it disclosed.
    let ops = r.ex.client(&r.ex.enroll("exchange-ops", "operator", &[]));
    let (status, audit) = send_as(
        &ops,
        reqwest::Method::GET,
        &r.ex.url("AuditEvent?_count=500"),
        None,
        "HOPERAT",
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let retrieves = audit["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x.to_string().contains("ITI-68"))
                .count()
        })
        .unwrap_or(0);
    assert!(retrieves >= 2, "{audit}");
}
on_both_backends!(register_find_retrieve);

async fn refused_submissions_change_nothing(backend: Backend) {
    let r = region(&backend, "", 0);
    let (hosp_src, _) = feed_person(&r).await;
    let subject = json!({ "reference": format!("Patient/{hosp_src}") });
    let existing = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "first.txt",
        b"first",
        "11502-2",
    )
    .await;
    let (url, size, hash) = r
        .hospital_repo
        .put_document("second.txt", b"second document");
    let doc = |master: &str, subject: Value, url: &str, hash: &str| {
        document_reference(&Doc {
            master_id: master,
            subject,
            url,
            size,
            hash,
            category: "11502-2",
            doc_type: "11506-3",
            date: "2026-11-21T08:00:00Z",
            org: "general-hospital",
            confidentiality: "N",
        })
    };
    let good = doc("urn:oid:5.5.1", subject.clone(), &url, &hash);

    let mut cases: Vec<(&str, Value, u16, &str)> = Vec::new();
    // Unknown patient.
    let ghost = json!({ "reference": "Patient/src-999999" });
    cases.push((
        "unknown patient",
        submission(
            "urn:oid:7.1",
            &ghost,
            vec![doc("urn:oid:5.5.2", ghost.clone(), &url, &hash)],
        ),
        422,
        "XDSUnknownPatientId",
    ));
    // Inline data.
    let mut inline = good.clone();
    inline["content"][0]["attachment"]["data"] = json!("c2Vjb25k");
    cases.push((
        "inline data",
        submission("urn:oid:7.2", &subject, vec![inline]),
        400,
        "attachment.data",
    ));
    // A URL outside the member's registered base.
    let foreign = doc(
        "urn:oid:5.5.3",
        subject.clone(),
        "https://elsewhere.example/fhir/Binary/x",
        &hash,
    );
    cases.push((
        "foreign url",
        submission("urn:oid:7.3", &subject, vec![foreign]),
        400,
        "not under your registered FHIR base",
    ));
    let lab_url = format!("{}/Binary/second.txt", r.lab_repo.base);
    let other_member = doc("urn:oid:5.5.4", subject.clone(), &lab_url, &hash);
    cases.push((
        "another member's url",
        submission("urn:oid:7.4", &subject, vec![other_member]),
        400,
        "not under your registered FHIR base",
    ));
    // Missing required metadata points at the element.
    let mut no_label = good.clone();
    no_label.as_object_mut().map(|o| o.remove("securityLabel"));
    cases.push((
        "no confidentiality",
        submission("urn:oid:7.5", &subject, vec![no_label]),
        400,
        "securityLabel",
    ));
    let mut no_format = good.clone();
    no_format["content"][0]
        .as_object_mut()
        .map(|o| o.remove("format"));
    cases.push((
        "no format",
        submission("urn:oid:7.6", &subject, vec![no_format]),
        400,
        "content.format",
    ));
    let mut bad_hash = good.clone();
    bad_hash["content"][0]["attachment"]["hash"] = json!("not-a-sha1");
    cases.push((
        "bad hash",
        submission("urn:oid:7.7", &subject, vec![bad_hash]),
        400,
        "SHA-1",
    ));
    // Someone else's custodian.
    let mut custodian = good.clone();
    custodian["custodian"] = json!({ "reference": "Organization/city-lab" });
    cases.push((
        "foreign custodian",
        submission("urn:oid:7.8", &subject, vec![custodian]),
        403,
        "only its own documents",
    ));
    // Atomicity: a good document plus one whose id is taken by different content.
    let taken = doc("urn:oid:1.2.3.first.txt", subject.clone(), &url, &hash);
    cases.push((
        "duplicate id, different content",
        submission("urn:oid:7.9", &subject, vec![good.clone(), taken]),
        409,
        "XDSDuplicateUniqueIdInRegistry",
    ));
    // A document the SubmissionSet does not name.
    let mut orphan = submission("urn:oid:7.10", &subject, vec![good.clone()]);
    orphan["entry"][0]["resource"]["entry"] = json!([]);
    cases.push(("orphan document", orphan, 400, "SubmissionSet"));
    // No SubmissionSet, a Binary, a batch of the wrong kind.
    let mut no_set = submission("urn:oid:7.11", &subject, vec![good.clone()]);
    no_set["entry"].as_array_mut().map(|e| e.remove(0));
    cases.push(("no submission set", no_set, 400, "SubmissionSet"));
    let mut binary = submission("urn:oid:7.12", &subject, vec![good.clone()]);
    if let Some(e) = binary["entry"].as_array_mut() {
        e.push(json!({ "resource": { "resourceType": "Binary", "contentType": "text/plain", "data": "eA==" }, "request": { "method": "POST", "url": "Binary" } }))
    }
    cases.push(("binary entry", binary, 400, "Binary"));
    let lab_subject = json!({ "identifier": { "system": LAB, "value": "L-900" } });
    cases.push((
        "someone else's identifier system",
        submission(
            "urn:oid:7.13",
            &lab_subject,
            vec![doc("urn:oid:5.5.5", lab_subject.clone(), &url, &hash)],
        ),
        403,
        "identifier systems",
    ));

    for (what, bundle, status, text) in cases {
        let (got, outcome) = submit(&r.hospital, &r.ex, &bundle).await;
        assert_eq!(got, status, "{what}: {outcome}");
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}");
        assert!(issue_text(&outcome).contains(text), "{what}: {outcome}");
        assert_valid_fhir(&outcome);
    }
    // A broken Bundle.
    let resp = r
        .hospital
        .post(r.ex.url(""))
        .header("X-Purpose-Of-Use", "TREAT")
        .header("Content-Type", "application/fhir+json")
        .body("{\"resourceType\": \"Bundle\", \"type\": \"transaction\", \"entry\": [")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 400);

    // Nothing of any refused submission was stored.
    let (_, found) = search(
        &r.hospital,
        &r.ex,
        &format!("patient=Patient/{hosp_src}&status=current,superseded,entered-in-error"),
    )
    .await;
    assert_eq!(ids_of(&found), vec![existing]);
    let (_, lists) = send(
        &r.hospital,
        reqwest::Method::GET,
        &r.ex.url(&format!("List?patient=Patient/{hosp_src}")),
        None,
    )
    .await;
    assert_eq!(lists["total"], 1, "{lists}");

    // The good document alone goes through.
    let (status, resp) = submit(
        &r.hospital,
        &r.ex,
        &submission("urn:oid:7.20", &subject, vec![good]),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
}
on_both_backends!(refused_submissions_change_nothing);

async fn replace_and_retire(backend: Backend) {
    let r = region(&backend, "", 0);
    let (hosp_src, lab_src) = feed_person(&r).await;
    let subject = json!({ "reference": format!("Patient/{hosp_src}") });
    let v1 = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "v1.txt",
        b"version one",
        "11502-2",
    )
    .await;
    let lab_doc = register_one(
        &r,
        &r.lab,
        &r.lab_repo,
        json!({ "reference": format!("Patient/{lab_src}") }),
        "lab.txt",
        b"lab",
        "11502-2",
    )
    .await;

    let (url, size, hash) = r
        .hospital_repo
        .put_document("v2.txt", b"version two, corrected");
    let replacement = |master: &str, target: &str| {
        let mut d = document_reference(&Doc {
            master_id: master,
            subject: subject.clone(),
            url: &url,
            size,
            hash: &hash,
            category: "11502-2",
            doc_type: "11506-3",
            date: "2026-11-22T08:00:00Z",
            org: "general-hospital",
            confidentiality: "N",
        });
        d["relatesTo"] = json!([{ "code": "replaces", "target": { "reference": format!("DocumentReference/{target}") } }]);
        d
    };
    // Only the author may replace: the hospital cannot replace the lab's document.
    let (status, outcome) = submit(
        &r.hospital,
        &r.ex,
        &submission(
            "urn:oid:8.1",
            &subject,
            vec![replacement("urn:oid:6.1", &lab_doc)],
        ),
    )
    .await;
    assert_eq!(status, 403, "{outcome}");
    let (status, _) = retrieve(&r.hospital, &r.ex.url(&format!("Binary/{lab_doc}"))).await;
    assert_eq!(status, 200, "the lab's document is untouched");

    // The hospital replaces its own: the old one is superseded in the same transaction.
    let (status, resp) = submit(
        &r.hospital,
        &r.ex,
        &submission(
            "urn:oid:8.2",
            &subject,
            vec![replacement("urn:oid:6.2", &v1)],
        ),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let v2 = resp["entry"][1]["response"]["location"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("DocumentReference/")
        .to_string();
    let p = format!("patient=Patient/{hosp_src}");
    let (_, current) = search(&r.lab, &r.ex, &p).await;
    assert_eq!(ids_of(&current), vec![v2.clone(), lab_doc.clone()]);
    let (_, old) = search(&r.lab, &r.ex, &format!("{p}&status=superseded")).await;
    assert_eq!(ids_of(&old), vec![v1.clone()]);
    let (_, related) = search(
        &r.lab,
        &r.ex,
        &format!("{p}&relatesto=DocumentReference/{v1}&relation=replaces"),
    )
    .await;
    assert_eq!(ids_of(&related), vec![v2.clone()]);
    let (status, outcome) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{v1}"))).await;
    assert_eq!(status, 410, "{outcome:?}");
    // Replacing a superseded document again is refused.
    let (status, outcome) = submit(
        &r.hospital,
        &r.ex,
        &submission(
            "urn:oid:8.3",
            &subject,
            vec![replacement("urn:oid:6.3", &v1)],
        ),
    )
    .await;
    assert_eq!(status, 422, "{outcome}");

    // Other relations are stored and searchable.
    let mut appendix = replacement("urn:oid:6.4", &v2);
    appendix["relatesTo"][0]["code"] = json!("appends");
    let (url4, size4, hash4) = r.hospital_repo.put_document("addendum.txt", b"addendum");
    appendix["content"][0]["attachment"] =
        json!({ "contentType": "text/plain", "url": url4, "size": size4, "hash": hash4 });
    let (status, resp) = submit(
        &r.hospital,
        &r.ex,
        &submission("urn:oid:8.4", &subject, vec![appendix]),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    let (_, appended) = search(&r.lab, &r.ex, &format!("{p}&relation=appends")).await;
    assert_eq!(ids_of(&appended).len(), 1);
    let (_, still) = search(&r.lab, &r.ex, &format!("{p}&_count=10")).await;
    assert_eq!(still["total"], 3, "appends does not supersede: {still}");

    // entered-in-error: the lab may not, the author may.
    let retire = |id: &str| {
        json!({ "resourceType": "Bundle", "type": "transaction", "entry": [{
            "resource": { "resourceType": "DocumentReference", "status": "entered-in-error" },
            "request": { "method": "PUT", "url": format!("DocumentReference/{id}") }
        }] })
    };
    let (status, outcome) = submit(&r.lab, &r.ex, &retire(&v2)).await;
    assert_eq!(status, 403, "{outcome}");
    let (status, resp) = submit(&r.hospital, &r.ex, &retire(&v2)).await;
    assert_eq!(status, 200, "{resp}");
    let (status, _) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{v2}"))).await;
    assert_eq!(status, 410);
    let (_, err) = search(&r.lab, &r.ex, &format!("{p}&status=entered-in-error")).await;
    assert_eq!(ids_of(&err), vec![v2]);
}
on_both_backends!(replace_and_retire);

async fn retrieve_failures(backend: Backend) {
    // The lab's repository answers 3 s late; the broker waits 1 s.
    let r = region(&backend, "[members]\ntimeout_ms = 1000\n", 3000);
    let (hosp_src, lab_src) = feed_person(&r).await;
    let subject = json!({ "reference": format!("Patient/{hosp_src}") });

    // Slow member: 504.
    let slow = register_one(
        &r,
        &r.lab,
        &r.lab_repo,
        json!({ "reference": format!("Patient/{lab_src}") }),
        "slow.txt",
        b"slow",
        "11502-2",
    )
    .await;
    let (status, body) = retrieve(&r.hospital, &r.ex.url(&format!("Binary/{slow}"))).await;
    assert_eq!(status, 504, "{body:?}");

    // Hash mismatch: the repository's file differs from what was registered; the transfer is cut
    // before the client has the whole document.
    let tampered = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "tampered.txt",
        &b"A".repeat(200_000),
        "11502-2",
    )
    .await;
    r.hospital_repo
        .put_document("tampered.txt", &b"B".repeat(200_000));
    let (status, body) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{tampered}"))).await;
    assert!(
        status != 200 || body.is_err(),
        "a tampered document was delivered whole"
    );
    // Size mismatch is caught before anything is sent.
    let resized = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "resized.txt",
        b"short",
        "11502-2",
    )
    .await;
    r.hospital_repo
        .put_document("resized.txt", b"much longer than registered");
    let (status, _) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{resized}"))).await;
    assert_eq!(status, 502);
    // The document is gone from the repository.
    let gone = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "gone.txt",
        b"gone",
        "11502-2",
    )
    .await;
    std::fs::remove_file(r.hospital_repo.data.path().join("documents/gone.txt")).expect("rm");
    let (status, _) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{gone}"))).await;
    assert_eq!(status, 502);
    // Unknown document.
    let (status, _) = retrieve(&r.lab, &r.ex.url("Binary/doc-999999")).await;
    assert_eq!(status, 404);
    let (status, _) = retrieve(&r.lab, &r.ex.url("Binary/not-an-id")).await;
    assert_eq!(status, 404);

    // Member down: 502, with an OperationOutcome that names the member.
    let ok_doc = register_one(
        &r,
        &r.hospital,
        &r.hospital_repo,
        subject.clone(),
        "fine.txt",
        b"fine",
        "11502-2",
    )
    .await;
    let (status, _) = retrieve(&r.lab, &r.ex.url(&format!("Binary/{ok_doc}"))).await;
    assert_eq!(status, 200);
    let mut repo = r.hospital_repo;
    repo.kill();
    let (status, outcome) = send(
        &r.lab,
        reqwest::Method::GET,
        &r.ex.url(&format!("Binary/{ok_doc}")),
        None,
    )
    .await;
    assert_eq!(status, 502, "{outcome}");
    assert!(
        issue_text(&outcome).contains("general-hospital"),
        "{outcome}"
    );
    assert_valid_fhir(&outcome);

    // Failures are audited too.
    let ops = r.ex.client(&r.ex.enroll("exchange-ops", "operator", &[]));
    let (status, audit) = send_as(
        &ops,
        reqwest::Method::GET,
        &r.ex.url("AuditEvent?_count=500"),
        None,
        "HOPERAT",
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let text = audit.to_string();
    assert!(text.contains("could not be reached"), "{text}");
    assert!(text.contains("did not answer within"), "{text}");
}
on_both_backends!(retrieve_failures);

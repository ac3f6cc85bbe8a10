//! `hie member-sim`: a small but real member EHR for tests, benchmarks and the demo. It is an
//! HTTPS server that requires a client certificate issued by the exchange CA (the broker's),
//! and serves the member's own documents from a data directory:
//!
//! ```text
//! DIR/documents/NAME      ->  GET {base}/Binary/NAME   (bytes; type from the file extension)
//! DIR/patients.ndjson     ->  GET {base}/Patient?identifier=SYSTEM|VALUE
//! DIR/resources.ndjson    ->  GET {base}/{Type}?patient.identifier=SYSTEM|VALUE[&_count=N]
//! DIR/documents.ndjson    ->  what `--feed` registers: {"file", "patient" (MRN), "code", "display", "contentType"}
//! ```
//!
//! With `--feed BROKER_BASE` it first feeds its patients to the broker (PIXm, in batch Bundles)
//! and registers its documents (MHD ITI-65), with its own certificate, then serves.
//!
//! A resource belongs to the patient named by the identifier in its `subject` or `patient`.
//! `--delay-ms` makes every answer late (a slow member); `--fault invalid-json` answers searches
//! with a body that is not JSON (a broken member).

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::net::TcpStream;

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::tls::{ClientTrust, PeerCert};

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub org: String,
    pub listen: std::net::SocketAddr,
    pub data: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub crl: PathBuf,
    pub delay: Duration,
    pub fault: Option<String>,
    /// The broker's FHIR base to feed patients and documents to before serving.
    pub feed: Option<String>,
}

/// One line of DIR/documents.ndjson: a document file and what it is about.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DocumentSpec {
    pub file: String,
    /// The member's own MRN of the patient.
    pub patient: String,
    /// LOINC document type (also used as the class).
    pub code: String,
    pub display: String,
    #[serde(default = "default_content_type")]
    pub content_type: String,
}

fn default_content_type() -> String {
    "text/plain".into()
}

/// An ITI-65 submission of one document held at `base`/Binary/FILE, about `system|patient`.
pub fn submission(
    org: &str,
    base: &str,
    system: &str,
    spec: &DocumentSpec,
    bytes: &[u8],
) -> serde_json::Value {
    let hash = openssl::base64::encode_block(&openssl::sha::sha1(bytes));
    let subject = serde_json::json!({ "identifier": { "system": system, "value": spec.patient } });
    let coded = serde_json::json!({ "coding": [{ "system": "http://loinc.org", "code": spec.code, "display": spec.display }] });
    let now = crate::time::to_instant(crate::time::now_micros());
    serde_json::json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "fullUrl": "urn:uuid:submission", "request": { "method": "POST", "url": "List" }, "resource": {
            "resourceType": "List", "identifier": [{ "use": "usual", "value": format!("urn:{org}:set:{}", spec.file) }],
            "status": "current", "mode": "working", "subject": subject, "date": now,
            "code": { "coding": [{ "system": crate::registry::LIST_TYPES, "code": "submissionset" }] },
            "entry": [{ "item": { "reference": "urn:uuid:doc" } }] } },
        { "fullUrl": "urn:uuid:doc", "request": { "method": "POST", "url": "DocumentReference" }, "resource": {
            "resourceType": "DocumentReference", "masterIdentifier": { "value": format!("urn:{org}:{}", spec.file) },
            "status": "current", "subject": subject, "date": now, "type": coded, "category": [coded],
            "author": [{ "reference": format!("Organization/{org}") }],
            "securityLabel": [{ "coding": [{ "system": crate::registry::CONFIDENTIALITY, "code": "N" }] }],
            "content": [{ "attachment": { "contentType": spec.content_type, "url": format!("{base}/Binary/{}", spec.file),
                                          "size": bytes.len(), "hash": hash, "title": spec.display },
                          "format": { "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient" } }] } }
    ] })
}

/// Feeds the member's patients and registers its documents at the broker, as the member.
async fn feed(options: &SimOptions, broker: &str, own_base: &str) -> Result<()> {
    let tls = crate::tls::client_config(&options.ca, Some((&options.cert, &options.key)))?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Error::config(format!("client: {e}")))?;
    let broker = broker.trim_end_matches('/');
    let post = |body: serde_json::Value| {
        let client = client.clone();
        async move {
            let r = client
                .post(broker)
                .header("X-Purpose-Of-Use", "TREAT")
                .header("Content-Type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .map_err(|e| {
                    Error::config(format!(
                        "the broker at {broker} could not be reached: {}",
                        crate::outbound::describe(&e)
                    ))
                })?;
            let status = r.status();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            if status.is_success() {
                Ok(body)
            } else {
                Err(Error::config(format!(
                    "the broker answered {status}: {}",
                    body["issue"][0]["diagnostics"]
                )))
            }
        }
    };
    let patients = load_ndjson(&options.data.join("patients.ndjson"))?;
    let mut system_of = HashMap::new();
    for chunk in patients.chunks(500) {
        let entries: Vec<serde_json::Value> = chunk
            .iter()
            .filter_map(|p| {
                let id = &p["identifier"][0];
                let (system, value) = (id["system"].as_str()?, id["value"].as_str()?);
                system_of.insert(value.to_string(), system.to_string());
                Some(serde_json::json!({ "resource": p, "request": { "method": "PUT", "url": format!("Patient?identifier={system}|{value}") } }))
            })
            .collect();
        let answer = post(
            serde_json::json!({ "resourceType": "Bundle", "type": "batch", "entry": entries }),
        )
        .await?;
        let failed = answer["entry"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|x| {
                        !x["response"]["status"]
                            .as_str()
                            .unwrap_or("")
                            .starts_with('2')
                    })
                    .count()
            })
            .unwrap_or(0);
        if failed > 0 {
            tracing::warn!(failed, "some patients were refused by the broker");
        }
    }
    let mut registered = 0;
    for line in std::fs::read_to_string(options.data.join("documents.ndjson"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let spec: DocumentSpec = serde_json::from_str(line)
            .map_err(|e| Error::config(format!("documents.ndjson: {e}")))?;
        let bytes = std::fs::read(options.data.join("documents").join(&spec.file))
            .map_err(|e| Error::config(format!("documents/{}: {e}", spec.file)))?;
        let system = system_of.get(&spec.patient).ok_or_else(|| {
            Error::config(format!(
                "documents.ndjson: patient {} is not in patients.ndjson",
                spec.patient
            ))
        })?;
        post(submission(&options.org, own_base, system, &spec, &bytes)).await?;
        registered += 1;
    }
    println!(
        "member-sim: {} fed {} patients and registered {registered} documents at {broker}",
        options.org,
        patients.len()
    );
    Ok(())
}

struct SimState {
    options: SimOptions,
    /// (type, system|value) -> resources.
    resources: HashMap<(String, String), Vec<serde_json::Value>>,
    /// Documents read once and kept: a member's repository answers from its own storage.
    cache: Mutex<HashMap<String, web::Bytes>>,
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or_default() {
        "pdf" => "application/pdf",
        "xml" => "application/xml",
        "json" => "application/fhir+json",
        "txt" | "text" => "text/plain; charset=utf-8",
        "html" => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn outcome(status: actix_web::http::StatusCode, text: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(crate::api::outcome::FHIR_JSON)
        .body(crate::api::outcome::operation_outcome("error", "not-found", text, None).to_string())
}

fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Every answer: late when the member plays slow, and only to a client with a certificate.
async fn admit(state: &SimState, req: &HttpRequest) -> Option<HttpResponse> {
    if !state.options.delay.is_zero() {
        tokio::time::sleep(state.options.delay).await;
    }
    req.conn_data::<PeerCert>().is_none().then(|| {
        outcome(
            actix_web::http::StatusCode::FORBIDDEN,
            "client certificate required",
        )
    })
}

async fn binary(
    state: web::Data<SimState>,
    req: HttpRequest,
    name: web::Path<String>,
) -> HttpResponse {
    if let Some(refused) = admit(&state, &req).await {
        return refused;
    }
    let name = name.into_inner();
    if !safe_name(&name) {
        return outcome(actix_web::http::StatusCode::NOT_FOUND, "no such document");
    }
    let cached = state.cache.lock().ok().and_then(|c| c.get(&name).cloned());
    let bytes = match cached {
        Some(b) => b,
        None => {
            let path = state.options.data.join("documents").join(&name);
            match web::block(move || std::fs::read(path)).await {
                Ok(Ok(data)) => {
                    let b = web::Bytes::from(data);
                    if let Ok(mut c) = state.cache.lock() {
                        c.insert(name.clone(), b.clone());
                    }
                    b
                }
                _ => return outcome(actix_web::http::StatusCode::NOT_FOUND, "no such document"),
            }
        }
    };
    HttpResponse::Ok()
        .content_type(content_type(&name))
        .body(bytes)
}

fn load_ndjson(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::config(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::config(format!("{} line {}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// The identifiers (`system|value`) a resource is about.
fn owners(r: &serde_json::Value) -> Vec<String> {
    if r["resourceType"] == "Patient" {
        return r["identifier"]
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| {
                        Some(format!(
                            "{}|{}",
                            i["system"].as_str()?,
                            i["value"].as_str()?
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    ["subject", "patient"]
        .iter()
        .filter_map(|k| {
            let i = &r[*k]["identifier"];
            Some(format!(
                "{}|{}",
                i["system"].as_str()?,
                i["value"].as_str()?
            ))
        })
        .collect()
}

async fn search(
    state: web::Data<SimState>,
    req: HttpRequest,
    kind: web::Path<String>,
) -> HttpResponse {
    if let Some(refused) = admit(&state, &req).await {
        return refused;
    }
    if state.options.fault.as_deref() == Some("invalid-json") {
        return HttpResponse::Ok()
            .content_type(crate::api::outcome::FHIR_JSON)
            .body("<html>502 upstream EHR error</html>{");
    }
    let params = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default();
    let wanted = params
        .iter()
        .find(|(k, _)| k == "patient.identifier" || k == "identifier" || k == "patient:identifier")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let count = params
        .iter()
        .find(|(k, _)| k == "_count")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(1000);
    let kind = kind.into_inner();
    let found: Vec<&serde_json::Value> = state
        .resources
        .get(&(kind.clone(), wanted))
        .map(|v| v.iter().take(count).collect())
        .unwrap_or_default();
    let base = format!("https://{}/fhir", req.connection_info().host());
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": found.len(),
        "entry": found.iter().map(|r| serde_json::json!({
            "fullUrl": format!("{base}/{kind}/{}", r["id"].as_str().unwrap_or_default()),
            "resource": r,
            "search": { "mode": "match" }
        })).collect::<Vec<_>>()
    });
    HttpResponse::Ok()
        .content_type(crate::api::outcome::FHIR_JSON)
        .body(bundle.to_string())
}

async fn metadata(state: web::Data<SimState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(crate::api::outcome::FHIR_JSON)
        .body(
            serde_json::json!({
                "resourceType": "CapabilityStatement",
                "status": "active",
                "kind": "instance",
                "fhirVersion": "4.0.1",
                "format": ["json"],
                "software": { "name": format!("hie member-sim ({})", state.options.org) },
                "rest": [{ "mode": "server", "resource": [{ "type": "Binary", "interaction": [{ "code": "read" }] }] }]
            })
            .to_string(),
        )
}

/// Runs the simulated member until killed. Prints `member-sim: listening on https://ADDR/fhir`.
pub async fn run(options: SimOptions) -> Result<()> {
    let trust = ClientTrust::load(&options.ca, &options.crl, Metrics::new())?;
    let tls = trust.server_config(&options.cert, &options.key)?;
    let mut resources: HashMap<(String, String), Vec<serde_json::Value>> = HashMap::new();
    let mut loaded = 0;
    for file in ["patients.ndjson", "resources.ndjson"] {
        for r in load_ndjson(&options.data.join(file))? {
            let kind = r["resourceType"].as_str().unwrap_or_default().to_string();
            for owner in owners(&r) {
                resources
                    .entry((kind.clone(), owner))
                    .or_default()
                    .push(r.clone());
            }
            loaded += 1;
        }
    }
    tracing::info!(resources = loaded, "member-sim data loaded");
    let state = web::Data::new(SimState {
        resources,
        options: options.clone(),
        cache: Mutex::new(HashMap::new()),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/fhir/metadata", web::get().to(metadata))
            .route("/fhir/Binary/{name}", web::get().to(binary))
            .route("/fhir/{kind}", web::get().to(search))
    })
    .on_connect(|conn, ext| {
        if let Some(tls) = conn.downcast_ref::<TlsStream<TcpStream>>() {
            let (_, session) = tls.get_ref();
            if let Some(peer) = session
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerCert::from_der(c))
            {
                ext.insert(peer);
            }
        }
    })
    .workers(2)
    .shutdown_timeout(1)
    .bind_rustls_0_23(options.listen, tls)
    .map_err(|e| Error::config(format!("cannot listen on {}: {e}", options.listen)))?;
    let addrs = server.addrs();
    for a in &addrs {
        println!("member-sim: {} listening on https://{a}/fhir", options.org);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let running = server.run();
    if let (Some(broker), Some(addr)) = (&options.feed, addrs.first()) {
        let own_base = format!("https://localhost:{}/fhir", addr.port());
        feed(&options, broker, &own_base).await?;
    }
    running
        .await
        .map_err(|e| Error::internal(format!("member-sim stopped: {e}")))
}

/// Default certificate paths of a member issued by `hie certs issue --org ID`.
pub fn default_paths(certs_dir: &Path, org: &str) -> (PathBuf, PathBuf) {
    let dir = certs_dir.join("orgs").join(org);
    (dir.join("client.crt"), dir.join("client.key"))
}

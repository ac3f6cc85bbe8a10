//! The FHIR R4 API under /fhir: routing, search parameters, Bundles.

mod audit_event;
mod consent;
mod directory;
pub mod documents;
mod federated;
pub mod guard;
mod metadata;
pub mod patient;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::AppState;
use crate::error::{Error, Result};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/fhir")
            .route("", web::post().to(patient::batch))
            .route("/", web::post().to(patient::batch))
            .route("/metadata", web::get().to(metadata::capability_statement))
            .route("/Patient/$ihe-pix", web::get().to(patient::pix))
            .route("/Patient/$locate", web::get().to(federated::locate))
            .route("/Patient/{id}/$locate", web::get().to(federated::locate))
            .route(
                "/federated/Patient/$everything",
                web::get().to(federated::everything),
            )
            .route("/federated/{kind}", web::get().to(federated::search))
            .route("/Patient/$match", web::post().to(patient::match_op))
            .route(
                "/Patient/$review-queue",
                web::get().to(patient::review_queue),
            )
            .route(
                "/Patient/$resolve-review",
                web::post().to(patient::resolve_review),
            )
            .route("/Patient/$unlink", web::post().to(patient::unlink))
            .route("/Patient/$merge", web::post().to(patient::merge))
            .route("/Patient/$unmerge", web::post().to(patient::unmerge))
            .service(
                web::resource("/Patient")
                    .route(web::get().to(patient::search))
                    .route(web::put().to(patient::feed))
                    .route(web::delete().to(patient::delete)),
            )
            .route("/Patient/{id}", web::get().to(patient::read))
            .route(
                "/Organization",
                web::get().to(directory::search_organizations),
            )
            .route(
                "/Organization/{id}",
                web::get().to(directory::read_organization),
            )
            .route("/Endpoint", web::get().to(directory::search_endpoints))
            .route("/Endpoint/{id}", web::get().to(directory::read_endpoint))
            .route("/DocumentReference", web::get().to(documents::search))
            .route(
                "/DocumentReference/_search",
                web::post().to(documents::search_post),
            )
            .route("/DocumentReference/{id}", web::get().to(documents::read))
            .route("/List", web::get().to(documents::search_lists))
            .route("/List/{id}", web::get().to(documents::read_list))
            .route("/Binary/{id}", web::get().to(documents::retrieve))
            .service(
                web::resource("/Consent")
                    .route(web::get().to(consent::search))
                    .route(web::post().to(consent::create)),
            )
            .route("/Consent/{id}/_history", web::get().to(consent::history))
            .service(
                web::resource("/Consent/{id}")
                    .route(web::get().to(consent::read))
                    .route(web::put().to(consent::update)),
            )
            .route("/AuditEvent", web::get().to(audit_event::search))
            .route("/AuditEvent/{id}", web::get().to(audit_event::read)),
    );
}

pub async fn not_found(req: HttpRequest) -> Result<HttpResponse> {
    Err(Error::not_found(format!(
        "{} {} is not an endpoint of this exchange; GET /fhir/metadata lists what is supported",
        req.method(),
        req.path()
    )))
}

/// Search parameters of one request. Unknown parameters are refused rather than ignored: a
/// silently ignored filter would disclose more than the caller asked for.
pub struct Params(Vec<(String, String)>);

const COMMON: [&str; 2] = ["_format", "_count"];

impl Params {
    pub fn parse(query: &str, allowed: &[&str]) -> Result<Params> {
        let pairs: Vec<(String, String)> = web::Query::<Vec<(String, String)>>::from_query(query)
            .map_err(|e| Error::invalid(format!("the query string cannot be read: {e}")))?
            .into_inner();
        for (name, _) in &pairs {
            let base = name.split(':').next().unwrap_or(name);
            if !allowed.contains(&base) && !COMMON.contains(&base) {
                return Err(Error::invalid(format!(
                    "search parameter '{name}' is not supported here; supported: {}",
                    allowed.join(", ")
                )));
            }
        }
        Ok(Params(pairs))
    }

    /// The value of a parameter that may appear at most once.
    pub fn one(&self, name: &str) -> Result<Option<&str>> {
        let mut values = self
            .0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(Error::invalid(format!(
                "search parameter '{name}' may be given only once"
            )));
        }
        Ok(first.filter(|v| !v.is_empty()))
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `_count`, between 1 and `max`.
    pub fn count(&self, default: i64, max: i64) -> Result<i64> {
        match self.one("_count")? {
            None => Ok(default),
            Some(v) => match v.parse::<i64>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(Error::invalid(format!(
                    "_count must be a whole number from 1 to {max}"
                ))),
            },
        }
    }
}

/// A `searchset` Bundle.
pub fn searchset(
    self_url: &str,
    total: Option<usize>,
    entries: Vec<(String, Value)>,
    next: Option<String>,
) -> Value {
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next {
        links.push(json!({ "relation": "next", "url": next }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries
            .into_iter()
            .map(|(full_url, resource)| json!({ "fullUrl": full_url, "resource": resource, "search": { "mode": "match" } }))
            .collect::<Vec<_>>(),
    });
    if let Some(total) = total {
        bundle["total"] = json!(total);
    }
    bundle
}

/// The base URL of the FHIR API for links in answers: `server.public_base_url` when set,
/// else the host the member connected to.
pub fn base(state: &AppState, req: &HttpRequest) -> String {
    if !state.config.server.public_base_url.is_empty() {
        return state.config.fhir_base();
    }
    let info = req.connection_info();
    let host = info.host();
    if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    {
        format!("https://{host}/fhir")
    } else {
        state.config.fhir_base()
    }
}

/// The URL of this request as the member sees it.
pub fn self_url(state: &AppState, req: &HttpRequest) -> String {
    let path = req.path().strip_prefix("/fhir").unwrap_or(req.path());
    match req.query_string() {
        "" => format!("{}{path}", base(state, req)),
        q => format!("{}{path}?{q}", base(state, req)),
    }
}

/// An identifier system of the exchange itself, e.g. `system(state, "org")`.
pub fn exchange_system(state: &AppState, name: &str) -> String {
    let base = &state.config.exchange.identifier_system_base;
    if base.starts_with("urn:") {
        format!("{base}:{name}")
    } else {
        format!("{}/{name}", base.trim_end_matches('/'))
    }
}

pub fn ok(body: &Value) -> HttpResponse {
    super::outcome::fhir(actix_web::http::StatusCode::OK, body)
}

//! HTTP: the mutual-TLS exchange listener (FHIR API) and the plain-HTTP admin listener.
//! Only this module knows actix. Handlers read the request, call one domain function, render.

pub mod admin;
pub mod context;
pub mod fhir;
pub mod outcome;

use actix_tls::accept::rustls_0_23::TlsStream;
use actix_web::dev::{Server, Service};
use actix_web::{web, App, HttpMessage, HttpResponse, HttpServer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::audit::Auditor;
use crate::config::Config;
use crate::db::Db;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimits;
use crate::tls::{ClientTrust, PeerCert};
use context::{IdentityCache, RequestId};

/// Everything a handler may need, shared by all workers.
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    pub auditor: Auditor,
    pub trust: Arc<ClientTrust>,
    pub limits: Arc<RateLimits>,
    pub identities: IdentityCache,
    pub metrics: Metrics,
    pub mpi: Arc<crate::mpi::MpiSettings>,
    /// The identity feed's batcher (ITI-104 PUTs).
    pub feeds: crate::mpi::queue::FeedQueue,
    pub outbound: crate::outbound::Outbound,
    pub federation: Arc<crate::federation::Federation>,
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

fn next_request_id() -> String {
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = openssl::rand::rand_bytes(&mut b);
        u32::from_be_bytes(b)
    });
    format!(
        "{prefix:08x}-{}",
        REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn request_id_from(req: &actix_web::dev::ServiceRequest) -> String {
    req.headers()
        .get("X-Request-Id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .map(str::to_string)
        .unwrap_or_else(next_request_id)
}

/// Binds the exchange listener. Returns the server (not yet awaited) and its bound addresses.
pub fn exchange_server(state: web::Data<AppState>) -> Result<(Server, Vec<SocketAddr>)> {
    let config = Arc::clone(&state.config);
    let certs = &config.certs.dir;
    let tls = state.trust.server_config(
        &certs.join(crate::certs::SERVER_CERT),
        &certs.join(crate::certs::SERVER_KEY),
    )?;
    let request_timeout = Duration::from_millis(config.server.request_timeout_ms);
    let body_limit = config.server.body_limit_bytes;
    let app_state = state.clone();
    let mut server = HttpServer::new(move || {
        let state = app_state.clone();
        App::new()
            .app_data(state.clone())
            .app_data(web::PayloadConfig::new(body_limit))
            .configure(fhir::routes)
            .default_service(web::to(fhir::not_found))
            .wrap_fn(move |req, srv| {
                let metrics = state.metrics.clone();
                let started = Instant::now();
                let rid = request_id_from(&req);
                req.extensions_mut().insert(RequestId(rid.clone()));
                let span = tracing::info_span!(
                    "request",
                    id = %rid,
                    method = %req.method(),
                    path = %req.path(),
                    org = tracing::field::Empty,
                    purpose = tracing::field::Empty,
                );
                let fut = srv.call(req);
                async move {
                    let result = tokio::time::timeout(request_timeout, fut.instrument(span.clone())).await;
                    let elapsed = started.elapsed();
                    let mut res = match result {
                        Ok(Ok(res)) => as_operation_outcome(res.map_into_boxed_body()),
                        Ok(Err(e)) => {
                            metrics.request_done(e.as_response_error().status_code().as_u16(), elapsed.as_secs_f64());
                            return Err(e);
                        }
                        Err(_) => {
                            let e = Error::new(ErrorKind::Unavailable, "the broker could not answer in time; retry shortly");
                            metrics.request_done(503, elapsed.as_secs_f64());
                            tracing::warn!(parent: &span, ms = elapsed.as_secs_f64() * 1000.0, "request timed out");
                            return Err(e.into());
                        }
                    };
                    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&rid) {
                        res.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-request-id"), v);
                    }
                    let status = res.status().as_u16();
                    metrics.request_done(status, elapsed.as_secs_f64());
                    tracing::info!(parent: &span, status, ms = elapsed.as_secs_f64() * 1000.0, "answered");
                    Ok::<_, actix_web::Error>(res)
                }
            })
    })
    .on_connect(|conn, ext| {
        if let Some(tls) = conn.downcast_ref::<TlsStream<TcpStream>>() {
            let (_, session) = tls.get_ref();
            if let Some(peer) = session.peer_certificates().and_then(|c| c.first()).and_then(|c| PeerCert::from_der(c)) {
                ext.insert(peer);
            }
        }
    })
    .client_request_timeout(Duration::from_millis(config.server.client_request_timeout_ms))
    .keep_alive(Duration::from_secs(config.server.keep_alive_seconds))
    .shutdown_timeout(config.server.shutdown_timeout_seconds);
    if config.server.workers > 0 {
        server = server.workers(config.server.workers);
    }
    let server = server
        .bind_rustls_0_23(config.server.listen, tls)
        .map_err(|e| {
            Error::config(format!(
                "cannot listen on {} (server.listen): {e}",
                config.server.listen
            ))
        })?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

/// Binds the admin listener (plain HTTP: health, readiness, metrics).
pub fn admin_server(
    state: web::Data<AppState>,
    addr: SocketAddr,
) -> Result<(Server, Vec<SocketAddr>)> {
    let shutdown = state.config.server.shutdown_timeout_seconds;
    let server =
        HttpServer::new(move || App::new().app_data(state.clone()).configure(admin::routes))
            .workers(1)
            .shutdown_timeout(shutdown)
            .bind(addr)
            .map_err(|e| Error::config(format!("cannot listen on {addr} (admin.listen): {e}")))?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

/// Every refusal is an OperationOutcome, including those actix produces before a handler runs
/// (an oversized body, an unreadable payload, a method a route does not have).
fn as_operation_outcome(res: actix_web::dev::ServiceResponse) -> actix_web::dev::ServiceResponse {
    let status = res.status();
    let is_fhir = res
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/fhir+json"));
    if status.as_u16() < 400 || is_fhir {
        return res;
    }
    let detail = res
        .response()
        .error()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let (kind, message) = match status.as_u16() {
        413 => (
            ErrorKind::TooLarge,
            "the request body is larger than this exchange accepts (server.body_limit_bytes)"
                .to_string(),
        ),
        405 => (
            ErrorKind::Invalid,
            "this method is not supported on this endpoint; GET /fhir/metadata lists what is"
                .to_string(),
        ),
        404 => (ErrorKind::NotFound, "not found".to_string()),
        s if s < 500 => (
            ErrorKind::Invalid,
            format!("the request could not be read: {detail}"),
        ),
        _ => (ErrorKind::Internal, "internal error".to_string()),
    };
    let response = actix_web::ResponseError::error_response(&Error::new(kind, message));
    let (req, _) = res.into_parts();
    actix_web::dev::ServiceResponse::new(req, response)
}

pub(crate) fn ok_text(body: &str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body(body.to_string())
}

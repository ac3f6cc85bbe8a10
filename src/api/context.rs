//! Who is asking, and why: the member organisation proven by the client certificate, the
//! person it names (`X-User-Id`, `X-User-Role`) and the purpose of use (`X-Purpose-Of-Use`).
//! Extracted once per request; it also enforces the member's rate limit.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::AppState;
use crate::audit::{Action, Actor, AuditRecord, Outcome};
use crate::db::Db;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::Fingerprint;
use crate::orgs::{self, Organization};
use crate::policy::PurposeOfUse;
use crate::tls::PeerCert;

/// The request id given by the middleware.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// An authenticated member request with a valid purpose of use (required for anything beyond
/// `/metadata`).
pub struct RequestContext {
    pub org: Arc<Organization>,
    pub purpose: PurposeOfUse,
    pub user_id: Option<String>,
    pub user_role: Option<String>,
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
    /// Break-the-glass: the reason an emergency department gave (only with purpose ETREAT).
    pub break_glass: Option<String>,
}

/// An authenticated member request; purpose of use not required.
pub struct Member {
    pub org: Arc<Organization>,
}

impl RequestContext {
    pub fn actor(&self) -> Actor {
        Actor {
            org_id: Some(self.org.id.clone()),
            user_id: self.user_id.clone(),
            user_role: self.user_role.clone(),
            purpose: Some(self.purpose),
            client_addr: self.client_addr.clone(),
            request_id: self.request_id.clone(),
            break_glass: self.break_glass.clone(),
        }
    }
}

/// When a lookup was made, and what it found (None: no such certificate registered).
type CachedIdentity = (Instant, Option<Arc<Organization>>);

/// Maps certificate fingerprints to organisations, for a short time, so that not every request
/// reads the registry. Suspensions take effect within the TTL on every broker instance.
pub struct IdentityCache {
    ttl: Duration,
    entries: Mutex<HashMap<Fingerprint, CachedIdentity>>,
}

impl IdentityCache {
    pub fn new(ttl: Duration) -> IdentityCache {
        IdentityCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    async fn lookup(&self, db: &Db, fp: &Fingerprint) -> Result<Option<Arc<Organization>>> {
        if !self.ttl.is_zero() {
            if let Ok(entries) = self.entries.lock() {
                if let Some((at, org)) = entries.get(fp) {
                    if at.elapsed() < self.ttl {
                        return Ok(org.clone());
                    }
                }
            }
        }
        let key = fp.clone();
        let org = db
            .run(move |c| orgs::by_fingerprint(c, &key))
            .await?
            .map(Arc::new);
        if !self.ttl.is_zero() {
            if let Ok(mut entries) = self.entries.lock() {
                if entries.len() > 10_000 {
                    entries.clear();
                }
                entries.insert(fp.clone(), (Instant::now(), org.clone()));
            }
        }
        Ok(org)
    }
}

fn header(req: &HttpRequest, name: &str) -> Result<Option<String>> {
    match req.headers().get(name) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| Error::invalid(format!("header {name} must be plain ASCII text")))?
                .trim();
            if s.is_empty() {
                Ok(None)
            } else if s.len() > 256 || s.chars().any(|c| c.is_control()) {
                Err(Error::invalid(format!(
                    "header {name} must be at most 256 printable characters"
                )))
            } else {
                Ok(Some(s.to_string()))
            }
        }
    }
}

async fn refuse(
    state: &AppState,
    req: &HttpRequest,
    peer: &PeerCert,
    org: Option<&Organization>,
    reason: &str,
    message: String,
) -> Error {
    state.metrics.access_denied(reason);
    tracing::warn!(subject = %peer.subject, fingerprint = %peer.fingerprint, reason, "member request refused");
    let actor = Actor {
        org_id: org.map(|o| o.id.clone()),
        client_addr: req.peer_addr().map(|a| a.ip().to_string()),
        request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
        ..Actor::default()
    };
    let record = AuditRecord::new(&actor, "security", Action::Execute, "access-refused")
        .entity(format!("Certificate/{}", peer.fingerprint))
        .outcome(Outcome::MinorFailure, format!("{reason}: {}", peer.subject));
    if let Err(e) = state.auditor.record(record).await {
        tracing::error!(error = %e, "could not audit a refused request");
    }
    Error::security(message)
}

async fn authenticate(req: &HttpRequest, purpose_required: bool) -> Result<RequestContext, Error> {
    let state = req
        .app_data::<actix_web::web::Data<AppState>>()
        .ok_or_else(|| Error::internal("application state missing"))?
        .clone();
    let Some(peer) = req.conn_data::<PeerCert>().cloned() else {
        return Err(Error::security(
            "no client certificate was presented on this connection",
        ));
    };
    if state.trust.is_revoked(&peer.serial) {
        return Err(refuse(
            &state,
            req,
            &peer,
            None,
            "revoked",
            "this client certificate has been revoked".into(),
        )
        .await);
    }
    let org = match state
        .identities
        .lookup(&state.db, &peer.fingerprint)
        .await?
    {
        Some(org) => org,
        None => {
            let msg = format!(
                "client certificate {} (fingerprint {}) is valid but not registered to any member organisation; \
                 ask the exchange operator to enroll it (hie org add / hie org add-cert)",
                peer.subject, peer.fingerprint
            );
            return Err(refuse(&state, req, &peer, None, "unknown-certificate", msg).await);
        }
    };
    if !org.is_active() {
        let msg = format!(
            "member organisation '{}' is suspended; contact the exchange operator",
            org.id
        );
        return Err(refuse(&state, req, &peer, Some(&org), "suspended", msg).await);
    }
    let purpose = header(req, "X-Purpose-Of-Use")?
        .map(|p| PurposeOfUse::parse(&p))
        .transpose()?;
    let span = tracing::Span::current();
    span.record("org", org.id.as_str());
    if let Some(p) = purpose {
        span.record("purpose", p.code());
    }
    if let Err(retry_after_secs) = state
        .limits
        .check(&org.id, purpose.is_some_and(PurposeOfUse::is_emergency))
    {
        state.metrics.rate_limited();
        return Err(Error::new(
            ErrorKind::Throttled { retry_after_secs },
            format!(
                "organisation '{}' is over its request quota; retry after {retry_after_secs} s",
                org.id
            ),
        ));
    }
    let asserted = purpose.is_some();
    let purpose = match (purpose, purpose_required) {
        (Some(p), _) => p,
        (None, false) => PurposeOfUse::Treat,
        (None, true) => {
            return Err(Error::invalid(
                "header X-Purpose-Of-Use is required: the HL7 PurposeOfUse code for this request, e.g. TREAT, ETREAT or PATRQT",
            ))
        }
    };
    let allowed = !asserted
        || state
            .config
            .policy
            .purposes
            .get(org.org_type.code())
            .is_some_and(|list| list.iter().any(|p| p.eq_ignore_ascii_case(purpose.code())));
    if !allowed {
        return Err(Error::forbidden(format!(
            "a member of type '{}' may not assert purpose of use {} ({}); see the exchange's policy",
            org.org_type.code(),
            purpose.code(),
            purpose.display()
        )));
    }
    let break_glass = header(req, "X-Break-Glass-Reason")?;
    if break_glass.is_some() && !purpose.is_emergency() {
        return Err(Error::invalid(
            "X-Break-Glass-Reason goes with X-Purpose-Of-Use: ETREAT (emergency treatment) only",
        ));
    }
    Ok(RequestContext {
        break_glass,
        org,
        purpose,
        user_id: header(req, "X-User-Id")?,
        user_role: header(req, "X-User-Role")?,
        request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
        client_addr: req.peer_addr().map(|a| a.ip().to_string()),
    })
}

impl FromRequest for RequestContext {
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move { authenticate(&req, true).await })
    }
}

impl FromRequest for Member {
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            authenticate(&req, false)
                .await
                .map(|c| Member { org: c.org })
        })
    }
}

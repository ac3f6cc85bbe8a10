//! `hie serve`: first-run setup, the two listeners, CRL reloading, graceful shutdown.

use actix_web::web;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{self, context::IdentityCache, AppState};
use crate::audit::Auditor;
use crate::certs::{self, Authority};
use crate::config::Config;
use crate::db::{Db, DbUrl};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::ratelimit::RateLimits;
use crate::tls::ClientTrust;

/// Prints a line for the operator; a closed stdout (EPIPE) must never stop the broker.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Creates the dev CA and the SQLite database when they do not exist yet, and says so.
fn first_run(config: &Config) -> Result<bool> {
    let dir = &config.certs.dir;
    let mut fresh = false;
    if !Authority::exists(dir) {
        if !config.certs.auto_init {
            return Err(crate::Error::config(format!(
                "no exchange CA in {} and certs.auto_init is false; run `hie certs init --dir {}`",
                dir.display(),
                dir.display()
            )));
        }
        Authority::init(dir, &config.exchange.name, &config.certs.hostnames, false)?;
        say!(
            "hie: first run: created a development exchange CA and broker certificates in {}/",
            dir.display()
        );
        fresh = true;
    }
    if let Ok(DbUrl::Sqlite(path)) = DbUrl::parse(&config.database.url) {
        if !path.exists() {
            say!("hie: creating the SQLite database {}", path.display());
            fresh = true;
        }
    }
    Ok(fresh)
}

fn enrollment_hint(config: &Config) {
    let dir = config.certs.dir.display();
    let host = config
        .certs
        .hostnames
        .first()
        .map(String::as_str)
        .unwrap_or("localhost");
    let port = config.server.listen.port();
    say!(
        "hie: to enroll a member organisation and make a first request (prefix `hie` with `cargo run --release --` in a checkout):\n\
         \x20 hie certs issue --org general-hospital\n\
         \x20 hie org add --id general-hospital --name \"General Hospital\" --type hospital --cert {dir}/orgs/general-hospital/client.crt --identifier-system urn:oid:2.16.840.1.113883.3.9999.1\n\
         \x20 curl --cert {dir}/orgs/general-hospital/client.crt --key {dir}/orgs/general-hospital/client.key --cacert {dir}/ca.crt \\\n\
         \x20      -H 'X-Purpose-Of-Use: TREAT' -H 'X-User-Id: dr-example' https://{host}:{port}/fhir/Organization"
    );
}

/// Runs the broker until SIGTERM/SIGINT.
pub async fn serve(config: Config) -> Result<()> {
    let fresh = first_run(&config)?;
    let db = Db::open(&config.database)?;
    tracing::info!(database = %db.url().display(), "database ready");
    let metrics = Metrics::new();
    let trust = ClientTrust::load(
        &config.certs.dir.join(certs::CA_CERT),
        &config.certs.dir.join(certs::CRL),
        metrics.clone(),
    )?;
    let auditor = Auditor::start(db.clone(), config.audit.batch_max, metrics.clone());
    let limits = Arc::new(RateLimits::new(&config.rate_limit));
    let mpi = Arc::new(crate::mpi::MpiSettings::from_config(&config)?);
    let outbound = crate::outbound::Outbound::new(&config)?;
    let config = Arc::new(config);
    let state = web::Data::new(AppState {
        config: Arc::clone(&config),
        db: db.clone(),
        auditor: auditor.clone(),
        trust: Arc::clone(&trust),
        limits: Arc::clone(&limits),
        identities: IdentityCache::new(Duration::from_millis(config.server.identity_cache_ms)),
        feeds: crate::mpi::queue::FeedQueue::start(db.clone(), Arc::clone(&mpi), metrics.clone()),
        metrics,
        mpi,
        federation: Arc::new(crate::federation::Federation::new(
            config.federation.clone(),
            outbound.clone(),
        )),
        outbound,
    });

    let (exchange, addrs) = api::exchange_server(state.clone())?;
    for a in &addrs {
        say!("hie: exchange listening on https://{a}/fhir (mutual TLS)");
    }
    let admin = match config.admin.listen {
        Some(addr) => {
            let (server, addrs) = api::admin_server(state.clone(), addr)?;
            for a in &addrs {
                say!("hie: admin listening on http://{a} (/healthz /readyz /metrics)");
            }
            Some(server)
        }
        None => None,
    };
    if fresh {
        enrollment_hint(&config);
    }

    let background = spawn_background(Arc::clone(&trust), limits, config.certs.crl_reload_seconds);
    let exchange_handle = exchange.handle();
    let admin_handle = admin.as_ref().map(|a| a.handle());
    let admin_task = async move {
        match admin {
            Some(server) => server.await,
            // No admin listener: nothing to stop the exchange from this side.
            None => std::future::pending().await,
        }
    };
    // Either server stopping (signal or failure) stops the other, then the audit trail is flushed.
    let result = tokio::select! {
        r = exchange => { if let Some(h) = &admin_handle { h.stop(true).await; } r }
        r = admin_task => { exchange_handle.stop(true).await; r }
    };
    background.abort();
    auditor.shutdown().await;
    tracing::info!("broker stopped; audit trail flushed");
    say!("hie: stopped");
    result.map_err(|e| crate::Error::internal(format!("server failed: {e}")))
}

/// CRL reload on change and on SIGHUP; rate-limiter housekeeping.
fn spawn_background(
    trust: Arc<ClientTrust>,
    limits: Arc<RateLimits>,
    crl_seconds: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(crl_seconds.max(1)));
        let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hup_recv = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup_recv = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = trust.reload(false) {
                        tracing::error!(error = %e, "CRL reload failed; the previous list stays in force");
                    }
                }
                _ = hup_recv => {
                    tracing::info!("SIGHUP: reloading the CRL");
                    if let Err(e) = trust.reload(true) {
                        tracing::error!(error = %e, "CRL reload failed; the previous list stays in force");
                    }
                }
                _ = housekeeping.tick() => limits.retain_recent(),
            }
        }
    })
}

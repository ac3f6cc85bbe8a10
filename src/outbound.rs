//! The broker as a client of its members: mutual TLS with the broker's own certificate
//! (`certs/client.crt`), trusting only the exchange CA, with pooled connections per member.

use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    pub timeout: Duration,
}

impl Outbound {
    pub fn new(config: &Config) -> Result<Outbound> {
        let dir = &config.certs.dir;
        let tls = crate::tls::client_config(
            &dir.join(crate::certs::CA_CERT),
            Some((
                &dir.join(crate::certs::CLIENT_CERT),
                &dir.join(crate::certs::CLIENT_KEY),
            )),
        )?;
        let timeout = Duration::from_millis(config.members.timeout_ms);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(timeout)
            .read_timeout(Duration::from_millis(config.members.idle_timeout_ms))
            .pool_max_idle_per_host(config.members.max_connections_per_member)
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hie-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::config(format!("cannot build the client for member calls: {e}")))?;
        Ok(Outbound { client, timeout })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a GET and waits for the response head within the member timeout. Errors say which
    /// member failed and how: 502 when it cannot be reached or refuses, 504 when it is too slow.
    pub async fn get(&self, org: &str, url: &str, accept: &str) -> Result<reqwest::Response> {
        let request = self.client.get(url).header("Accept", accept).send();
        match tokio::time::timeout(self.timeout, request).await {
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "member '{org}' did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            )),
            Ok(Err(e)) if e.is_timeout() => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "member '{org}' did not answer within {} ms",
                    self.timeout.as_millis()
                ),
            )),
            Ok(Err(e)) => Err(Error::new(
                ErrorKind::BadGateway,
                format!("member '{org}' could not be reached: {}", describe(&e)),
            )),
            Ok(Ok(r)) => Ok(r),
        }
    }
}

/// The innermost cause of a reqwest error (the outer ones only say "error sending request").
pub fn describe(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

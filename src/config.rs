//! Configuration: `config/default.toml` (embedded, so it is the one true list of defaults),
//! then an optional file, then `HIE_<SECTION>_<KEY>` environment variables.
//! Every failure names the key that is wrong.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub exchange: ExchangeConfig,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub database: DatabaseConfig,
    pub certs: CertsConfig,
    pub audit: AuditConfig,
    pub rate_limit: RateLimitConfig,
    pub mpi: MpiConfig,
    pub members: MembersConfig,
    pub federation: FederationConfig,
    pub policy: PolicyConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub name: String,
    pub identifier_system_base: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub public_base_url: String,
    pub workers: usize,
    pub body_limit_bytes: usize,
    pub client_request_timeout_ms: u64,
    pub request_timeout_ms: u64,
    pub keep_alive_seconds: u64,
    pub shutdown_timeout_seconds: u64,
    pub identity_cache_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(deserialize_with = "optional_addr")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    pub url: String,
    pub pool_size: u32,
    pub connect_timeout_ms: u64,
    pub busy_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertsConfig {
    pub dir: PathBuf,
    pub auto_init: bool,
    pub hostnames: Vec<String>,
    pub crl_reload_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub batch_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: u32,
    pub burst: u32,
    pub emergency_requests_per_second: u32,
    pub emergency_burst: u32,
    pub overrides: BTreeMap<String, RateOverride>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateOverride {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MpiConfig {
    pub auto_link_threshold: f64,
    pub review_threshold: f64,
    pub possible_threshold: f64,
    pub shared_identifier_systems: Vec<String>,
    pub weights_file: PathBuf,
    pub max_candidates: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersConfig {
    pub timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_connections_per_member: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    pub deadline_ms: u64,
    pub emergency_deadline_ms: u64,
    pub max_concurrent_per_member: usize,
    pub breaker_failures: u32,
    pub breaker_cooldown_ms: u64,
    pub max_response_bytes: usize,
    pub max_resources_per_member: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsentModel {
    OptOut,
    OptIn,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub model: ConsentModel,
    pub break_glass_overrides_opt_out: bool,
    /// Member type -> purposes of use it may assert.
    pub purposes: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub filter: String,
}

fn optional_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!("'{s}' is not an address like 127.0.0.1:9090"))
    })
}

impl Config {
    /// Defaults, then `file` (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_with_env(file, |k| std::env::var(k).ok())
    }

    pub fn load_with_env(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config> {
        let mut table: toml::Table = DEFAULT_TOML
            .parse()
            .map_err(|e| Error::config(format!("built-in defaults are broken: {e}")))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::config(format!("cannot read config file {}: {e}", path.display()))
            })?;
            let user: toml::Table = text.parse().map_err(|e: toml::de::Error| {
                Error::config(format!(
                    "config file {} is not valid TOML: {}",
                    path.display(),
                    e.message()
                ))
            })?;
            merge(&mut table, user);
        }
        apply_env(&mut table, &env)?;
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                Error::config(format!(
                    "config key '{}': {} (env HIE_{})",
                    e.path(),
                    e.inner(),
                    env_name(&e.path().to_string())
                ))
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let positive = [
            ("database.pool_size", self.database.pool_size as u64),
            (
                "server.body_limit_bytes",
                self.server.body_limit_bytes as u64,
            ),
            ("server.request_timeout_ms", self.server.request_timeout_ms),
            ("audit.batch_max", self.audit.batch_max as u64),
            (
                "rate_limit.requests_per_second",
                self.rate_limit.requests_per_second as u64,
            ),
            ("rate_limit.burst", self.rate_limit.burst as u64),
            (
                "rate_limit.emergency_requests_per_second",
                self.rate_limit.emergency_requests_per_second as u64,
            ),
            (
                "rate_limit.emergency_burst",
                self.rate_limit.emergency_burst as u64,
            ),
            ("certs.crl_reload_seconds", self.certs.crl_reload_seconds),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(format!(
                    "config key '{key}' must be greater than 0"
                )));
            }
        }
        if self.mpi.review_threshold >= self.mpi.auto_link_threshold {
            return Err(Error::config(
                "config key 'mpi.review_threshold' must be below 'mpi.auto_link_threshold'",
            ));
        }
        if self.members.timeout_ms == 0 || self.members.idle_timeout_ms == 0 {
            return Err(Error::config(
                "config keys 'members.timeout_ms' and 'members.idle_timeout_ms' must be greater than 0",
            ));
        }
        for (org_type, purposes) in &self.policy.purposes {
            crate::orgs::OrgType::parse(org_type).map_err(|e| {
                Error::config(format!(
                    "config key 'policy.purposes.{org_type}': {}",
                    e.message
                ))
            })?;
            for p in purposes {
                crate::policy::PurposeOfUse::parse(p).map_err(|e| {
                    Error::config(format!(
                        "config key 'policy.purposes.{org_type}': {}",
                        e.message
                    ))
                })?;
            }
        }
        let f = &self.federation;
        if f.deadline_ms == 0
            || f.emergency_deadline_ms == 0
            || f.max_concurrent_per_member == 0
            || f.breaker_failures == 0
            || f.max_response_bytes == 0
            || f.max_resources_per_member == 0
        {
            return Err(Error::config(
                "config keys in [federation] must be greater than 0",
            ));
        }
        if self.mpi.max_candidates < 1 {
            return Err(Error::config(
                "config key 'mpi.max_candidates' must be greater than 0",
            ));
        }
        for (org, o) in &self.rate_limit.overrides {
            if o.requests_per_second == 0 || o.burst == 0 {
                return Err(Error::config(format!(
                    "config key 'rate_limit.overrides.{org}': requests_per_second and burst must be greater than 0"
                )));
            }
        }
        crate::db::DbUrl::parse(&self.database.url)
            .map_err(|e| Error::config(format!("config key 'database.url': {}", e.message)))?;
        Ok(())
    }

    /// Base URL of the FHIR API as members see it, without a trailing slash.
    pub fn fhir_base(&self) -> String {
        if self.server.public_base_url.is_empty() {
            format!("https://{}/fhir", self.server.listen)
        } else {
            self.server
                .public_base_url
                .trim_end_matches('/')
                .to_string()
        }
    }
}

fn env_name(path: &str) -> String {
    path.replace(['.', '-'], "_").to_ascii_uppercase()
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// `HIE_<SECTION>_<KEY>` for every key that has a default; the value is read as the default's type.
fn apply_env(table: &mut toml::Table, env: &impl Fn(&str) -> Option<String>) -> Result<()> {
    for (section, values) in table.iter_mut() {
        let toml::Value::Table(values) = values else {
            continue;
        };
        for (key, value) in values.iter_mut() {
            let name = format!("HIE_{}", env_name(&format!("{section}.{key}")));
            let Some(raw) = env(&name) else { continue };
            let bad = |what: &str| {
                Error::config(format!(
                    "env {name} (config key '{section}.{key}'): '{raw}' is not {what}"
                ))
            };
            *value = match value {
                toml::Value::String(_) => toml::Value::String(raw.clone()),
                toml::Value::Integer(_) => {
                    toml::Value::Integer(raw.trim().parse().map_err(|_| bad("a whole number"))?)
                }
                toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
                    "true" | "1" | "yes" => true,
                    "false" | "0" | "no" => false,
                    _ => return Err(bad("true or false")),
                }),
                toml::Value::Array(_) => toml::Value::Array(
                    raw.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.into()))
                        .collect(),
                ),
                _ => continue,
            };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(file_text: Option<&str>, env: &[(&str, &str)]) -> Result<Config> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hie.toml");
        if let Some(text) = file_text {
            std::fs::write(&path, text).expect("write config");
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(file_text.map(|_| path.as_path()), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_load() {
        let c = load(None, &[]).expect("defaults");
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8443");
        assert_eq!(
            c.admin.listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9090")
        );
        assert_eq!(c.database.url, "sqlite://data/hie.db");
    }

    #[test]
    fn env_overrides_every_section() {
        let c = load(
            None,
            &[
                ("HIE_DATABASE_URL", "postgres://postgres@127.0.0.1/test"),
                ("HIE_SERVER_LISTEN", "0.0.0.0:9443"),
                ("HIE_ADMIN_LISTEN", ""),
                ("HIE_RATE_LIMIT_BURST", "7"),
                ("HIE_CERTS_HOSTNAMES", "a.example, b.example"),
            ],
        )
        .expect("config");
        assert_eq!(c.server.listen.port(), 9443);
        assert!(c.admin.listen.is_none());
        assert_eq!(c.rate_limit.burst, 7);
        assert_eq!(c.certs.hostnames, vec!["a.example", "b.example"]);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = load(None, &[("HIE_SERVER_LISTEN", "not-an-address")]).expect_err("bad listen");
        assert!(e.message.contains("server.listen"), "{e}");
        let e = load(None, &[("HIE_DATABASE_POOL_SIZE", "many")]).expect_err("bad number");
        assert!(e.message.contains("HIE_DATABASE_POOL_SIZE"), "{e}");
        let e = load(Some("[server]\nlisen = \"x\"\n"), &[]).expect_err("typo");
        assert!(e.message.contains("lisen"), "{e}");
        let e = load(Some("[database]\nurl = \"mysql://x\"\n"), &[]).expect_err("scheme");
        assert!(e.message.contains("database.url"), "{e}");
        let e = load(Some("[server\n"), &[]).expect_err("toml");
        assert!(e.message.contains("not valid TOML"), "{e}");
        let e = load(Some("[rate_limit]\nburst = 0\n"), &[]).expect_err("zero");
        assert!(e.message.contains("rate_limit.burst"), "{e}");
    }
}

//! Prometheus metrics, rendered as text on the admin listener's /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

struct Inner {
    registry: Registry,
    requests: Family<StatusLabels, Counter>,
    duration: Histogram,
    handshake_rejections: Family<ReasonLabels, Counter>,
    access_denied: Family<ReasonLabels, Counter>,
    rate_limited: Counter,
    audit_records: Counter,
    audit_batches: Counter,
    audit_failures: Counter,
    feed_records: Counter,
    feed_batches: Counter,
    feed_rematched: Counter,
    feed_split: Counter,
}

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

/// A counter registered under `name` (the registry adds the `hie_` prefix and `_total`).
fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name, help, c.clone());
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hie");
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "http_requests",
            "FHIR API requests answered, by HTTP status",
            requests.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "http_request_duration_seconds",
            "Time to answer a FHIR API request",
            duration.clone(),
        );
        let handshake_rejections = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_client_cert_rejections",
            "Client certificates refused during the TLS handshake, by reason",
            handshake_rejections.clone(),
        );
        let access_denied = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "access_denied",
            "Requests refused after the handshake (unknown certificate, suspended member, revoked), by reason",
            access_denied.clone(),
        );
        let rate_limited = counter(&mut registry, "rate_limited", "Requests refused with 429");
        let audit_records = counter(
            &mut registry,
            "audit_records",
            "Audit records committed by the group-commit writer",
        );
        let audit_batches = counter(
            &mut registry,
            "audit_batches",
            "Transactions used by the group-commit writer",
        );
        let audit_failures = counter(
            &mut registry,
            "audit_failures",
            "Audit records that could not be written",
        );
        let feed_records = counter(
            &mut registry,
            "mpi_feed_records",
            "Patients received by the identity feed (ITI-104 PUTs), counted as their batch is written",
        );
        let feed_batches = counter(
            &mut registry,
            "mpi_feed_batches",
            "Batches the identity feed matched and wrote together, one transaction each (records / batches is the mean batch size)",
        );
        let feed_rematched = counter(
            &mut registry,
            "mpi_feed_rematched_batches",
            "Feed batches matched again as they were written, because the database changed after they were matched (another process's writes, an operator's link change)",
        );
        let feed_split = counter(
            &mut registry,
            "mpi_feed_split_batches",
            "Feed batches that could not be matched or written as a whole, whose requests were then fed one by one",
        );
        Metrics(Arc::new(Inner {
            registry,
            requests,
            duration,
            handshake_rejections,
            access_denied,
            rate_limited,
            audit_records,
            audit_batches,
            audit_failures,
            feed_records,
            feed_batches,
            feed_rematched,
            feed_split,
        }))
    }

    pub fn request_done(&self, status: u16, seconds: f64) {
        self.0
            .requests
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
        self.0.duration.observe(seconds);
    }

    pub fn handshake_rejected(&self, reason: &str) {
        self.0
            .handshake_rejections
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn access_denied(&self, reason: &str) {
        self.0
            .access_denied
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn rate_limited(&self) {
        self.0.rate_limited.inc();
    }

    pub fn audit_committed(&self, records: usize) {
        self.0.audit_records.inc_by(records as u64);
        self.0.audit_batches.inc();
    }

    pub fn audit_failed(&self, records: usize) {
        self.0.audit_failures.inc_by(records as u64);
    }

    /// One identity-feed batch of `records` requests done; `rematched`: matched again as
    /// written; `split`: not matched or written as a whole, its requests fed one by one.
    pub fn feed_batch(&self, records: usize, rematched: bool, split: bool) {
        self.0.feed_records.inc_by(records as u64);
        self.0.feed_batches.inc();
        if rematched {
            self.0.feed_rematched.inc();
        }
        if split {
            self.0.feed_split.inc();
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }
}

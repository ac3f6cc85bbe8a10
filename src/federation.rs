//! The query broker: asks every member that holds a person for their FHIR resources, in
//! parallel, each with *its own* patient identifier, under one deadline, and says per member what
//! came back. Per-member concurrency limits and a circuit breaker keep one failing member from
//! slowing everyone; answers are size-capped and validated, so garbage from one member never
//! breaks the merged answer. Connections are pooled per member (`outbound::Outbound`).

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

use crate::config::FederationConfig;
use crate::outbound::Outbound;

/// Resource types that can be asked for across the region, and what `$everything` asks.
pub const RESOURCE_TYPES: [&str; 9] = [
    "AllergyIntolerance",
    "Condition",
    "MedicationStatement",
    "MedicationRequest",
    "Immunization",
    "Observation",
    "Encounter",
    "DiagnosticReport",
    "Procedure",
];

/// Search parameters passed on to members (besides the patient).
pub const FORWARDED_PARAMS: [&str; 6] = [
    "category",
    "code",
    "date",
    "status",
    "clinical-status",
    "_count",
];

/// One member to ask, with its own identifier for the person.
#[derive(Debug, Clone)]
pub struct Target {
    pub org_id: String,
    pub fhir_base: String,
    pub system: String,
    pub value: String,
}

/// What one member answered for one search.
#[derive(Debug, Clone)]
pub enum Answer {
    Resources {
        resources: Vec<Value>,
        /// Entries dropped because they were not valid resources of the type asked for.
        dropped: usize,
    },
    /// The member failed, refused, timed out or was skipped; `code` is a FHIR issue type.
    Failed { code: &'static str, message: String },
}

#[derive(Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    /// A trial request is in flight after the cooldown.
    probing: bool,
}

struct MemberState {
    slots: Semaphore,
    breaker: Mutex<Breaker>,
}

pub struct Federation {
    settings: FederationConfig,
    outbound: Outbound,
    members: Mutex<HashMap<String, Arc<MemberState>>>,
}

enum Gate {
    Open,
    Probe,
    Skip(Duration),
}

impl Federation {
    pub fn new(settings: FederationConfig, outbound: Outbound) -> Federation {
        Federation {
            settings,
            outbound,
            members: Mutex::new(HashMap::new()),
        }
    }

    pub fn deadline(&self, emergency: bool) -> Duration {
        Duration::from_millis(if emergency {
            self.settings.emergency_deadline_ms
        } else {
            self.settings.deadline_ms
        })
    }

    fn member(&self, org: &str) -> Arc<MemberState> {
        let mut members = match self.members.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(members.entry(org.to_string()).or_insert_with(|| {
            Arc::new(MemberState {
                slots: Semaphore::new(self.settings.max_concurrent_per_member),
                breaker: Mutex::new(Breaker::default()),
            })
        }))
    }

    fn gate(&self, m: &MemberState) -> Gate {
        let Ok(mut b) = m.breaker.lock() else {
            return Gate::Open;
        };
        match b.open_until {
            None => Gate::Open,
            Some(until) if Instant::now() < until => Gate::Skip(until - Instant::now()),
            Some(_) if b.probing => Gate::Skip(Duration::ZERO),
            Some(_) => {
                b.probing = true;
                Gate::Probe
            }
        }
    }

    fn record(&self, m: &MemberState, org: &str, ok: bool) {
        let Ok(mut b) = m.breaker.lock() else {
            return;
        };
        b.probing = false;
        if ok {
            if b.open_until.is_some() {
                tracing::info!(member = org, "member answers again: circuit closed");
            }
            *b = Breaker::default();
            return;
        }
        b.failures += 1;
        if b.failures >= self.settings.breaker_failures {
            let cooldown = Duration::from_millis(self.settings.breaker_cooldown_ms);
            if b.open_until.is_none() {
                tracing::warn!(
                    member = org,
                    failures = b.failures,
                    "member keeps failing: circuit open"
                );
            }
            b.open_until = Some(Instant::now() + cooldown);
        }
    }

    /// Asks one member one search, before `deadline`.
    pub async fn ask(
        &self,
        target: &Target,
        kind: &str,
        extra: &[(String, String)],
        deadline: Instant,
    ) -> Answer {
        let member = self.member(&target.org_id);
        let probe = match self.gate(&member) {
            Gate::Skip(left) => {
                return Answer::Failed {
                    code: "transient",
                    message: format!(
                        "member '{}' skipped: it failed {} times in a row; it will be tried again in {} s",
                        target.org_id,
                        self.settings.breaker_failures,
                        left.as_secs().max(1)
                    ),
                }
            }
            Gate::Probe => true,
            Gate::Open => false,
        };
        let work = async {
            let _slot = member.slots.acquire().await;
            self.fetch(target, kind, extra).await
        };
        let answer = match tokio::time::timeout_at(deadline.into(), work).await {
            Ok(a) => a,
            Err(_) => Answer::Failed {
                code: "timeout",
                message: format!(
                    "member '{}' did not answer {kind} before the deadline",
                    target.org_id
                ),
            },
        };
        let ok = matches!(answer, Answer::Resources { .. });
        self.record(&member, &target.org_id, ok);
        if probe && !ok {
            tracing::warn!(member = %target.org_id, "trial request failed: circuit stays open");
        }
        answer
    }

    async fn fetch(&self, target: &Target, kind: &str, extra: &[(String, String)]) -> Answer {
        let fail = |code, message: String| Answer::Failed { code, message };
        let url = format!("{}/{kind}", target.fhir_base);
        let mut query: Vec<(String, String)> = vec![(
            "patient.identifier".into(),
            format!("{}|{}", target.system, target.value),
        )];
        query.extend(extra.iter().cloned());
        let url = match reqwest::Url::parse_with_params(&url, &query) {
            Ok(u) => u,
            Err(e) => {
                return fail(
                    "exception",
                    format!("member '{}' has an unusable FHIR base: {e}", target.org_id),
                )
            }
        };
        let sent = self
            .outbound
            .client()
            .get(url)
            .header("Accept", "application/fhir+json")
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return fail(
                    "timeout",
                    format!("member '{}' did not answer in time", target.org_id),
                )
            }
            Err(e) => {
                return fail(
                    "transient",
                    format!(
                        "member '{}' could not be reached: {}",
                        target.org_id,
                        crate::outbound::describe(&e)
                    ),
                )
            }
        };
        let status = response.status();
        if !status.is_success() {
            return fail(
                if status.as_u16() == 403 || status.as_u16() == 401 {
                    "forbidden"
                } else {
                    "transient"
                },
                format!("member '{}' answered {status} for {kind}", target.org_id),
            );
        }
        let cap = self.settings.max_response_bytes;
        let mut body: Vec<u8> = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > cap {
                        return fail(
                            "too-costly",
                            format!("member '{}' sent more than {cap} bytes for {kind}; its answer was not used", target.org_id),
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return fail(
                        "transient",
                        format!(
                            "the answer of member '{}' broke off: {}",
                            target.org_id,
                            crate::outbound::describe(&e)
                        ),
                    )
                }
            }
        }
        let Ok(bundle) = serde_json::from_slice::<Value>(&body) else {
            return fail(
                "processing",
                format!(
                    "member '{}' sent an answer that is not JSON; it was not used",
                    target.org_id
                ),
            );
        };
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return fail(
                "processing",
                format!(
                    "member '{}' sent something other than a Bundle; it was not used",
                    target.org_id
                ),
            );
        }
        let entries = bundle
            .get("entry")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut resources = Vec::new();
        let mut dropped = 0;
        for e in entries {
            if e.pointer("/search/mode").and_then(Value::as_str) == Some("outcome") {
                continue;
            }
            let valid = e.get("resource").filter(|r| {
                r.get("resourceType").and_then(Value::as_str) == Some(kind)
                    && r.get("id").and_then(Value::as_str).is_some_and(valid_id)
            });
            match valid {
                Some(r) if resources.len() < self.settings.max_resources_per_member => {
                    resources.push(r.clone())
                }
                _ => dropped += 1,
            }
        }
        Answer::Resources { resources, dropped }
    }
}

/// A FHIR id: 1-64 of [A-Za-z0-9-.].
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

//! The audit trail: append-only and hash-chained. Each record's hash is SHA-256 over the
//! previous record's hash and a canonical encoding (JSON, fixed field order) of its sequence
//! number and content, so editing, deleting or reordering any record breaks the chain at that
//! point. Writes are audited inside their own transaction (`db::audit::append`); reads go
//! through the `Auditor`, which group-commits concurrent records and answers only once they are
//! durable, so no disclosure leaves before its record.

mod writer;

pub use writer::Auditor;

use serde::{Deserialize, Serialize};

use crate::ids::OrgId;
use crate::policy::PurposeOfUse;

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who did it: the organisation proven by its certificate, the person it names, and why.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub org_id: Option<OrgId>,
    pub user_id: Option<String>,
    pub user_role: Option<String>,
    pub purpose: Option<PurposeOfUse>,
    pub client_addr: Option<String>,
    pub request_id: Option<String>,
    /// The reason given for break-the-glass (ETREAT + X-Break-Glass-Reason).
    pub break_glass: Option<String>,
}

impl Actor {
    /// An operator at the broker's own command line.
    pub fn cli() -> Actor {
        let user = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .unwrap_or_else(|_| "unknown".into());
        Actor {
            user_id: Some(user),
            user_role: Some("operator-cli".into()),
            purpose: Some(PurposeOfUse::Hoperat),
            ..Actor::default()
        }
    }
}

/// FHIR AuditEvent.action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// FHIR AuditEvent.outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    MinorFailure,
    SeriousFailure,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::MinorFailure => "4",
            Outcome::SeriousFailure => "8",
        }
    }
}

/// One audit record as it is hashed and stored (without its place in the chain).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub recorded_at: i64,
    pub org_id: Option<String>,
    pub user_id: Option<String>,
    pub user_role: Option<String>,
    pub purpose: Option<String>,
    pub client_addr: Option<String>,
    pub request_id: Option<String>,
    /// `rest` (a FHIR interaction), `admin` (operator action), `security` (refused access).
    pub event_type: String,
    pub action: String,
    /// The FHIR interaction (`search-type`, `read`, …) or operator action (`org-add`, …).
    pub subtype: String,
    pub patient: Option<String>,
    /// What was touched, e.g. `Organization/general-hospital`.
    pub entity: Option<String>,
    /// The query string of a search, as received.
    pub query: Option<String>,
    pub outcome: String,
    pub outcome_desc: Option<String>,
    /// Break-the-glass reason; hashed only when present (records from before it existed verify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<String>,
}

impl AuditRecord {
    pub fn new(actor: &Actor, event_type: &str, action: Action, subtype: &str) -> AuditRecord {
        AuditRecord {
            recorded_at: crate::time::now_micros(),
            org_id: actor.org_id.as_ref().map(|o| o.to_string()),
            user_id: actor.user_id.clone(),
            user_role: actor.user_role.clone(),
            purpose: actor.purpose.map(|p| p.code().to_string()),
            client_addr: actor.client_addr.clone(),
            request_id: actor.request_id.clone(),
            event_type: event_type.into(),
            action: action.code().into(),
            subtype: subtype.into(),
            patient: None,
            entity: None,
            query: None,
            outcome: Outcome::Success.code().into(),
            outcome_desc: None,
            break_glass: actor.break_glass.clone(),
        }
    }

    pub fn entity(mut self, entity: impl Into<String>) -> Self {
        self.entity = Some(entity.into());
        self
    }

    pub fn query(mut self, query: impl Into<String>) -> Self {
        let q = query.into();
        self.query = (!q.is_empty()).then_some(q);
        self
    }

    pub fn patient(mut self, patient: impl Into<String>) -> Self {
        self.patient = Some(patient.into());
        self
    }

    pub fn outcome(mut self, outcome: Outcome, desc: impl Into<String>) -> Self {
        self.outcome = outcome.code().into();
        self.outcome_desc = Some(desc.into());
        self
    }
}

/// A record in its place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedRecord {
    pub seq: i64,
    pub record: AuditRecord,
    pub prev_hash: String,
    pub hash: String,
}

#[derive(Serialize)]
struct Canonical<'a> {
    seq: i64,
    #[serde(flatten)]
    record: &'a AuditRecord,
}

/// SHA-256 (hex) over the previous hash and the canonical encoding of (seq, record).
pub fn chain_hash(prev_hash: &str, seq: i64, record: &AuditRecord) -> String {
    let body = serde_json::to_vec(&Canonical { seq, record }).unwrap_or_default();
    let mut h = openssl::sha::Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(b"\n");
    h.update(&body);
    hex::encode(h.finish())
}

/// The result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    Intact { records: u64, head_hash: String },
    Broken { seq: i64, reason: String },
}

/// Checks one stretch of the chain that starts right after (`prev_seq`, `prev_hash`).
/// Returns the new end, or where it breaks.
pub fn verify_stretch(
    prev_seq: &mut i64,
    prev_hash: &mut String,
    records: &[ChainedRecord],
) -> Option<(i64, String)> {
    for r in records {
        if r.seq != *prev_seq + 1 {
            return Some((
                *prev_seq + 1,
                format!(
                    "record {} is missing (next found is {})",
                    *prev_seq + 1,
                    r.seq
                ),
            ));
        }
        if r.prev_hash != *prev_hash {
            return Some((
                r.seq,
                "its prev_hash does not match the previous record's hash".into(),
            ));
        }
        if chain_hash(prev_hash, r.seq, &r.record) != r.hash {
            return Some((
                r.seq,
                "its content does not match its hash (the record was edited)".into(),
            ));
        }
        *prev_seq = r.seq;
        prev_hash.clone_from(&r.hash);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: i64) -> AuditRecord {
        let mut r = AuditRecord::new(&Actor::default(), "rest", Action::Read, "search-type");
        r.recorded_at = n;
        r
    }

    fn chain(n: i64) -> Vec<ChainedRecord> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let record = rec(seq);
                let hash = chain_hash(&prev, seq, &record);
                let c = ChainedRecord {
                    seq,
                    record,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                c
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let (mut s, mut h) = (0, GENESIS_HASH.to_string());
        assert_eq!(verify_stretch(&mut s, &mut h, &chain(5)), None);
        assert_eq!(s, 5);
    }

    #[test]
    fn an_edited_record_is_named() {
        let mut c = chain(5);
        c[2].record.org_id = Some("someone-else".into());
        let (mut s, mut h) = (0, GENESIS_HASH.to_string());
        assert_eq!(verify_stretch(&mut s, &mut h, &c).map(|b| b.0), Some(3));
    }

    #[test]
    fn a_deleted_record_is_named() {
        let mut c = chain(5);
        c.remove(1);
        let (mut s, mut h) = (0, GENESIS_HASH.to_string());
        assert_eq!(verify_stretch(&mut s, &mut h, &c).map(|b| b.0), Some(2));
    }
}

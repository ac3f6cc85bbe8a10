//! Consent enforcement on the read paths: what this requester may see of which person. Used
//! inside database closures, so that filtering happens before totals, paging and answers are
//! computed — what is withheld leaves no trace in counts or messages.

use serde_json::{json, Value};
use std::collections::HashMap;

use crate::api::context::RequestContext;
use crate::api::AppState;
use crate::config::ConsentModel;
use crate::db::DbConn;
use crate::error::Result;
use crate::policy::consent::{self, Access, Rule, BREAK_GLASS_SYSTEM};

/// The requester, as the policy sees it.
#[derive(Debug, Clone)]
pub struct Asker {
    org: String,
    break_glass: bool,
    model: ConsentModel,
    break_glass_overrides_opt_out: bool,
}

impl Asker {
    pub fn new(state: &AppState, ctx: &RequestContext) -> Asker {
        Asker {
            org: ctx.org.id.to_string(),
            break_glass: ctx.purpose.is_emergency() && ctx.break_glass.is_some(),
            model: state.config.policy.model,
            break_glass_overrides_opt_out: state.config.policy.break_glass_overrides_opt_out,
        }
    }

    pub fn breaks_glass(&self) -> bool {
        self.break_glass
    }

    /// The consent filter PDQm applies in SQL; None under the opt-in model, where only the
    /// people who said yes may be shown (checked person by person instead).
    pub fn hidden_from(&self) -> Option<crate::db::mpi::HiddenFrom> {
        if self.model == ConsentModel::OptIn {
            return None;
        }
        Some(crate::db::mpi::HiddenFrom {
            // Break-the-glass overrides organisation denials ('' matches no directive).
            org: if self.break_glass {
                String::new()
            } else {
                self.org.clone()
            },
            opted_out: !(self.break_glass && self.break_glass_overrides_opt_out),
        })
    }

    /// What the requester may see of each of these people.
    pub fn access(&self, conn: &mut DbConn, eids: &[i64]) -> Result<HashMap<i64, Access>> {
        let mut rules: HashMap<i64, Vec<Rule>> = HashMap::new();
        if !eids.is_empty() {
            for (eid, rule) in crate::db::consent::active_rules_of(conn, eids)? {
                if let Ok(r) = serde_json::from_str::<Rule>(&rule) {
                    rules.entry(eid).or_default().push(r);
                }
            }
        }
        Ok(eids
            .iter()
            .map(|e| {
                let r = rules.get(e).map(Vec::as_slice).unwrap_or_default();
                (
                    *e,
                    consent::evaluate(
                        r,
                        self.model,
                        &self.org,
                        self.break_glass,
                        self.break_glass_overrides_opt_out,
                    ),
                )
            })
            .collect())
    }

    pub fn access_one(&self, conn: &mut DbConn, eid: i64) -> Result<Access> {
        Ok(self.access(conn, &[eid])?.remove(&eid).unwrap_or_default())
    }

    /// The people of `eids` the requester may see, in order, and whether break-the-glass
    /// released any of them.
    pub fn visible(&self, conn: &mut DbConn, eids: &[i64]) -> Result<(Vec<i64>, bool)> {
        let access = self.access(conn, eids)?;
        let mut overridden = false;
        let out = eids
            .iter()
            .filter(|e| {
                let a = access.get(e).cloned().unwrap_or_default();
                overridden |= a.visible && a.overridden;
                a.visible
            })
            .copied()
            .collect();
        Ok((out, overridden))
    }
}

/// Marks an answer that contains data released under break-the-glass (`meta.security` BTG).
pub fn mark_break_glass(resource: &mut Value) {
    if !resource.get("meta").is_some_and(Value::is_object) {
        resource["meta"] = json!({});
    }
    let mut security = resource["meta"]["security"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    security
        .push(json!({ "system": BREAK_GLASS_SYSTEM, "code": "BTG", "display": "break the glass" }));
    resource["meta"]["security"] = json!(security);
}

/// The header that says so, for answers that are not Bundles (document bytes).
pub const BREAK_GLASS_HEADER: &str = "x-break-glass";

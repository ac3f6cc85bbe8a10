//! Patients' consent directives and what they allow. A directive is a FHIR `Consent` with one
//! `provision` (no nesting): `deny` or `permit`, optionally for named organisations
//! (`provision.actor.reference`) and/or for sensitive categories (`provision.securityLabel`).
//!
//! | provision                       | meaning                                                   |
//! |---------------------------------|-----------------------------------------------------------|
//! | deny                            | opt out of the exchange: nothing is disclosed             |
//! | deny + actors                   | those organisations get nothing                           |
//! | deny + securityLabels           | data carrying those labels is withheld (from everyone, or from the actors named) |
//! | permit                          | opt in (the `opt-in` model shares nothing without it)     |
//! | permit + actors                 | opt in for those organisations only                       |
//!
//! Break-the-glass (purpose ETREAT with a stated reason) overrides organisation denials and
//! category restrictions, and an opt-out when `[policy] break_glass_overrides_opt_out`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;

use crate::config::ConsentModel;
use crate::error::{Error, Result};

pub const SCOPE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/consentscope";
pub const BREAK_GLASS_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// One directive, reduced to what enforcement needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub permit: bool,
    /// Organisation ids; empty = everyone.
    pub actors: Vec<String>,
    /// Security label codes; empty = all data.
    pub labels: Vec<String>,
}

impl Rule {
    /// Whom an active directive hides the person from: `*` (everyone: opted out),
    /// `,a,b,` (those organisations) or empty.
    pub fn hides(&self) -> String {
        if self.permit || !self.labels.is_empty() {
            String::new()
        } else if self.actors.is_empty() {
            "*".into()
        } else {
            format!(",{},", self.actors.join(","))
        }
    }
}

/// What one requester may see of one person.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    pub visible: bool,
    /// Security label codes whose data must be withheld.
    pub restricted: BTreeSet<String>,
    /// Break-the-glass released something that would otherwise have been withheld.
    pub overridden: bool,
}

impl Access {
    pub fn open() -> Access {
        Access {
            visible: true,
            ..Access::default()
        }
    }

    /// Whether data carrying these label codes may be disclosed.
    pub fn allows(&self, labels: &[String]) -> bool {
        self.visible && !labels.iter().any(|l| self.restricted.contains(l))
    }
}

pub fn evaluate(
    rules: &[Rule],
    model: ConsentModel,
    org: &str,
    break_glass: bool,
    break_glass_overrides_opt_out: bool,
) -> Access {
    let applies = |r: &Rule| r.actors.is_empty() || r.actors.iter().any(|a| a == org);
    let opted_out = rules
        .iter()
        .any(|r| !r.permit && r.labels.is_empty() && r.actors.is_empty());
    let org_denied = rules
        .iter()
        .any(|r| !r.permit && r.labels.is_empty() && !r.actors.is_empty() && applies(r));
    let permitted = rules
        .iter()
        .any(|r| r.permit && r.labels.is_empty() && applies(r));
    let base_denied = match model {
        ConsentModel::OptOut => opted_out,
        ConsentModel::OptIn => opted_out || !permitted,
    };
    let restricted: BTreeSet<String> = rules
        .iter()
        .filter(|r| !r.permit && !r.labels.is_empty() && applies(r))
        .flat_map(|r| r.labels.iter().cloned())
        .collect();
    let mut access = Access {
        visible: !(base_denied || org_denied),
        restricted,
        overridden: false,
    };
    if break_glass {
        if !access.visible && (!base_denied || break_glass_overrides_opt_out) {
            access.visible = true;
            access.overridden = true;
        }
        if access.visible && !access.restricted.is_empty() {
            access.restricted.clear();
            access.overridden = true;
        }
    }
    access
}

/// The security label codes of a resource: `securityLabel` (DocumentReference) and
/// `meta.security` (any resource).
pub fn labels_of(resource: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut codes = |v: Option<&Value>| {
        for item in v
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if let Some(c) = item.get("code").and_then(Value::as_str) {
                out.push(c.to_string());
            }
            for coding in item
                .get("coding")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(c) = coding.get("code").and_then(Value::as_str) {
                    out.push(c.to_string());
                }
            }
        }
    };
    codes(resource.get("securityLabel"));
    codes(resource.pointer("/meta/security"));
    out
}

/// The patient a Consent is about, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentPatient {
    Reference(String),
    Identifier(String, String),
}

/// A checked Consent: its patient, status and rule.
#[derive(Debug, Clone)]
pub struct Directive {
    pub patient: ConsentPatient,
    pub status: String,
    pub rule: Rule,
}

/// Checks a submitted Consent and reduces it to a rule. `known_org` says whether an
/// organisation id exists.
pub fn parse(resource: &Value, known_org: &dyn Fn(&str) -> bool) -> Result<Directive> {
    if resource.get("resourceType").and_then(Value::as_str) != Some("Consent") {
        return Err(Error::invalid("the body must be a FHIR Consent").at("resourceType"));
    }
    let status = resource
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !["active", "inactive", "entered-in-error"].contains(&status) {
        return Err(Error::invalid(
            "Consent.status must be active, inactive (withdrawn) or entered-in-error",
        )
        .at("Consent.status"));
    }
    let patient = match (
        resource.pointer("/patient/reference").and_then(Value::as_str),
        resource.pointer("/patient/identifier/system").and_then(Value::as_str),
        resource.pointer("/patient/identifier/value").and_then(Value::as_str),
    ) {
        (Some(r), _, _) => ConsentPatient::Reference(r.to_string()),
        (None, Some(s), Some(v)) if !s.is_empty() && !v.is_empty() => {
            ConsentPatient::Identifier(s.to_string(), v.to_string())
        }
        _ => {
            return Err(Error::invalid(
                "Consent.patient is required: a reference (Patient/ent-N or Patient/src-N) or an identifier with system and value",
            )
            .at("Consent.patient"))
        }
    };
    let provision = resource.get("provision").ok_or_else(|| {
        Error::invalid("Consent.provision is required: type deny or permit, optionally with actor and securityLabel")
            .at("Consent.provision")
    })?;
    if provision.get("provision").is_some() {
        return Err(Error::invalid(
            "nested provisions are not supported: record one Consent per directive",
        )
        .at("Consent.provision.provision"));
    }
    let permit = match provision.get("type").and_then(Value::as_str) {
        Some("deny") => false,
        Some("permit") => true,
        _ => {
            return Err(
                Error::invalid("Consent.provision.type must be deny or permit")
                    .at("Consent.provision.type"),
            )
        }
    };
    let mut actors = Vec::new();
    for (i, a) in provision
        .get("actor")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let path = format!("Consent.provision.actor[{i}].reference");
        let r = a
            .pointer("/reference/reference")
            .and_then(Value::as_str)
            .and_then(|r| r.rsplit_once("Organization/").map(|(_, id)| id))
            .ok_or_else(|| {
                Error::invalid(
                    "provision.actor.reference must reference an Organization (Organization/ID)",
                )
                .at(path.clone())
            })?;
        if !known_org(r) {
            return Err(Error::invalid(format!(
                "Organization/{r} is not a member of this exchange"
            ))
            .at(path));
        }
        actors.push(r.to_string());
    }
    let mut labels = Vec::new();
    for (i, l) in provision
        .get("securityLabel")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let code = l.get("code").and_then(Value::as_str).filter(|c| !c.is_empty()).ok_or_else(|| {
            Error::invalid("provision.securityLabel must be Codings with a code (e.g. R, V, PSY, ETH, HIV, SDV)")
                .at(format!("Consent.provision.securityLabel[{i}]"))
        })?;
        labels.push(code.to_string());
    }
    if permit && !labels.is_empty() {
        return Err(Error::invalid(
            "a permit provision cannot name security labels: sensitive categories are restricted with deny",
        )
        .at("Consent.provision.securityLabel"));
    }
    actors.sort();
    actors.dedup();
    labels.sort();
    labels.dedup();
    Ok(Directive {
        patient,
        status: status.to_string(),
        rule: Rule {
            permit,
            actors,
            labels,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(permit: bool, actors: &[&str], labels: &[&str]) -> Rule {
        Rule {
            permit,
            actors: actors.iter().map(|s| s.to_string()).collect(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn directives_combine() {
        let out = [rule(false, &[], &[])];
        assert!(!evaluate(&out, ConsentModel::OptOut, "a", false, true).visible);
        let bg = evaluate(&out, ConsentModel::OptOut, "a", true, true);
        assert!(bg.visible && bg.overridden);
        assert!(!evaluate(&out, ConsentModel::OptOut, "a", true, false).visible);
        let deny_b = [rule(false, &["b"], &[])];
        assert!(evaluate(&deny_b, ConsentModel::OptOut, "a", false, true).visible);
        assert!(!evaluate(&deny_b, ConsentModel::OptOut, "b", false, true).visible);
        let psy = [rule(false, &[], &["PSY"])];
        let a = evaluate(&psy, ConsentModel::OptOut, "a", false, true);
        assert!(a.visible && !a.allows(&["PSY".into()]) && a.allows(&["N".into()]));
        assert!(evaluate(&psy, ConsentModel::OptOut, "a", true, true).allows(&["PSY".into()]));
        assert!(!evaluate(&[], ConsentModel::OptIn, "a", false, true).visible);
        assert!(
            evaluate(
                &[rule(true, &[], &[])],
                ConsentModel::OptIn,
                "a",
                false,
                true
            )
            .visible
        );
        assert!(
            !evaluate(
                &[rule(true, &["b"], &[])],
                ConsentModel::OptIn,
                "a",
                false,
                true
            )
            .visible
        );
    }
}

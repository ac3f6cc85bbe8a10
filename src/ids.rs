//! Typed ids so that an organisation id can never be passed where another id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{Error, Result};

/// A member organisation's id: lowercase letters, digits and `-`, 2 to 64 characters.
/// It is also the FHIR `Organization.id`, so it must be a valid FHIR id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrgId(String);

impl OrgId {
    pub fn parse(s: &str) -> Result<Self> {
        let ok = (2..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-');
        if ok {
            Ok(OrgId(s.to_string()))
        } else {
            Err(Error::invalid(format!(
                "'{s}' is not a valid organisation id: use 2-64 lowercase letters, digits and '-'"
            )))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OrgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// SHA-256 fingerprint of a certificate's DER encoding, lowercase hex without separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of_der(der: &[u8]) -> Self {
        Fingerprint(hex::encode(openssl::sha::sha256(der)))
    }
    pub fn from_hex(s: &str) -> Self {
        Fingerprint(s.to_ascii_lowercase())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn org_ids_are_fhir_ids() {
        assert!(OrgId::parse("general-hospital").is_ok());
        assert!(OrgId::parse("Bad Id").is_err());
        assert!(OrgId::parse("-x").is_err());
        assert!(OrgId::parse("a").is_err());
    }
}

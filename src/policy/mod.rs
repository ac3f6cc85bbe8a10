//! Access policy: purposes of use (consent, break-the-glass and org-type rules build on this).

pub mod consent;

use crate::error::{Error, Result};

pub const PURPOSE_OF_USE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// HL7 v3 PurposeOfUse codes the exchange accepts in `X-Purpose-Of-Use`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PurposeOfUse {
    Treat,
    Etreat,
    Caremgt,
    Coc,
    Hpaymt,
    Hoperat,
    Hsysadmin,
    Hresch,
    Pubhlth,
    Patrqt,
    Famrqt,
    Pwatrny,
    Hlegal,
    Hcompl,
}

const ALL: [(PurposeOfUse, &str, &str); 14] = [
    (PurposeOfUse::Treat, "TREAT", "treatment"),
    (PurposeOfUse::Etreat, "ETREAT", "emergency treatment"),
    (PurposeOfUse::Caremgt, "CAREMGT", "care management"),
    (PurposeOfUse::Coc, "COC", "coordination of care"),
    (PurposeOfUse::Hpaymt, "HPAYMT", "healthcare payment"),
    (PurposeOfUse::Hoperat, "HOPERAT", "healthcare operations"),
    (
        PurposeOfUse::Hsysadmin,
        "HSYSADMIN",
        "health system administration",
    ),
    (PurposeOfUse::Hresch, "HRESCH", "healthcare research"),
    (PurposeOfUse::Pubhlth, "PUBHLTH", "public health"),
    (PurposeOfUse::Patrqt, "PATRQT", "patient requested"),
    (PurposeOfUse::Famrqt, "FAMRQT", "family requested"),
    (PurposeOfUse::Pwatrny, "PWATRNY", "power of attorney"),
    (PurposeOfUse::Hlegal, "HLEGAL", "legal"),
    (PurposeOfUse::Hcompl, "HCOMPL", "compliance"),
];

impl PurposeOfUse {
    /// Parses a code as sent in `X-Purpose-Of-Use`; a `system|code` token is accepted too.
    pub fn parse(raw: &str) -> Result<PurposeOfUse> {
        let code = raw.trim();
        let code = match code.split_once('|') {
            Some((system, c)) if system.is_empty() || system == PURPOSE_OF_USE_SYSTEM => c,
            Some(_) => {
                return Err(Error::invalid(format!(
                    "X-Purpose-Of-Use system must be {PURPOSE_OF_USE_SYSTEM}"
                )))
            }
            None => code,
        };
        ALL.iter()
            .find(|(_, c, _)| c.eq_ignore_ascii_case(code))
            .map(|(p, _, _)| *p)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "X-Purpose-Of-Use '{code}' is not a known HL7 PurposeOfUse code; use one of {}",
                    ALL.iter()
                        .map(|(_, c, _)| *c)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    pub fn code(self) -> &'static str {
        ALL.iter()
            .find(|(p, _, _)| *p == self)
            .map(|(_, c, _)| *c)
            .unwrap_or("TREAT")
    }

    pub fn display(self) -> &'static str {
        ALL.iter()
            .find(|(p, _, _)| *p == self)
            .map(|(_, _, d)| *d)
            .unwrap_or("treatment")
    }

    pub fn is_emergency(self) -> bool {
        self == PurposeOfUse::Etreat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_parse_with_or_without_system() {
        assert_eq!(PurposeOfUse::parse("TREAT").ok(), Some(PurposeOfUse::Treat));
        assert_eq!(
            PurposeOfUse::parse("etreat").ok(),
            Some(PurposeOfUse::Etreat)
        );
        assert_eq!(
            PurposeOfUse::parse("http://terminology.hl7.org/CodeSystem/v3-ActReason|PATRQT").ok(),
            Some(PurposeOfUse::Patrqt)
        );
        assert!(PurposeOfUse::parse("SHOPPING").is_err());
        assert!(PurposeOfUse::parse("http://other|TREAT").is_err());
    }
}

//! Normalisation of demographics before matching: case, diacritics, punctuation and spacing in
//! names; dates; phone numbers to digits; postal codes; address tokens. Also the blocking keys
//! under which a record can be found as a candidate.

use rphonetic::{DoubleMetaphone, Encoder, Soundex};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A normalised field: held inline up to 24 bytes (nearly every name, date, postcode, phone and
/// street is), so a candidate's demographics are one block of memory. Matching reads ~20
/// candidates a record; each field on the heap was one more allocation to build and free and
/// one more cache miss to compare.
pub type Text = compact_str::CompactString;

/// The demographics of one source record, normalised for matching.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demographics {
    pub family: Option<Text>,
    pub given: Option<Text>,
    /// Further given names (middle names), space-separated.
    pub middle: Option<Text>,
    /// YYYY-MM-DD (or YYYY-MM / YYYY when only that is known).
    pub birth_date: Option<Text>,
    pub gender: Option<Text>,
    pub postcode: Option<Text>,
    /// House number and street, normalised tokens.
    pub street: Option<Text>,
    pub city: Option<Text>,
    /// Digits only, at most the last 10.
    pub phone: Option<Text>,
    /// Identifiers in systems shared across members (national id, insurance), normalised.
    pub shared_ids: Vec<(Text, Text)>,
}

/// Lowercase ASCII letters and digits, single spaces: "  O'Brien-Smith " → "obrien smith".
pub fn name(raw: &str) -> Option<String> {
    let ascii = deunicode::deunicode(raw).to_lowercase();
    let mut out = String::with_capacity(ascii.len());
    for c in ascii.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if c == '\'' || c == '.' {
            // O'Brien → obrien; St. → st
        } else if !out.ends_with(' ') && !out.is_empty() {
            out.push(' ');
        }
    }
    let out = out.trim().to_string();
    (!out.is_empty()).then_some(out)
}

const STREET_WORDS: [(&str, &str); 16] = [
    ("st", "street"),
    ("str", "street"),
    ("rd", "road"),
    ("ave", "avenue"),
    ("av", "avenue"),
    ("dr", "drive"),
    ("pl", "place"),
    ("ct", "court"),
    ("cres", "crescent"),
    ("cr", "crescent"),
    ("ln", "lane"),
    ("hwy", "highway"),
    ("blvd", "boulevard"),
    ("tce", "terrace"),
    ("cl", "close"),
    ("pde", "parade"),
];

/// Address line: normalised words with common street abbreviations expanded.
pub fn street(raw: &str) -> Option<String> {
    let n = name(raw)?;
    let words: Vec<&str> = n
        .split(' ')
        .map(|w| {
            STREET_WORDS
                .iter()
                .find(|(a, _)| *a == w)
                .map(|(_, full)| *full)
                .unwrap_or(w)
        })
        .collect();
    Some(words.join(" "))
}

pub fn postcode(raw: &str) -> Option<String> {
    let p: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_uppercase();
    (!p.is_empty()).then_some(p)
}

pub fn phone(raw: &str) -> Option<String> {
    let digits: String = raw.chars().filter(char::is_ascii_digit).collect();
    let tail = if digits.len() > 10 {
        &digits[digits.len() - 10..]
    } else {
        &digits[..]
    };
    (tail.len() >= 6).then(|| tail.to_string())
}

pub fn identifier_value(raw: &str) -> Option<String> {
    let v: String = raw
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_uppercase();
    (!v.is_empty()).then_some(v)
}

/// FHIR date (YYYY, YYYY-MM, YYYY-MM-DD) or YYYYMMDD → FHIR form, if it is a real date.
pub fn date(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let compact = raw.len() == 8 && raw.bytes().all(|b| b.is_ascii_digit());
    let full = if compact {
        format!("{}-{}-{}", &raw[..4], &raw[4..6], &raw[6..])
    } else {
        raw.to_string()
    };
    match full.len() {
        10 => chrono::NaiveDate::parse_from_str(&full, "%Y-%m-%d")
            .ok()
            .map(|d| d.format("%Y-%m-%d").to_string()),
        7 => chrono::NaiveDate::parse_from_str(&format!("{full}-01"), "%Y-%m-%d")
            .ok()
            .map(|_| full),
        4 if full.bytes().all(|b| b.is_ascii_digit()) => Some(full),
        _ => None,
    }
}

pub fn gender(raw: &str) -> Option<String> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "male" | "m" => Some("male".into()),
        "female" | "f" => Some("female".into()),
        "other" | "o" => Some("other".into()),
        _ => None,
    }
}

fn soundex(s: &str) -> String {
    Soundex::default().encode(s)
}

pub fn metaphone(s: &str) -> String {
    DoubleMetaphone::default().encode(s)
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

impl Demographics {
    /// From a FHIR Patient resource. `shared_systems` are the identifier systems that count as
    /// matching evidence.
    pub fn from_patient(p: &Value, shared_systems: &[String]) -> Demographics {
        let names = p
            .get("name")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let official = names
            .iter()
            .find(|n| str_at(n, "use") == Some("official"))
            .or_else(|| {
                names
                    .iter()
                    .find(|n| str_at(n, "use") != Some("old") && str_at(n, "use") != Some("maiden"))
            })
            .or(names.first());
        let (family, given, middle) = match official {
            Some(n) => {
                let givens: Vec<String> = n
                    .get("given")
                    .and_then(Value::as_array)
                    .map(|g| {
                        g.iter()
                            .filter_map(Value::as_str)
                            .filter_map(name)
                            .collect()
                    })
                    .unwrap_or_default();
                let middle = (givens.len() > 1).then(|| givens[1..].join(" "));
                (
                    str_at(n, "family").and_then(name),
                    givens.first().cloned(),
                    middle,
                )
            }
            None => (None, None, None),
        };
        let addresses = p
            .get("address")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let address = addresses
            .iter()
            .find(|a| str_at(a, "use") == Some("home"))
            .or_else(|| addresses.iter().find(|a| str_at(a, "use") != Some("old")))
            .or(addresses.first());
        let (street_line, city, postal) = match address {
            Some(a) => {
                let line = a
                    .get("line")
                    .and_then(Value::as_array)
                    .and_then(|l| l.first())
                    .and_then(Value::as_str)
                    .and_then(street);
                (
                    line,
                    str_at(a, "city").and_then(name),
                    str_at(a, "postalCode").and_then(postcode),
                )
            }
            None => (None, None, None),
        };
        let phone = p.get("telecom").and_then(Value::as_array).and_then(|t| {
            t.iter()
                .filter(|c| str_at(c, "system") == Some("phone"))
                .find_map(|c| str_at(c, "value").and_then(phone))
        });
        let mut shared_ids: Vec<(Text, Text)> = p
            .get("identifier")
            .and_then(Value::as_array)
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| {
                        let system = str_at(i, "system")?;
                        if !shared_systems.iter().any(|s| s == system) {
                            return None;
                        }
                        let value = identifier_value(str_at(i, "value")?)?;
                        Some((Text::from(system), Text::from(value)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        shared_ids.sort();
        shared_ids.dedup();
        let text = |s: Option<String>| s.map(Text::from);
        Demographics {
            family: text(family),
            given: text(given),
            middle: text(middle),
            birth_date: text(str_at(p, "birthDate").and_then(date)),
            gender: text(str_at(p, "gender").and_then(gender)),
            postcode: text(postal),
            street: text(street_line),
            city: text(city),
            phone: text(phone),
            shared_ids,
        }
    }

    pub fn birth_year(&self) -> Option<&str> {
        self.birth_date.as_deref().and_then(|d| d.get(..4))
    }

    /// The record's blocking keys as stored (`key_id`), sorted, each once.
    pub fn key_ids(&self) -> Vec<KeyId> {
        let mut ids: Vec<KeyId> = self.blocking_keys().iter().map(|k| key_id(k)).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Keys under which candidates for this record are looked up (and it is stored).
    pub fn blocking_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let initial = |s: &Option<Text>| s.as_deref().and_then(|v| v.chars().next());
        if let (Some(f), Some(y)) = (&self.family, self.birth_year()) {
            keys.push(format!("fy:{}:{y}", soundex(f)));
        }
        if let (Some(g), Some(d)) = (&self.given, &self.birth_date) {
            keys.push(format!("gd:{}:{d}", soundex(g)));
        }
        if let (Some(f), Some(d)) = (&self.family, &self.birth_date) {
            keys.push(format!("fd:{}:{d}", metaphone(f)));
        }
        // Name keys are order-invariant, so a record with given and family swapped is found.
        if let (Some(g), Some(f)) = (&self.given, &self.family) {
            let mut m = [metaphone(g), metaphone(f)];
            m.sort();
            keys.push(format!("nm:{}:{}", m[0], m[1]));
        }
        if let (Some(p), Some(gi), Some(fi)) =
            (&self.postcode, initial(&self.given), initial(&self.family))
        {
            let (a, b) = if gi <= fi { (gi, fi) } else { (fi, gi) };
            keys.push(format!("pi:{p}:{a}{b}"));
        }
        // Birth date and both initials, in either order: finds a record whose names were
        // both mistyped past their first letter, or swapped and mistyped.
        if let (Some(d), Some(gi), Some(fi)) = (
            &self.birth_date,
            initial(&self.given),
            initial(&self.family),
        ) {
            let (a, b) = if gi <= fi { (gi, fi) } else { (fi, gi) };
            keys.push(format!("di:{d}:{a}{b}"));
        }
        if let (Some(d), Some(p)) = (&self.birth_date, &self.postcode) {
            keys.push(format!("dp:{d}:{p}"));
        }
        // Postcode, the street's first word (the house number, mostly) and the second word's
        // initial: a typo in the street name ("12 mian street") still files the record with
        // its street.
        if let (Some(s), Some(p)) = (&self.street, &self.postcode) {
            let mut words = s.split(' ');
            let first = words.next().unwrap_or_default();
            let initial = words.next().and_then(|w| w.chars().next());
            keys.push(match initial {
                Some(i) => format!("ad:{p}:{first} {i}"),
                None => format!("ad:{p}:{first}"),
            });
        }
        if let Some(ph) = &self.phone {
            keys.push(phone_key_text(ph));
        }
        for (system, value) in &self.shared_ids {
            keys.push(format!("id:{system}|{value}"));
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// A blocking key as the database files it: the 64-bit FNV-1a hash of its text. An integer
/// key makes the key index a third smaller than the text (~17 bytes a key, ten keys a record)
/// and its comparisons integer ones; both the bulk load's writes and every candidate lookup
/// walk that index. Two keys sharing a hash (about one pair in 10^12 at 10 million keys)
/// only bring one more candidate to be scored, never a link. FNV-1a is fixed by its
/// definition, so stored keys stay valid across versions and platforms.
pub type KeyId = i64;

/// The blocking key of a normalised phone number (PDQm's `telecom` search finds records by it).
pub fn phone_key(phone: &str) -> KeyId {
    key_id(&phone_key_text(phone))
}

fn phone_key_text(phone: &str) -> String {
    format!("ph:{phone}")
}

pub fn key_id(key: &str) -> KeyId {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(key.as_bytes());
    // Stored as a signed BIGINT: the same 64 bits.
    h.finish() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_lose_case_diacritics_and_punctuation() {
        assert_eq!(
            name("  José O'Brien-Núñez ").as_deref(),
            Some("jose obrien nunez")
        );
        assert_eq!(name("..."), None);
        assert_eq!(
            street("12 Wallaby Pl.").as_deref(),
            Some("12 wallaby place")
        );
        assert_eq!(phone("+1 (555) 010-2345").as_deref(), Some("5550102345"));
        assert_eq!(postcode("sw1a 1aa").as_deref(), Some("SW1A1AA"));
        assert_eq!(date("19560409").as_deref(), Some("1956-04-09"));
        assert_eq!(date("19561340"), None);
        assert_eq!(date("1956-04").as_deref(), Some("1956-04"));
    }

    #[test]
    fn patient_demographics_and_blocking_keys() {
        let p = json!({
            "resourceType": "Patient",
            "identifier": [
                { "system": "urn:oid:1.2.3", "value": "MRN-1" },
                { "system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789" }
            ],
            "name": [{ "use": "old", "family": "Maiden" }, { "use": "official", "family": "Müller", "given": ["Anna", "Maria"] }],
            "gender": "female",
            "birthDate": "1980-02-03",
            "telecom": [{ "system": "phone", "value": "555-010-2345" }],
            "address": [{ "use": "home", "line": ["4 Main St"], "city": "Springfield", "postalCode": "12345" }]
        });
        let d = Demographics::from_patient(&p, &["http://hl7.org/fhir/sid/us-ssn".to_string()]);
        assert_eq!(d.family.as_deref(), Some("muller"));
        assert_eq!(d.given.as_deref(), Some("anna"));
        assert_eq!(d.middle.as_deref(), Some("maria"));
        assert_eq!(d.street.as_deref(), Some("4 main street"));
        assert_eq!(
            d.shared_ids,
            vec![("http://hl7.org/fhir/sid/us-ssn".into(), "123456789".into())]
        );
        let keys = d.blocking_keys();
        assert!(
            keys.iter().any(|k| k.starts_with("fy:M460:1980")),
            "{keys:?}"
        );
        assert!(keys
            .iter()
            .any(|k| k == "id:http://hl7.org/fhir/sid/us-ssn|123456789"));
        assert!(keys.iter().any(|k| k == "ad:12345:4 m"), "{keys:?}");
        let ids = d.key_ids();
        assert_eq!(ids.len(), keys.len());
        assert!(ids.contains(&key_id("ad:12345:4 m")));
    }

    #[test]
    fn key_ids_are_fnv_1a() {
        // The published FNV-1a 64 test vectors: stored keys must never change meaning.
        assert_eq!(key_id("") as u64, 0xcbf29ce484222325);
        assert_eq!(key_id("a") as u64, 0xaf63dc4c8601ec8c);
        assert_eq!(key_id("foobar") as u64, 0x85944171f73967e8);
    }

    #[test]
    fn a_typo_in_the_street_name_keeps_the_street_key() {
        let at = |line: &str| Demographics {
            street: street(line).map(Text::from),
            postcode: Some("12345".into()),
            ..Demographics::default()
        };
        let key = |d: Demographics| d.blocking_keys().into_iter().find(|k| k.starts_with("ad:"));
        assert_eq!(key(at("12 Main Street")), Some("ad:12345:12 m".into()));
        assert_eq!(key(at("12 Mian Stret")), key(at("12 Main Street")));
        assert_ne!(key(at("14 Main Street")), key(at("12 Main Street")));
        assert_eq!(key(at("Studley")), Some("ad:12345:studley".into()));
    }
}

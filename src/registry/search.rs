//! Search parameters of ITI-67 (DocumentReference) and ITI-66 (List). The person is resolved
//! through the MPI and their documents loaded by index; the remaining parameters filter that
//! small set here, each parameter ANDed, comma-separated values ORed, as FHIR search defines.

use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use serde_json::Value;

use crate::db::documents::{DocumentRow, ListRow};
use crate::error::{Error, Result};

/// `[start, end)` in microseconds of a FHIR date or dateTime at its precision.
pub fn date_range(s: &str) -> Option<(i64, i64)> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        let m = t.timestamp_micros();
        return Some((m, m + 1));
    }
    let micros = |d: NaiveDate| -> Option<i64> {
        Some(
            Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?)
                .timestamp_micros(),
        )
    };
    let parts: Vec<&str> = s.split('-').collect();
    let num = |p: &str, len: usize| (p.len() == len).then(|| p.parse::<u32>().ok()).flatten();
    match parts.as_slice() {
        [y] => {
            let y = num(y, 4)? as i32;
            Some((
                micros(NaiveDate::from_ymd_opt(y, 1, 1)?)?,
                micros(NaiveDate::from_ymd_opt(y + 1, 1, 1)?)?,
            ))
        }
        [y, m] => {
            let start = NaiveDate::from_ymd_opt(num(y, 4)? as i32, num(m, 2)?, 1)?;
            let next = if start.month() == 12 {
                NaiveDate::from_ymd_opt(start.year() + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(start.year(), start.month() + 1, 1)?
            };
            Some((micros(start)?, micros(next)?))
        }
        [y, m, d] => {
            let day = NaiveDate::from_ymd_opt(num(y, 4)? as i32, num(m, 2)?, num(d, 2)?)?;
            Some((micros(day)?, micros(day.succ_opt()?)?))
        }
        _ => None,
    }
}

/// A date parameter: comparison prefix and range.
#[derive(Debug, Clone, Copy)]
pub struct DateParam {
    prefix: Prefix,
    start: i64,
    end: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

impl DateParam {
    pub fn parse(param: &str, raw: &str) -> Result<DateParam> {
        let (prefix, rest) = match raw.get(..2) {
            Some("eq") => (Prefix::Eq, &raw[2..]),
            Some("ne") => (Prefix::Ne, &raw[2..]),
            Some("gt") => (Prefix::Gt, &raw[2..]),
            Some("lt") => (Prefix::Lt, &raw[2..]),
            Some("ge") => (Prefix::Ge, &raw[2..]),
            Some("le") => (Prefix::Le, &raw[2..]),
            _ => (Prefix::Eq, raw),
        };
        let (start, end) = date_range(rest).ok_or_else(|| {
            Error::invalid(format!(
                "{param} '{raw}' is not a FHIR date: use [ge|le|gt|lt|eq|ne]YYYY[-MM[-DD[Thh:mm:ssZ]]]"
            ))
            .at(param)
        })?;
        Ok(DateParam { prefix, start, end })
    }

    /// Whether a value spanning `[lo, hi)` matches (an instant is `[t, t+1)`).
    fn matches(&self, lo: i64, hi: i64) -> bool {
        match self.prefix {
            Prefix::Eq => lo >= self.start && hi <= self.end,
            Prefix::Ne => !(lo >= self.start && hi <= self.end),
            Prefix::Gt => hi > self.end,
            Prefix::Lt => lo < self.start,
            Prefix::Ge => hi > self.start,
            Prefix::Le => lo < self.end,
        }
    }
}

/// One token of a token parameter: `code`, `system|code`, `|code` or `system|`.
#[derive(Debug, Clone)]
struct Token {
    system: Option<String>,
    code: Option<String>,
}

impl Token {
    fn parse(raw: &str) -> Token {
        match raw.split_once('|') {
            None => Token {
                system: None,
                code: Some(raw.to_string()),
            },
            Some((s, c)) => Token {
                system: Some(s.to_string()),
                code: (!c.is_empty()).then(|| c.to_string()),
            },
        }
    }

    fn matches(&self, system: Option<&str>, code: Option<&str>) -> bool {
        let system_ok = match self.system.as_deref() {
            None => true,
            Some("") => system.is_none(),
            Some(s) => system == Some(s),
        };
        let code_ok = match self.code.as_deref() {
            None => true,
            Some(c) => code == Some(c),
        };
        system_ok && code_ok
    }
}

/// Codings under a path: a CodeableConcept, an array of them, a Coding or an array of Codings.
fn codings<'a>(v: Option<&'a Value>, out: &mut Vec<(Option<&'a str>, Option<&'a str>)>) {
    match v {
        Some(Value::Array(items)) => items.iter().for_each(|i| codings(Some(i), out)),
        Some(Value::Object(o)) => {
            if let Some(cs) = o.get("coding") {
                codings(Some(cs), out);
            } else if o.contains_key("code") || o.contains_key("value") {
                let code = o
                    .get("code")
                    .or_else(|| o.get("value"))
                    .and_then(Value::as_str);
                out.push((o.get("system").and_then(Value::as_str), code));
            }
        }
        _ => {}
    }
}

fn references<'a>(v: Option<&'a Value>, out: &mut Vec<&'a str>) {
    match v {
        Some(Value::Array(items)) => items.iter().for_each(|i| references(Some(i), out)),
        Some(Value::Object(o)) => {
            if let Some(r) = o.get("reference").and_then(Value::as_str) {
                out.push(r);
            }
            if let Some(t) = o.get("target") {
                references(Some(t), out);
            }
        }
        _ => {}
    }
}

fn reference_matches(wanted: &str, have: &str, fhir_base: &str) -> bool {
    let local = |s: &str| -> String {
        s.strip_prefix(fhir_base)
            .map(|r| r.trim_start_matches('/').to_string())
            .unwrap_or_else(|| s.to_string())
    };
    let (w, h) = (local(wanted), local(have));
    w == h || (!w.contains('/') && h.rsplit('/').next() == Some(w.as_str()))
}

#[derive(Debug, Clone)]
enum Filter {
    /// Codings at a JSON path (or several).
    Token(&'static [&'static str], Vec<Token>),
    Reference(&'static [&'static str], Vec<String>),
    Status(Vec<String>),
    Date(DateParam),
    Period(DateParam),
}

/// The non-patient criteria of a search, parsed and checked.
#[derive(Debug, Clone, Default)]
pub struct Criteria {
    filters: Vec<Filter>,
    fhir_base: String,
    pub ascending: bool,
}

/// A search parameter and the JSON paths it looks at.
type ParamPaths = (&'static str, &'static [&'static str]);

const DOC_TOKENS: [(&str, &[&str]); 8] = [
    ("category", &["/category"]),
    ("type", &["/type"]),
    ("setting", &["/context/practiceSetting"]),
    ("event", &["/context/event"]),
    ("facility", &["/context/facilityType"]),
    ("format", &["/content/0/format"]),
    ("security-label", &["/securityLabel"]),
    ("identifier", &["/masterIdentifier", "/identifier"]),
];
const DOC_REFERENCES: [(&str, &[&str]); 3] = [
    ("author", &["/author"]),
    ("related", &["/context/related"]),
    ("relatesto", &["/relatesTo"]),
];
const LIST_TOKENS: [(&str, &[&str]); 3] = [
    ("code", &["/code"]),
    ("identifier", &["/identifier"]),
    ("designationType", &["/extension"]),
];
const LIST_REFERENCES: [(&str, &[&str]); 1] = [("source", &["/source"])];

/// Parameters of ITI-67 besides patient and paging.
pub const DOC_PARAMS: [&str; 17] = [
    "patient",
    "patient.identifier",
    "status",
    "category",
    "type",
    "date",
    "period",
    "setting",
    "event",
    "facility",
    "format",
    "security-label",
    "author",
    "identifier",
    "related",
    "relatesto",
    "relation",
];

pub const LIST_PARAMS: [&str; 9] = [
    "patient",
    "patient.identifier",
    "status",
    "code",
    "date",
    "identifier",
    "source",
    "designationType",
    "_sort",
];

impl Criteria {
    /// From `(name, value)` pairs. `documents` selects the DocumentReference table of
    /// parameters, else List's.
    pub fn parse(pairs: &[(String, String)], documents: bool, fhir_base: &str) -> Result<Criteria> {
        let mut c = Criteria {
            fhir_base: fhir_base.to_string(),
            ..Criteria::default()
        };
        let mut status_given = false;
        let (tokens, refs): (&[ParamPaths], &[ParamPaths]) = if documents {
            (&DOC_TOKENS, &DOC_REFERENCES)
        } else {
            (&LIST_TOKENS, &LIST_REFERENCES)
        };
        for (name, value) in pairs {
            if value.is_empty() {
                continue;
            }
            let values = || value.split(',').map(str::trim).filter(|v| !v.is_empty());
            match name.as_str() {
                "status" => {
                    status_given = true;
                    c.filters.push(Filter::Status(values().map(str::to_string).collect()));
                }
                "date" => c.filters.push(Filter::Date(DateParam::parse(name, value)?)),
                "period" if documents => c.filters.push(Filter::Period(DateParam::parse(name, value)?)),
                "relation" if documents => c.filters.push(Filter::Token(
                    &["/relatesTo"],
                    values().map(|v| Token { system: None, code: Some(v.to_string()) }).collect(),
                )),
                "_sort" => match value.as_str() {
                    "-date" => c.ascending = false,
                    "date" => c.ascending = true,
                    other => {
                        return Err(Error::invalid(format!(
                            "_sort '{other}' is not supported: use -date (newest first, the default) or date"
                        ))
                        .at("_sort"))
                    }
                },
                n => {
                    if let Some((_, paths)) = tokens.iter().find(|(p, _)| *p == n) {
                        c.filters.push(Filter::Token(paths, values().map(Token::parse).collect()));
                    } else if let Some((_, paths)) = refs.iter().find(|(p, _)| *p == n) {
                        c.filters.push(Filter::Reference(paths, values().map(str::to_string).collect()));
                    }
                }
            }
        }
        if !status_given {
            c.filters.push(Filter::Status(vec!["current".into()]));
        }
        Ok(c)
    }

    fn matches(&self, resource: &Value, status: &str, date: Option<i64>) -> bool {
        self.filters.iter().all(|f| match f {
            Filter::Status(wanted) => wanted.iter().any(|w| w == status),
            Filter::Date(p) => date.is_some_and(|d| p.matches(d, d + 1)),
            Filter::Period(p) => {
                let bound = |k: &str| {
                    resource
                        .pointer(&format!("/context/period/{k}"))
                        .and_then(Value::as_str)
                        .and_then(date_range)
                };
                match (bound("start"), bound("end")) {
                    (None, None) => false,
                    (s, e) => p.matches(
                        s.map(|r| r.0).unwrap_or(i64::MIN),
                        e.map(|r| r.1).unwrap_or(i64::MAX),
                    ),
                }
            }
            Filter::Token(paths, tokens) => {
                let mut have = Vec::new();
                for p in paths.iter() {
                    if *p == "/relatesTo" {
                        if let Some(rels) = resource.get("relatesTo").and_then(Value::as_array) {
                            have.extend(
                                rels.iter()
                                    .map(|r| (None, r.get("code").and_then(Value::as_str))),
                            );
                        }
                    } else {
                        codings(resource.pointer(p), &mut have);
                    }
                }
                tokens
                    .iter()
                    .any(|t| have.iter().any(|(s, c)| t.matches(*s, *c)))
            }
            Filter::Reference(paths, wanted) => {
                let mut have = Vec::new();
                for p in paths.iter() {
                    references(resource.pointer(p), &mut have);
                }
                wanted.iter().any(|w| {
                    have.iter()
                        .any(|h| reference_matches(w, h, &self.fhir_base))
                })
            }
        })
    }

    /// Filters and sorts (by date, newest first unless `_sort=date`) the documents of a person.
    pub fn documents(&self, rows: Vec<DocumentRow>) -> Vec<(DocumentRow, Value)> {
        let mut out: Vec<(DocumentRow, Value)> = rows
            .into_iter()
            .filter_map(|row| {
                let r: Value = serde_json::from_str(&row.resource).ok()?;
                self.matches(&r, &row.status, row.doc_date)
                    .then_some((row, r))
            })
            .collect();
        out.sort_by_key(|(r, _)| (r.doc_date, r.id));
        if !self.ascending {
            out.reverse();
        }
        out
    }

    pub fn lists(&self, rows: Vec<ListRow>) -> Vec<ListRow> {
        let mut out: Vec<ListRow> = rows
            .into_iter()
            .filter(|row| {
                serde_json::from_str::<Value>(&row.resource)
                    .is_ok_and(|r| self.matches(&r, &row.status, row.list_date))
            })
            .collect();
        out.sort_by_key(|r| (r.list_date, r.id));
        if !self.ascending {
            out.reverse();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn date_ranges_follow_precision() {
        let (s, e) = date_range("2026-02").unwrap_or_default();
        assert_eq!(e - s, 28 * 86_400_000_000);
        assert!(date_range("2026-13-01").is_none());
        assert!(date_range("yesterday").is_none());
        let ge = DateParam::parse("date", "ge2026-02-01").ok();
        let t = date_range("2026-02-01T10:00:00Z")
            .map(|r| r.0)
            .unwrap_or_default();
        assert!(ge.is_some_and(|p| p.matches(t, t + 1)));
        let lt = DateParam::parse("date", "lt2026-02-01").ok();
        assert!(lt.is_some_and(|p| !p.matches(t, t + 1)));
    }

    #[test]
    fn tokens_match_codings() {
        let r = json!({ "category": [{ "coding": [{ "system": "http://loinc.org", "code": "11369-6" }] }],
                        "securityLabel": [{ "coding": [{ "system": "s", "code": "N" }] }] });
        let c = |q: &[(&str, &str)]| {
            let pairs: Vec<(String, String)> = q
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
            Criteria::parse(&pairs, true, "https://x/fhir").map(|c| c.matches(&r, "current", None))
        };
        assert!(c(&[("category", "http://loinc.org|11369-6")]).unwrap_or(false));
        assert!(c(&[("category", "11369-6")]).unwrap_or(false));
        assert!(!c(&[("category", "other|11369-6")]).unwrap_or(true));
        assert!(c(&[("category", "x,11369-6"), ("security-label", "N")]).unwrap_or(false));
        assert!(!c(&[("status", "superseded")]).unwrap_or(true));
        assert!(c(&[("_sort", "name")]).is_err());
    }
}

//! Fellegi–Sunter scoring of two records: each field is compared at a level (exact, close,
//! phonetic, transposed date, …), each level carries a weight log2(m/u), and the sum decides.
//! Known hazards (twins, junior/senior, uncorroborated common names, conflicting national ids)
//! can never be auto-linked whatever the sum. Every score keeps its breakdown.

use rapidfuzz::distance::{jaro_winkler as jw, osa};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Jaro–Winkler similarity (prefix weight 0.1, up to 4 characters). Normalised fields are
/// ASCII, compared byte by byte; anything else by character.
fn jaro_winkler(a: &str, b: &str) -> f64 {
    if a.is_ascii() && b.is_ascii() {
        jw::similarity(a.bytes(), b.bytes())
    } else {
        jw::similarity(a.chars(), b.chars())
    }
}

/// Optimal-string-alignment distance: edits, an adjacent transposition counting as one.
fn osa_distance(a: &str, b: &str) -> usize {
    if a.is_ascii() && b.is_ascii() {
        osa::distance(a.bytes(), b.bytes())
    } else {
        osa::distance(a.chars(), b.chars())
    }
}

/// Edits (insert, delete, substitute, swap adjacent) between two strings, counted up to 3:
/// every level compares with at most 2. Most pairs differ by more; a byte-count bound tells
/// without the dynamic programme.
fn edits(a: &str, b: &str) -> usize {
    if a == b {
        return 0;
    }
    let (x, y) = (a.as_bytes(), b.as_bytes());
    if x.len().abs_diff(y.len()) > 2 {
        return 3;
    }
    // One edit changes the byte counts by at most 2 (a substitution: one down, one up). The
    // counts summed over the bytes present, each once (its count cleared as it is taken), not
    // over all 256: this bound settles most of the millions of pairs a bulk load compares.
    let mut counts = [0i32; 256];
    for &c in x {
        counts[c as usize] += 1;
    }
    for &c in y {
        counts[c as usize] -= 1;
    }
    let mut apart = 0;
    for &c in x.iter().chain(y) {
        apart += std::mem::take(&mut counts[c as usize]).abs();
    }
    if apart > 4 {
        return 3;
    }
    osa_distance(a, b).min(3)
}

use super::nicknames::are_nicknames;
use super::normalize::{metaphone, Demographics, Text};
use crate::error::{Error, Result};

pub const DEFAULT_WEIGHTS: &str = include_str!("../../config/match-weights.toml");

/// Share of records holding each common value of a name field (`[term_frequency.FIELD]`).
pub type TermFrequencies = BTreeMap<String, BTreeMap<String, f64>>;

/// Fields whose exact agreement is weighed by how common the value is.
pub const TERM_FREQUENCY_FIELDS: [&str; 2] = ["given", "family"];

/// m/u probabilities per field and level.
#[derive(Debug, Clone)]
pub struct Weights {
    table: BTreeMap<String, BTreeMap<String, (f64, f64)>>,
    /// log2(m/u) of each level, computed once.
    logs: BTreeMap<String, BTreeMap<String, f64>>,
    /// The same, for the fields and levels `score` uses, by position: scoring looks a weight
    /// up for every field of every candidate, and string-keyed maps made that a third of it.
    grid: [[f64; LEVELS.len()]; FIELDS.len()],
    /// The highest weight of each field (by position): what a field could add at best.
    best: [f64; FIELDS.len()],
    /// Term-frequency adjustment: an exact agreement on a value held by a share `f` of records
    /// larger than the field's `u` weighs log2(m / f) instead of log2(m / u). Two Smiths agree
    /// far more often by chance than two Featherstonehaughs. Only ever lowers a weight: a rare
    /// name weighs what any exact agreement does.
    frequencies: TermFrequencies,
}

impl Weights {
    pub fn parse(text: &str) -> Result<Weights> {
        let bad = |e: &dyn std::fmt::Display| Error::config(format!("match weights: {e}"));
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| bad(&e))?;
        let frequencies: TermFrequencies = match doc.remove("term_frequency") {
            Some(v) => v.try_into().map_err(|e| bad(&e))?,
            None => BTreeMap::new(),
        };
        for (field, values) in &frequencies {
            if let Some((value, f)) = values.iter().find(|(_, f)| !(**f > 0.0 && **f < 1.0)) {
                return Err(Error::config(format!(
                    "match weights term_frequency.{field}.{value} = {f}: a share must be in (0, 1)"
                )));
            }
        }
        let table: BTreeMap<String, BTreeMap<String, (f64, f64)>> =
            toml::Value::Table(doc).try_into().map_err(|e| bad(&e))?;
        for (field, levels) in &table {
            for (level, (m, u)) in levels {
                if !(*m > 0.0 && *m < 1.0 && *u > 0.0 && *u < 1.0) {
                    return Err(Error::config(format!(
                        "match weights {field}.{level}: m and u must be in (0, 1)"
                    )));
                }
            }
        }
        Ok(Weights::from_table(table).with_frequencies(frequencies))
    }

    /// These weights with a term-frequency table (see `frequencies`).
    pub fn with_frequencies(mut self, frequencies: TermFrequencies) -> Weights {
        self.frequencies = frequencies;
        self
    }

    /// The weight of an exact agreement on `value` in `field`, adjusted for how common it is.
    pub fn exact_weight(&self, field: &str, value: &str) -> f64 {
        let base = self.weight(field, "exact");
        let share = self.frequencies.get(field).and_then(|v| v.get(value));
        match (share, self.table.get(field).and_then(|l| l.get("exact"))) {
            (Some(f), Some((m, u))) if f > u => (m / f).log2().min(base),
            _ => base,
        }
    }

    pub fn defaults() -> Weights {
        // The embedded table is checked by a unit test.
        Self::parse(DEFAULT_WEIGHTS).unwrap_or_else(|_| Weights::from_table(BTreeMap::new()))
    }

    /// Street, postcode and city together weigh at most this much.
    fn address_cap(&self) -> f64 {
        1.4 * self.weight("street", "exact")
    }

    /// The weight of a level of one of `score`'s fields.
    fn at(&self, field: Field, level: Level) -> f64 {
        self.grid[field as usize][level as usize]
    }

    pub fn weight(&self, field: &str, level: &str) -> f64 {
        if let (Some(f), Some(l)) = (field_index(field), level_index(level)) {
            return self.grid[f][l];
        }
        self.logs
            .get(field)
            .and_then(|l| l.get(level))
            .copied()
            .unwrap_or(0.0)
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        for (field, levels) in &self.table {
            out.push_str(&format!("[{field}]\n"));
            for (level, (m, u)) in levels {
                out.push_str(&format!("{level} = [{m:.6}, {u:.8}]\n"));
            }
            out.push('\n');
        }
        for (field, values) in &self.frequencies {
            out.push_str(&format!("[term_frequency.{field}]\n"));
            for (value, f) in values {
                // Normalised names are lowercase letters, digits and spaces: quoted keys.
                out.push_str(&format!("\"{value}\" = {f:.8}\n"));
            }
            out.push('\n');
        }
        out
    }

    pub fn table(&self) -> &BTreeMap<String, BTreeMap<String, (f64, f64)>> {
        &self.table
    }

    pub fn from_table(table: BTreeMap<String, BTreeMap<String, (f64, f64)>>) -> Weights {
        let logs = table
            .iter()
            .map(|(field, levels)| {
                let levels = levels
                    .iter()
                    .map(|(level, (m, u))| (level.clone(), (m / u).log2()))
                    .collect();
                (field.clone(), levels)
            })
            .collect::<BTreeMap<String, BTreeMap<String, f64>>>();
        let mut grid = [[0.0; LEVELS.len()]; FIELDS.len()];
        for (f, field) in FIELDS.iter().enumerate() {
            for (l, level) in LEVELS.iter().enumerate() {
                grid[f][l] = logs
                    .get(*field)
                    .and_then(|ls| ls.get(*level))
                    .copied()
                    .unwrap_or(0.0);
            }
        }
        let best = grid.map(|levels| levels.into_iter().fold(0.0, f64::max));
        Weights {
            table,
            logs,
            grid,
            best,
            frequencies: BTreeMap::new(),
        }
    }
}

/// The fields `score` compares, in `Weights::grid` order.
const FIELDS: [&str; 9] = [
    "given",
    "family",
    "birth_date",
    "gender",
    "postcode",
    "street",
    "city",
    "phone",
    "shared_id",
];

/// The levels `score` compares at, in `Weights::grid` order.
const LEVELS: [&str; 9] = [
    "exact",
    "nickname",
    "close",
    "similar",
    "phonetic",
    "transposed",
    "typo",
    "agree",
    "disagree",
];

/// A field `score` compares: its place in `FIELDS` and `Weights::grid`. Scoring names fields
/// and levels by position, so its comparisons and weight lookups are integer ones; the names
/// are for the stored breakdown and the weights file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Given,
    Family,
    BirthDate,
    Gender,
    Postcode,
    Street,
    City,
    Phone,
    SharedId,
}

impl Field {
    fn name(self) -> &'static str {
        FIELDS[self as usize]
    }
}

/// A comparison level: its place in `LEVELS` and `Weights::grid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Exact,
    Nickname,
    Close,
    Similar,
    Phonetic,
    Transposed,
    Typo,
    Agree,
    Disagree,
}

impl Level {
    fn name(self) -> &'static str {
        LEVELS[self as usize]
    }
}

/// A field's place in `FIELDS` (a `match`, which compiles to fixed-length compares).
fn field_index(field: &str) -> Option<usize> {
    Some(match field {
        "given" => 0,
        "family" => 1,
        "birth_date" => 2,
        "gender" => 3,
        "postcode" => 4,
        "street" => 5,
        "city" => 6,
        "phone" => 7,
        "shared_id" => 8,
        _ => return None,
    })
}

/// A level's place in `LEVELS`.
fn level_index(level: &str) -> Option<usize> {
    Some(match level {
        "exact" => 0,
        "nickname" => 1,
        "close" => 2,
        "similar" => 3,
        "phonetic" => 4,
        "transposed" => 5,
        "typo" => 6,
        "agree" => 7,
        "disagree" => 8,
        _ => return None,
    })
}

/// One field's contribution to a score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldScore {
    pub field: Cow<'static, str>,
    pub level: Cow<'static, str>,
    pub weight: f64,
}

/// Why a pair may not be linked automatically, whatever its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hazard {
    /// Same family name and birth date, different given names.
    Twin,
    /// Birth dates many years apart (junior/senior, parent/child).
    Generation,
    /// Same household, different first name and birth date (siblings).
    Sibling,
    /// Nothing but name and birth date agree (common name, same birthday).
    Uncorroborated,
    /// National/insurance ids differ and name or birth date do not fully agree either.
    SharedIdConflict,
}

impl Hazard {
    /// Its name as serialised (kebab-case).
    pub fn name(self) -> &'static str {
        match self {
            Hazard::Twin => "twin",
            Hazard::Generation => "generation",
            Hazard::Sibling => "sibling",
            Hazard::Uncorroborated => "uncorroborated",
            Hazard::SharedIdConflict => "shared-id-conflict",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Hazard::Twin => {
                "same family name and birth date but different given names (possible twins)"
            }
            Hazard::Generation => "birth dates years apart (possible junior/senior)",
            Hazard::Sibling => {
                "different first name and birth date in the same household (possible siblings)"
            }
            Hazard::Uncorroborated => {
                "only name and birth date agree; no address, phone or id corroborates"
            }
            Hazard::SharedIdConflict => "national/insurance identifiers differ",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub total: f64,
    pub fields: Vec<FieldScore>,
    pub hazards: Vec<Hazard>,
}

impl Score {
    /// A probability-like score in 0..1 for FHIR `search.score`: a logistic curve centred
    /// between the review and auto-link thresholds.
    pub fn probability(&self, thresholds: &Thresholds) -> f64 {
        let mid = (thresholds.review + thresholds.link) / 2.0;
        let spread = ((thresholds.link - thresholds.review) / 4.0).max(1.0);
        let p = 1.0 / (1.0 + (-(self.total - mid) / spread).exp2());
        (p * 1000.0).round() / 1000.0
    }

    pub fn level(&self, field: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| f.field == field)
            .map(|f| f.level.as_ref())
    }

    /// The breakdown as a decision or review stores it: one line,
    /// `S1;TOTAL;FIELD:LEVEL:WEIGHT,…;HAZARD,…`, numbers to four decimals — a third of the
    /// ~670 bytes of its JSON, which every decision of a linking member kept, and whose bytes
    /// were ~15 % of such a load's time (written to the WAL, then by the checkpoint).
    /// `breakdown_value` reads it back as that JSON.
    pub fn stored(&self) -> String {
        use std::fmt::Write;
        let four = |x: f64| (x * 1e4).round() / 1e4;
        let mut out = String::with_capacity(32 + 24 * self.fields.len());
        let _ = write!(out, "{STORED_PREFIX}{};", four(self.total));
        for (i, f) in self.fields.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(out, "{sep}{}:{}:{}", f.field, f.level, four(f.weight));
        }
        out.push(';');
        for (i, h) in self.hazards.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(h.name());
        }
        out
    }
}

/// What starts a breakdown stored by `Score::stored`; one stored before it is JSON.
const STORED_PREFIX: &str = "S1;";

/// A stored breakdown as JSON — `{"total", "fields": [{"field", "level", "weight"}],
/// "hazards"}`, as `Score` serialises — whether stored by `Score::stored` or as the JSON
/// stored before it; `null` if it is neither.
pub fn breakdown_value(stored: &str) -> serde_json::Value {
    let Some(rest) = stored.strip_prefix(STORED_PREFIX) else {
        return serde_json::from_str(stored).unwrap_or(serde_json::Value::Null);
    };
    let compact = || -> Option<serde_json::Value> {
        let mut parts = rest.splitn(3, ';');
        let total: f64 = parts.next()?.parse().ok()?;
        let fields = parts
            .next()?
            .split(',')
            .filter(|f| !f.is_empty())
            .map(|f| {
                let mut p = f.splitn(3, ':');
                let (field, level) = (p.next()?, p.next()?);
                let weight: f64 = p.next()?.parse().ok()?;
                Some(serde_json::json!({ "field": field, "level": level, "weight": weight }))
            })
            .collect::<Option<Vec<_>>>()?;
        let hazards: Vec<&str> = parts.next()?.split(',').filter(|h| !h.is_empty()).collect();
        Some(serde_json::json!({ "total": total, "fields": fields, "hazards": hazards }))
    };
    compact().unwrap_or(serde_json::Value::Null)
}

/// Score thresholds on the summed weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub link: f64,
    pub review: f64,
}

fn string_level(a: &str, b: &str, with_phonetic: bool) -> Level {
    if a == b {
        return Level::Exact;
    }
    let jw = jaro_winkler(a, b);
    if jw >= 0.94 {
        Level::Close
    } else if jw >= 0.86 || (a.len().min(b.len()) >= 5 && edits(a, b) <= 2) {
        Level::Similar
    } else if with_phonetic && metaphone(a) == metaphone(b) {
        Level::Phonetic
    } else {
        Level::Disagree
    }
}

fn given_level(a: &Demographics, b: &Demographics) -> Option<Level> {
    let (x, y) = (a.given.as_deref()?, b.given.as_deref()?);
    if x == y {
        return Some(Level::Exact);
    }
    if are_nicknames(x, y) {
        return Some(Level::Nickname);
    }
    // A middle name used as the first name on one side.
    let in_middle = |d: &Demographics, n: &str| {
        d.middle
            .as_deref()
            .is_some_and(|m| m.split(' ').any(|w| w == n))
    };
    if in_middle(a, y) || in_middle(b, x) {
        return Some(Level::Close);
    }
    Some(string_level(x, y, true))
}

fn date_level(a: &str, b: &str) -> Level {
    if a == b {
        return Level::Exact;
    }
    if a.len() != 10 || b.len() != 10 {
        return if a.get(..4) == b.get(..4) {
            Level::Typo
        } else {
            Level::Disagree
        };
    }
    let (ya, ma, da) = (&a[..4], &a[5..7], &a[8..]);
    let (yb, mb, db) = (&b[..4], &b[5..7], &b[8..]);
    if ya == yb && ma == db && da == mb {
        return Level::Transposed;
    }
    let differing = a.bytes().zip(b.bytes()).filter(|(x, y)| x != y).count();
    let years_apart = ya
        .parse::<i32>()
        .ok()
        .zip(yb.parse::<i32>().ok())
        .map(|(x, y)| (x - y).abs())
        .unwrap_or(99);
    // A typo: one digit apart, unless that digit moves the year by a generation (1950 / 1980
    // is a father and son as often as a typo); or two adjacent digits swapped, also across the
    // month/day boundary (11-23 / 12-13).
    let swapped = ya == yb && digits_edits(a, b) == 1;
    if (differing == 1 && years_apart < GENERATION_YEARS) || swapped {
        return Level::Typo;
    }
    if differing == 2 && years_apart < GENERATION_YEARS {
        return Level::Similar;
    }
    Level::Disagree
}

/// `edits` between two dates with their dashes taken out (without allocating: most candidates'
/// birth dates differ, and this runs for each).
fn digits_edits(a: &str, b: &str) -> usize {
    let digits = |s: &str| {
        let mut buf = [0u8; 16];
        let mut n = 0;
        for &c in s.as_bytes().iter().filter(|c| **c != b'-').take(buf.len()) {
            buf[n] = c;
            n += 1;
        }
        (buf, n)
    };
    let ((x, nx), (y, ny)) = (digits(a), digits(b));
    // Taking ASCII dashes out of UTF-8 leaves UTF-8.
    match (std::str::from_utf8(&x[..nx]), std::str::from_utf8(&y[..ny])) {
        (Ok(x), Ok(y)) => edits(x, y),
        _ => 3,
    }
}

fn edit_level(a: &str, b: &str, near: Level) -> Level {
    if a == b {
        Level::Exact
    } else if edits(a, b) == 1 {
        near
    } else {
        Level::Disagree
    }
}

fn street_level(a: &str, b: &str) -> Level {
    if a == b {
        return Level::Exact;
    }
    let jw = jaro_winkler(a, b);
    if jw >= 0.93 {
        return Level::Close;
    }
    if jw >= 0.85 {
        return Level::Similar;
    }
    // Tokens of b also in a (a few words each: counted in place, nothing allocated).
    let shared = b
        .split(' ')
        .filter(|w| a.split(' ').any(|t| t == *w))
        .count();
    if shared * 2 >= a.split(' ').count().max(b.split(' ').count()) {
        Level::Similar
    } else {
        Level::Disagree
    }
}

fn both<'a>(x: &'a Option<Text>, y: &'a Option<Text>) -> Option<(&'a str, &'a str)> {
    x.as_deref().zip(y.as_deref())
}

/// Compares two records field by field.
pub fn score(a: &Demographics, b: &Demographics, w: &Weights) -> Score {
    match others(a, b, w, f64::NEG_INFINITY) {
        Some(rest) => finish(a, b, w, &rest),
        // Nothing is below an infinitely low floor.
        None => Score {
            total: f64::NEG_INFINITY,
            fields: Vec::new(),
            hazards: Vec::new(),
        },
    }
}

/// `score`, if it can reach `floor`; `None` when it cannot. Most candidates a blocking key
/// brings are other people: their birth date, address, phone and national id already disagree,
/// so the best their names could add leaves them below the floor, and the costly name
/// comparisons (Jaro–Winkler, nicknames, phonetics) are skipped. The same scores as `score`
/// for every pair that reaches the floor.
pub fn score_at_least(
    a: &Demographics,
    b: &Demographics,
    w: &Weights,
    floor: f64,
) -> Option<Score> {
    let given = a.given.is_some() && b.given.is_some();
    let names = names_at_best(w, given, a.family.is_some() && b.family.is_some());
    let rest = others(a, b, w, floor - names)?;
    // The margin covers rounding: the bound is summed in another order than the score.
    if rest.total + names + 1e-9 < floor {
        return None;
    }
    let s = finish(a, b, w, &rest);
    (s.total >= floor).then_some(s)
}

/// What the names could add at best, by whether each is held on both sides.
fn names_at_best(w: &Weights, given: bool, family: bool) -> f64 {
    [(given, 0), (family, 1)]
        .iter()
        .filter(|(both, _)| *both)
        .map(|(_, f)| w.best[*f])
        .sum()
}

/// Two national/insurance ids of one system.
fn shared_level(a: &str, b: &str) -> Level {
    match edits(a, b) {
        0 => Level::Exact,
        1 => Level::Typo,
        2 if a.len() >= 6 => Level::Similar,
        _ => Level::Disagree,
    }
}

fn gender_level(a: &str, b: &str) -> Level {
    if a == b {
        Level::Agree
    } else {
        Level::Disagree
    }
}

/// Where `others` keeps postcode, street and city.
const POSTCODE: usize = 2;
const STREET: usize = 3;
const CITY: usize = 4;

/// Street, postcode and city are not independent evidence: together they count at most as
/// much as an exact street and a bit more. What the cap takes off (zero or less).
fn address_cap(w: &Weights, weights: &[f64; 7]) -> f64 {
    let address: f64 = weights[POSTCODE..=CITY].iter().map(|x| x.max(0.0)).sum();
    (w.address_cap() - address).min(0.0)
}

/// The weights of `OTHER_FIELDS` summed, the address cap applied.
fn capped_total(w: &Weights, weights: &[f64; 7]) -> f64 {
    weights.iter().sum::<f64>() + address_cap(w, weights)
}

/// What `score_at_least` rejects most pairs by — which fields are held; birth date, gender,
/// phone, a national id, postcode and street — inline in two cache lines. A bulk load scores
/// each record against ~20 stored candidates and rejects all but a handful (in the 1M load,
/// after comparing postcode and street); read from the candidates' `Demographics` (strings,
/// the id list and its system on the heap), those rejections were mostly waits for memory
/// (`BENCHMARKS.md`, session 23). Values too long to keep inline count at their best.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub struct Sketch {
    /// Which fields are held (`HELD_*`).
    held: u16,
    /// Held fields too long to keep inline (`WIDE_*`).
    wide: u8,
    date: Inline<10>,
    gender: Inline<8>,
    phone: Inline<10>,
    postcode: Inline<10>,
    /// The one national id's value and system (`WIDE_ID` when several, or long).
    id: Inline<16>,
    system: Inline<32>,
    street: Inline<32>,
}

/// A short text copied in place: its length, then its bytes, zeros after them.
#[derive(Clone, Debug, PartialEq)]
struct Inline<const N: usize> {
    len: u8,
    bytes: [u8; N],
}

impl<const N: usize> Inline<N> {
    const EMPTY: Inline<N> = Inline {
        len: 0,
        bytes: [0; N],
    };

    /// Copies `v` in when it fits; `false` (nothing copied) when it does not.
    fn set(&mut self, v: &str) -> bool {
        let fits = v.len() <= N;
        if fits {
            self.bytes[..v.len()].copy_from_slice(v.as_bytes());
            self.len = v.len() as u8;
        }
        fits
    }

    fn text(&self) -> &str {
        // Copied whole from a `str` (`set`): always UTF-8.
        std::str::from_utf8(self.bytes.get(..usize::from(self.len)).unwrap_or_default())
            .unwrap_or_default()
    }
}

const HELD_GIVEN: u16 = 1;
const HELD_FAMILY: u16 = 1 << 1;
const HELD_DATE: u16 = 1 << 2;
const HELD_GENDER: u16 = 1 << 3;
const HELD_POSTCODE: u16 = 1 << 4;
const HELD_STREET: u16 = 1 << 5;
const HELD_CITY: u16 = 1 << 6;
const HELD_PHONE: u16 = 1 << 7;
const HELD_ID: u16 = 1 << 8;
const WIDE_DATE: u8 = 1;
const WIDE_GENDER: u8 = 1 << 1;
const WIDE_PHONE: u8 = 1 << 2;
const WIDE_ID: u8 = 1 << 3;
const WIDE_POSTCODE: u8 = 1 << 4;
const WIDE_STREET: u8 = 1 << 5;

impl Sketch {
    pub fn of(d: &Demographics) -> Sketch {
        let mut k = Sketch {
            held: 0,
            wide: 0,
            date: Inline::EMPTY,
            gender: Inline::EMPTY,
            phone: Inline::EMPTY,
            postcode: Inline::EMPTY,
            id: Inline::EMPTY,
            system: Inline::EMPTY,
            street: Inline::EMPTY,
        };
        let (mut held, mut wide) = (0, 0);
        // A field held (`Some`), and whether it was copied in.
        let mut note = |h: u16, w: u8, copied: Option<bool>| {
            if let Some(copied) = copied {
                held |= h;
                if !copied {
                    wide |= w;
                }
            }
        };
        note(HELD_GIVEN, 0, d.given.as_ref().map(|_| true));
        note(HELD_FAMILY, 0, d.family.as_ref().map(|_| true));
        note(HELD_CITY, 0, d.city.as_ref().map(|_| true));
        let date = d.birth_date.as_deref().map(|v| k.date.set(v));
        note(HELD_DATE, WIDE_DATE, date);
        let gender = d.gender.as_deref().map(|v| k.gender.set(v));
        note(HELD_GENDER, WIDE_GENDER, gender);
        let phone = d.phone.as_deref().map(|v| k.phone.set(v));
        note(HELD_PHONE, WIDE_PHONE, phone);
        let postcode = d.postcode.as_deref().map(|v| k.postcode.set(v));
        note(HELD_POSTCODE, WIDE_POSTCODE, postcode);
        let street = d.street.as_deref().map(|v| k.street.set(v));
        note(HELD_STREET, WIDE_STREET, street);
        let id = d
            .shared_ids
            .first()
            .map(|(system, id)| d.shared_ids.len() == 1 && k.id.set(id) && k.system.set(system));
        note(HELD_ID, WIDE_ID, id);
        (k.held, k.wide) = (held, wide);
        k
    }
}

/// Whether a pair could reach `floor`: `false` only for pairs `score_at_least` rejects. The
/// same bounds `others` checks, computed alike, in the same order — with city, which is not
/// inline, at its best — and a wider rounding margin: the scores of the pairs let through are
/// unchanged.
pub fn may_reach(a: &Sketch, b: &Sketch, w: &Weights, floor: f64) -> bool {
    let both = |held: u16| a.held & b.held & held != 0;
    let inline = |held: u16, wide: u8| both(held) && (a.wide | b.wide) & wide == 0;
    let need = floor - names_at_best(w, both(HELD_GIVEN), both(HELD_FAMILY));
    let mut weights = [0.0; 7];
    /// A field's place, its bits, how it compares, and where the sketch holds it.
    type Compared = (usize, u16, u8, fn(&str, &str) -> Level, fn(&Sketch) -> &str);
    let level =
        |field: fn(&Sketch) -> &str, compare: fn(&str, &str) -> Level| compare(field(a), field(b));
    let cheap: [Compared; 3] = [
        (0, HELD_DATE, WIDE_DATE, date_level, |k| k.date.text()),
        (1, HELD_GENDER, WIDE_GENDER, gender_level, |k| {
            k.gender.text()
        }),
        (
            5,
            HELD_PHONE,
            WIDE_PHONE,
            |x, y| edit_level(x, y, Level::Close),
            |k| k.phone.text(),
        ),
    ];
    for (i, held, wide, compare, field) in cheap {
        if both(held) {
            weights[i] = match inline(held, wide) {
                true => w.at(OTHER_FIELDS[i], level(field, compare)),
                false => w.best[i + 2],
            };
        }
    }
    if both(HELD_ID) {
        weights[6] = if !inline(HELD_ID, WIDE_ID) {
            w.best[8]
        } else if a.system == b.system {
            w.at(Field::SharedId, level(|k| k.id.text(), shared_level))
        } else {
            0.0
        };
    }
    for (i, held) in [
        (POSTCODE, HELD_POSTCODE),
        (STREET, HELD_STREET),
        (CITY, HELD_CITY),
    ] {
        if both(held) {
            weights[i] = w.best[i + 2];
        }
    }
    let address: [Compared; 2] = [
        (
            POSTCODE,
            HELD_POSTCODE,
            WIDE_POSTCODE,
            |x, y| edit_level(x, y, Level::Close),
            |k| k.postcode.text(),
        ),
        (STREET, HELD_STREET, WIDE_STREET, street_level, |k| {
            k.street.text()
        }),
    ];
    for (i, held, wide, compare, field) in address {
        if both(held) {
            if capped_total(w, &weights) + 2e-9 < need {
                return false;
            }
            if inline(held, wide) {
                weights[i] = w.at(OTHER_FIELDS[i], level(field, compare));
            }
        }
    }
    capped_total(w, &weights) + 2e-9 >= need
}

/// The levels of the fields other than the names, and their weights' sum with the address cap
/// applied: all of a score but the names.
struct Others {
    levels: [Option<Level>; 7],
    total: f64,
    /// What the address cap takes off (zero or less), included in `total`.
    address_cap: f64,
}

/// The fields `Others` holds, in `score`'s order: all but the two names.
const OTHER_FIELDS: [Field; 7] = [
    Field::BirthDate,
    Field::Gender,
    Field::Postcode,
    Field::Street,
    Field::City,
    Field::Phone,
    Field::SharedId,
];

/// The fields besides the names, or `None` when their weights cannot reach `need`. The cheap
/// fields (dates, gender, phone, national id) are compared first; the address fields — edit
/// distance and Jaro–Winkler — only while, at their best, they could still lift the sum that
/// far: most candidates a blocking key brings are other people, settled by the cheap fields.
fn others(a: &Demographics, b: &Demographics, w: &Weights, need: f64) -> Option<Others> {
    let shared = a.shared_ids.iter().find_map(|(sys, va)| {
        b.shared_ids
            .iter()
            .find(|(s, _)| s == sys)
            .map(|(_, vb)| shared_level(va, vb))
    });
    let mut levels = [
        both(&a.birth_date, &b.birth_date).map(|(x, y)| date_level(x, y)),
        both(&a.gender, &b.gender).map(|(x, y)| gender_level(x, y)),
        None,
        None,
        None,
        both(&a.phone, &b.phone).map(|(x, y)| edit_level(x, y, Level::Close)),
        shared,
    ];
    let mut weights = [0.0; 7];
    for (i, l) in levels.iter().enumerate() {
        weights[i] = l.map_or(0.0, |l| w.at(OTHER_FIELDS[i], l));
    }
    let total = |weights: &[f64; 7]| capped_total(w, weights);
    /// A field's place, both sides' values, and how they compare.
    type Compared<'a> = (usize, Option<(&'a str, &'a str)>, fn(&str, &str) -> Level);
    let address: [Compared; 3] = [
        (POSTCODE, both(&a.postcode, &b.postcode), |x, y| {
            edit_level(x, y, Level::Close)
        }),
        (STREET, both(&a.street, &b.street), street_level),
        (CITY, both(&a.city, &b.city), |x, y| {
            string_level(x, y, false)
        }),
    ];
    // Until compared, an address field held on both sides counts at its best: the sum only
    // grows with each weight (the cap takes back at most what a weight adds), so it bounds the
    // final sum. `FIELDS` is the two names, then `OTHER_FIELDS`.
    for (i, pair, _) in &address {
        if pair.is_some() {
            weights[*i] = w.best[i + 2];
        }
    }
    for (i, pair, compare) in address {
        if let Some((x, y)) = pair {
            if total(&weights) + 1e-9 < need {
                return None;
            }
            let level = compare(x, y);
            levels[i] = Some(level);
            weights[i] = w.at(OTHER_FIELDS[i], level);
        }
    }
    Some(Others {
        levels,
        total: total(&weights),
        address_cap: address_cap(w, &weights),
    })
}

fn finish(a: &Demographics, b: &Demographics, w: &Weights, rest: &Others) -> Score {
    let mut fields = Vec::with_capacity(10);
    let mut levels = Levels::default();
    let mut push = |field: Field, level: Option<Level>| {
        if let Some(level) = level {
            levels.0[field as usize] = Some(level);
            fields.push(FieldScore {
                field: Cow::Borrowed(field.name()),
                level: Cow::Borrowed(level.name()),
                weight: w.at(field, level),
            });
        }
    };

    let mut given = given_level(a, b);
    let mut family = both(&a.family, &b.family).map(|(x, y)| string_level(x, y, true));
    // Given and family names swapped on one side, one of them possibly mistyped: each name is
    // compared with the other side's other name, and counts a level lower than it would in place.
    let unlike = |l: Option<Level>| matches!(l, Some(Level::Disagree | Level::Phonetic));
    if unlike(given) && unlike(family) {
        let crossed = a
            .given
            .as_deref()
            .zip(b.family.as_deref())
            .map(|(x, y)| string_level(x, y, false))
            .zip(
                a.family
                    .as_deref()
                    .zip(b.given.as_deref())
                    .map(|(x, y)| string_level(x, y, false)),
            );
        let lower = |l: Level| match l {
            Level::Exact => Some(Level::Close),
            Level::Close | Level::Similar => Some(Level::Similar),
            _ => None,
        };
        if let Some((g, f)) = crossed {
            if g == Level::Exact || f == Level::Exact {
                if let (Some(g), Some(f)) = (lower(g), lower(f)) {
                    given = Some(g);
                    family = Some(f);
                }
            }
        }
    }
    push(Field::Given, given);
    push(Field::Family, family);
    for (field, level) in OTHER_FIELDS.into_iter().zip(rest.levels) {
        push(field, level);
    }

    // Exact agreement on a common name weighs less (term-frequency adjustment).
    for (field, value) in [(Field::Given, &a.given), (Field::Family, &a.family)] {
        if w.frequencies.is_empty() || levels.get(field) != Some(Level::Exact) {
            continue;
        }
        let field = field.name();
        if let (Some(value), Some(f)) = (value, fields.iter_mut().find(|f| f.field == field)) {
            f.weight = w.exact_weight(field, value);
        }
    }

    // The address cap, as `others` found it.
    if rest.address_cap < 0.0 {
        fields.push(FieldScore {
            field: Cow::Borrowed("address_cap"),
            level: Cow::Borrowed("correlated"),
            weight: rest.address_cap,
        });
    }
    let total = fields.iter().map(|f| f.weight).sum();
    let s = Score {
        total,
        fields,
        hazards: Vec::new(),
    };
    let hazards = hazards(a, b, &levels);
    Score { hazards, ..s }
}

/// Birth years this far apart are another generation (junior/senior, parent/child).
const GENERATION_YEARS: i32 = 12;

/// Whether two national/insurance ids that differ by a typo are numerically adjacent, as the
/// numbers given to twins and triplets registered together often are.
fn consecutive(a: &str, b: &str) -> bool {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.abs_diff(y) <= 5,
        // Not numbers: no numbering to be consecutive in, but do not rely on that either.
        _ => true,
    }
}

/// Each field's level in `FIELDS` order, as `score` compared them (`None`: missing on a side).
/// Looked up by position, not by scanning the breakdown's names: `hazards` asks a dozen times
/// per pair.
#[derive(Default)]
struct Levels([Option<Level>; FIELDS.len()]);

impl Levels {
    fn get(&self, field: Field) -> Option<Level> {
        self.0[field as usize]
    }
}

/// Levels at which two values count as agreeing.
fn agreeing(level: Level) -> bool {
    use Level::*;
    matches!(
        level,
        Exact | Nickname | Close | Similar | Transposed | Typo
    )
}

/// Levels at which a national id counts as corroborating (a two-edit id does not).
fn id_agreeing(level: Level) -> bool {
    matches!(level, Level::Exact | Level::Typo)
}

fn hazards(a: &Demographics, b: &Demographics, levels: &Levels) -> Vec<Hazard> {
    let level = |field: Field| levels.get(field);
    let agrees = |field: Field| level(field).is_some_and(agreeing);
    let shared = level(Field::SharedId);
    // A national id that matches exactly rules out twins and junior/senior. One that matches up
    // to a typo (a digit changed, two swapped) rules out junior/senior, and twins too unless
    // the two numbers are adjacent: twins registered together often get consecutive numbers,
    // but two different people's numbers one typo apart and not adjacent are one person's.
    let id_rules_out_twin = match shared {
        Some(Level::Exact) => true,
        Some(Level::Typo) | Some(Level::Similar) => a.shared_ids.iter().any(|(sys, va)| {
            b.shared_ids
                .iter()
                .any(|(sb, vb)| sb == sys && edits(va, vb) <= 2 && !consecutive(va, vb))
        }),
        _ => false,
    };
    let mut out = Vec::new();
    let names_differ = matches!(
        level(Field::Given),
        Some(Level::Disagree) | Some(Level::Phonetic)
    );
    if names_differ
        && agrees(Field::Family)
        && level(Field::BirthDate) == Some(Level::Exact)
        && !id_rules_out_twin
    {
        out.push(Hazard::Twin);
    }
    let id_agrees = shared.is_some_and(id_agreeing);
    if level(Field::BirthDate) == Some(Level::Disagree) && !id_agrees {
        let year = |d: &Demographics| d.birth_year().and_then(|y| y.parse::<i32>().ok());
        if let (Some(ya), Some(yb)) = (year(a), year(b)) {
            if (ya - yb).abs() >= GENERATION_YEARS {
                out.push(Hazard::Generation);
            }
        }
    }
    if names_differ
        && matches!(
            level(Field::BirthDate),
            Some(Level::Disagree) | Some(Level::Similar)
        )
        && !id_agrees
    {
        out.push(Hazard::Sibling);
    }
    if ![
        Field::Street,
        Field::Postcode,
        Field::Phone,
        Field::SharedId,
    ]
    .into_iter()
    .any(agrees)
    {
        out.push(Hazard::Uncorroborated);
    }
    // Different national ids are only a hazard when the names or birth dates leave room for
    // another person: a different first name, or a birth date that is missing or more than a
    // typo (or swapped day and month) away.
    if shared == Some(Level::Disagree)
        && (names_differ
            || !matches!(
                level(Field::BirthDate),
                Some(Level::Exact) | Some(Level::Typo) | Some(Level::Transposed)
            ))
    {
        out.push(Hazard::SharedIdConflict);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stored breakdown reads back as the JSON of the score, its numbers to four decimals;
    /// one stored as JSON before the compact form reads back unchanged.
    #[test]
    fn a_stored_breakdown_reads_back_as_the_scores_json() {
        let score = Score {
            total: 11.087991864707359,
            fields: vec![
                FieldScore {
                    field: Cow::Borrowed("given"),
                    level: Cow::Borrowed("nickname"),
                    weight: 7.714245517666122,
                },
                FieldScore {
                    field: Cow::Borrowed("birth_date"),
                    level: Cow::Borrowed("disagree"),
                    weight: -4.316580223561777,
                },
                FieldScore {
                    field: Cow::Borrowed("address_cap"),
                    level: Cow::Borrowed("correlated"),
                    weight: -2.0,
                },
            ],
            hazards: vec![Hazard::Generation, Hazard::SharedIdConflict],
        };
        let stored = score.stored();
        assert!(
            stored.len() * 2 < serde_json::to_string(&score).unwrap().len(),
            "{stored}"
        );
        let mut rounded = score.clone();
        rounded.total = 11.088;
        for (f, w) in rounded.fields.iter_mut().zip([7.7142, -4.3166, -2.0]) {
            f.weight = w;
        }
        assert_eq!(
            breakdown_value(&stored),
            serde_json::to_value(&rounded).unwrap()
        );
        let plain = Score {
            total: 0.5,
            fields: Vec::new(),
            hazards: Vec::new(),
        };
        assert_eq!(
            breakdown_value(&plain.stored()),
            serde_json::to_value(&plain).unwrap()
        );
        let json = serde_json::to_string(&score).unwrap();
        assert_eq!(
            breakdown_value(&json),
            serde_json::to_value(&score).unwrap()
        );
        assert_eq!(breakdown_value("{}"), serde_json::json!({}));
        assert_eq!(breakdown_value("S1;x;;"), serde_json::Value::Null);
        for h in [
            Hazard::Twin,
            Hazard::Generation,
            Hazard::Sibling,
            Hazard::Uncorroborated,
            Hazard::SharedIdConflict,
        ] {
            assert_eq!(serde_json::to_value(h).unwrap(), h.name());
        }
    }

    /// The bound never hides a pair that reaches the floor, and what it lets through is scored
    /// as `score` scores it: checked on generated people, their retyped variants (typos, moves,
    /// married names, swapped dates) and look-alikes from the same key buckets.
    #[test]
    fn score_at_least_is_score_above_the_floor() {
        use crate::synth::{to_patient, Generator};
        let shared = vec!["http://hl7.org/fhir/sid/us-ssn".to_string()];
        let mut g = Generator::new(7);
        let mut records = Vec::new();
        for i in 0..400 {
            let p = g.person();
            let v = g.variant(&p);
            for (n, q) in [(0, p), (1, v)] {
                let patient = to_patient(&q, "urn:t", &format!("{i}-{n}"));
                records.push(Demographics::from_patient(&patient, &shared));
            }
        }
        let w = Weights::defaults();
        let tf = Weights::defaults().with_frequencies(
            [(
                "family".to_string(),
                [(
                    records[0].family.clone().unwrap_or_default().into_string(),
                    0.05,
                )]
                .into(),
            )]
            .into(),
        );
        // Some with values too long to sketch inline, or several national ids.
        for (i, d) in records.iter_mut().enumerate() {
            match i % 11 {
                3 => d.street = d.street.as_ref().map(|s| format!("{s} {s} {s}").into()),
                5 => d
                    .shared_ids
                    .push(("urn:oid:2.16.840.1.113883.4.1".into(), "12".into())),
                7 => d.phone = d.phone.as_ref().map(|p| format!("{p}{p}").into()),
                _ => {}
            }
        }
        let sketches: Vec<Sketch> = records.iter().map(Sketch::of).collect();
        let (mut kept, mut pruned, mut sketched) = (0, 0, 0);
        for (i, a) in records.iter().enumerate() {
            // Its own variant, and a spread of others.
            for (j, b) in records
                .iter()
                .enumerate()
                .skip(i / 2 * 2)
                .take(2)
                .chain(records.iter().enumerate().step_by(7))
            {
                for w in [&w, &tf] {
                    let full = score(a, b, w);
                    for floor in [4.0, 11.0, 18.5] {
                        // The sketch rejects only what `score_at_least` rejects.
                        if !may_reach(&sketches[i], &sketches[j], w, floor) {
                            assert!(full.total < floor, "{a:?} {b:?} {full:?}");
                            assert_eq!(score_at_least(a, b, w, floor), None);
                            sketched += 1;
                        }
                        match score_at_least(a, b, w, floor) {
                            Some(s) => {
                                assert_eq!(s, full);
                                assert!(s.total >= floor);
                                kept += 1;
                            }
                            None => {
                                assert!(full.total < floor, "{a:?} {b:?} {full:?}");
                                pruned += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(kept > 1000 && pruned > 1000, "kept {kept}, pruned {pruned}");
        assert!(sketched > pruned / 2, "sketched {sketched} of {pruned}");
    }

    fn person(given: &str, family: &str, dob: &str, street: &str, postcode: &str) -> Demographics {
        Demographics {
            given: Some(given.into()),
            family: Some(family.into()),
            birth_date: Some(dob.into()),
            street: Some(street.into()),
            postcode: Some(postcode.into()),
            ..Demographics::default()
        }
    }

    #[test]
    fn embedded_weights_parse() {
        let w = Weights::parse(DEFAULT_WEIGHTS).expect("weights");
        assert!(w.weight("birth_date", "exact") > 10.0);
        assert!(w.weight("given", "disagree") < -4.0);
    }

    #[test]
    fn weights_by_position_are_the_weights_by_name() {
        let w = Weights::defaults();
        assert_eq!(FIELDS.map(field_index), core::array::from_fn(Some));
        assert_eq!(LEVELS.map(level_index), core::array::from_fn(Some));
        for (field, levels) in &w.logs {
            for (level, weight) in levels {
                assert_eq!(w.weight(field, level), *weight, "{field}.{level}");
            }
        }
        assert_eq!(w.weight("given", "no-such-level"), 0.0);
    }

    #[test]
    fn string_metrics_keep_their_textbook_values() {
        // Winkler's examples, and the same values whether compared by byte or by character.
        assert!((jaro_winkler("martha", "marhta") - 0.9611).abs() < 1e-4);
        assert!((jaro_winkler("dwayne", "duane") - 0.84).abs() < 1e-4);
        assert!((jaro_winkler("dixon", "dicksonx") - 0.8133).abs() < 1e-4);
        assert_eq!(jaro_winkler("", ""), 1.0);
        assert_eq!(
            jaro_winkler("müller", "muller"),
            jw::similarity("müller".chars(), "muller".chars())
        );
        assert_eq!(osa_distance("ca", "abc"), 3);
        assert_eq!(osa_distance("abcd", "acbd"), 1);
        assert_eq!(osa_distance("zoë", "zoe"), 1);
    }

    #[test]
    fn edits_are_counted_up_to_three() {
        assert_eq!(edits("123456789", "123456789"), 0);
        assert_eq!(edits("123456789", "123456798"), 1);
        assert_eq!(edits("abc", "abd"), 1);
        assert_eq!(edits("123456789", "234567891"), 2);
        assert_eq!(edits("12345", "67890"), 3);
        assert_eq!(edits("1", "12345"), 3);
    }

    #[test]
    fn a_sketch_is_two_cache_lines() {
        assert_eq!(std::mem::size_of::<Sketch>(), 128);
        assert_eq!(std::mem::align_of::<Sketch>(), 64);
    }

    #[test]
    fn edits_agree_with_the_full_distance() {
        // Pairs of short strings over a small alphabet (repeats, shifts, swaps): the bound
        // must never hide a distance of 2 or less.
        let words: Vec<String> = (0u32..400)
            .map(|n| {
                let len = 3 + (n % 5) as usize;
                (0..len)
                    .map(|i| char::from(b'0' + ((n / 7 + i as u32 * (n % 3 + 1)) % 4) as u8))
                    .collect()
            })
            .collect();
        for a in &words {
            for b in &words {
                assert_eq!(edits(a, b), osa_distance(a, b).min(3), "{a} / {b}");
            }
        }
    }

    #[test]
    fn fields_and_levels_name_their_places() {
        use Field::*;
        let fields = [
            Given, Family, BirthDate, Gender, Postcode, Street, City, Phone, SharedId,
        ];
        assert_eq!(fields.len(), FIELDS.len());
        for f in fields {
            assert_eq!(field_index(f.name()), Some(f as usize));
        }
        use Level::*;
        let levels = [
            Exact, Nickname, Close, Similar, Phonetic, Transposed, Typo, Agree, Disagree,
        ];
        assert_eq!(levels.len(), LEVELS.len());
        for l in levels {
            assert_eq!(level_index(l.name()), Some(l as usize));
        }
    }

    #[test]
    fn date_levels() {
        assert_eq!(date_level("1980-02-03", "1980-02-03").name(), "exact");
        assert_eq!(date_level("1980-02-03", "1980-03-02").name(), "transposed");
        assert_eq!(date_level("1980-02-03", "1980-02-08").name(), "typo");
        assert_eq!(date_level("1939-11-23", "1939-12-13").name(), "typo");
        assert_eq!(date_level("1980-02-03", "1955-07-21").name(), "disagree");
    }

    #[test]
    fn twins_are_a_hazard() {
        let w = Weights::defaults();
        let a = person("alice", "smith", "2001-05-05", "4 main street", "12345");
        let b = person("emily", "smith", "2001-05-05", "4 main street", "12345");
        assert!(score(&a, &b, &w).hazards.contains(&Hazard::Twin));
    }

    #[test]
    fn a_national_id_one_typo_apart_rules_out_twins_unless_adjacent() {
        let w = Weights::defaults();
        let ssn = Text::from("http://hl7.org/fhir/sid/us-ssn");
        let mut a = person("alice", "smith", "2001-05-05", "4 main street", "12345");
        let mut b = person("emily", "smith", "2001-05-05", "4 main street", "12345");
        a.shared_ids = vec![(ssn.clone(), "123456789".into())];
        // Consecutive numbers, as twins registered together get: still twins.
        b.shared_ids = vec![(ssn.clone(), "123456790".into())];
        assert!(score(&a, &b, &w).hazards.contains(&Hazard::Twin));
        // Two digits swapped in the middle: one person whose first name was mistyped.
        b.shared_ids = vec![(ssn.clone(), "124356789".into())];
        assert!(!score(&a, &b, &w).hazards.contains(&Hazard::Twin));
        // Unrelated numbers: twins.
        b.shared_ids = vec![(ssn, "987654321".into())];
        assert!(score(&a, &b, &w).hazards.contains(&Hazard::Twin));
    }

    #[test]
    fn swapped_and_mistyped_names_still_agree() {
        let w = Weights::defaults();
        let a = person(
            "robin",
            "morrison",
            "1925-01-24",
            "14 markham street",
            "6169",
        );
        let b = person(
            "morrion",
            "robin",
            "1925-01-24",
            "14 markham street",
            "6168",
        );
        let s = score(&a, &b, &w);
        assert_eq!(s.level("given"), Some("close"), "{s:?}");
        assert_eq!(s.level("family"), Some("similar"), "{s:?}");
        assert!(s.hazards.is_empty() && s.total > 22.0, "{s:?}");
        // Both blocking on birth date and initials, whatever their order.
        let shared = a
            .blocking_keys()
            .into_iter()
            .filter(|k| b.blocking_keys().contains(k))
            .count();
        assert!(shared > 0);
        // One name in the other's place, the other unrelated: no agreement is made up.
        let c = person(
            "morrison",
            "alfred",
            "1925-01-24",
            "14 markham street",
            "6169",
        );
        assert_eq!(score(&a, &c, &w).level("given"), Some("disagree"));
    }

    #[test]
    fn common_names_weigh_less_when_they_agree() {
        let text = format!(
            "{DEFAULT_WEIGHTS}\n[term_frequency.family]\n\"smith\" = 0.012\n\"rare\" = 0.0000001\n"
        );
        let w = Weights::parse(&text).expect("weights with frequencies");
        let plain = Weights::defaults();
        assert!(w.exact_weight("family", "smith") < plain.weight("family", "exact") - 2.0);
        // Rare or unlisted names weigh what any exact agreement does, never more.
        assert_eq!(
            w.exact_weight("family", "rare"),
            plain.weight("family", "exact")
        );
        assert_eq!(
            w.exact_weight("family", "okafor"),
            plain.weight("family", "exact")
        );
        let a = person("john", "smith", "1970-01-02", "12 oak road", "99501");
        let b = person("john", "smith", "1970-01-02", "12 oak road", "99501");
        assert!(score(&a, &b, &w).total < score(&a, &b, &plain).total);
        // What `hie mpi estimate` prints parses back to the same weights.
        let again = Weights::parse(&w.to_toml()).expect("round trip");
        assert!(
            (again.exact_weight("family", "smith") - w.exact_weight("family", "smith")).abs()
                < 1e-6
        );
        assert!(Weights::parse(&format!(
            "{DEFAULT_WEIGHTS}\n[term_frequency.family]\nx = 2.0\n"
        ))
        .is_err());
    }

    #[test]
    fn a_year_a_generation_apart_is_no_typo() {
        assert_eq!(date_level("1950-05-05", "1980-05-05").name(), "disagree");
        assert_eq!(date_level("1950-05-05", "1951-05-05").name(), "typo");
        let w = Weights::defaults();
        let a = person("john", "smith", "1950-05-05", "4 main street", "12345");
        let b = person("john", "smith", "1980-05-05", "4 main street", "12345");
        let s = score(&a, &b, &w);
        assert!(s.hazards.contains(&Hazard::Generation), "{s:?}");
    }

    #[test]
    fn junior_and_senior_are_a_hazard() {
        let w = Weights::defaults();
        let a = person("john", "smith", "1950-05-05", "4 main street", "12345");
        let b = person("john", "smith", "1978-09-12", "4 main street", "12345");
        assert!(score(&a, &b, &w).hazards.contains(&Hazard::Generation));
    }

    #[test]
    fn nickname_and_typo_still_score_high() {
        let w = Weights::defaults();
        let a = person("william", "johnson", "1970-01-02", "12 oak road", "99501");
        let b = person("bill", "jonson", "1970-02-01", "12 oak road", "99501");
        let s = score(&a, &b, &w);
        assert!(s.hazards.is_empty(), "{s:?}");
        assert!(s.total > 25.0, "{s:?}");
    }
}

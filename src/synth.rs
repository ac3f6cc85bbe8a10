//! Seeded synthetic patients for benchmarks, demos and tests: realistic names, addresses,
//! national ids, and duplicates with the errors real registration desks make (typos,
//! nicknames, swapped day/month, moves, married names, missing fields). Never real people.

use fastrand::Rng;
use serde_json::{json, Value};

const GIVEN_F: &[&str] = &[
    "mary",
    "patricia",
    "jennifer",
    "linda",
    "elizabeth",
    "barbara",
    "susan",
    "jessica",
    "sarah",
    "karen",
    "lisa",
    "nancy",
    "betty",
    "margaret",
    "sandra",
    "ashley",
    "kimberly",
    "emily",
    "donna",
    "michelle",
    "carol",
    "amanda",
    "melissa",
    "deborah",
    "stephanie",
    "rebecca",
    "sharon",
    "laura",
    "cynthia",
    "kathleen",
    "amy",
    "angela",
    "shirley",
    "anna",
    "brenda",
    "pamela",
    "emma",
    "nicole",
    "helen",
    "samantha",
    "katherine",
    "christine",
    "debra",
    "rachel",
    "carolyn",
    "janet",
    "catherine",
    "maria",
    "heather",
    "diane",
    "olivia",
    "julie",
    "joyce",
    "victoria",
    "ruth",
    "virginia",
    "lauren",
    "kelly",
    "christina",
    "joan",
    "evelyn",
    "judith",
    "megan",
    "andrea",
    "cheryl",
    "hannah",
    "jacqueline",
    "martha",
    "gloria",
    "teresa",
    "ann",
    "sara",
    "madison",
    "frances",
    "kathryn",
    "janice",
    "jean",
    "abigail",
    "alice",
    "judy",
    "sophia",
    "grace",
    "denise",
    "amber",
    "doris",
    "marilyn",
    "danielle",
    "beverly",
    "isabella",
    "theresa",
    "diana",
    "natalie",
    "brittany",
    "charlotte",
    "marie",
    "kayla",
    "alexis",
    "lori",
    "aisha",
    "fatima",
    "mei",
    "yuki",
    "priya",
    "ana",
    "lucia",
    "ingrid",
    "chloe",
    "zoe",
    "leila",
    "nadia",
    "ines",
    "sofia",
];
const GIVEN_M: &[&str] = &[
    "james",
    "robert",
    "john",
    "michael",
    "david",
    "william",
    "richard",
    "joseph",
    "thomas",
    "christopher",
    "charles",
    "daniel",
    "matthew",
    "anthony",
    "mark",
    "donald",
    "steven",
    "paul",
    "andrew",
    "joshua",
    "kenneth",
    "kevin",
    "brian",
    "george",
    "timothy",
    "ronald",
    "edward",
    "jason",
    "jeffrey",
    "ryan",
    "jacob",
    "gary",
    "nicholas",
    "eric",
    "jonathan",
    "stephen",
    "larry",
    "justin",
    "scott",
    "brandon",
    "benjamin",
    "samuel",
    "gregory",
    "alexander",
    "frank",
    "patrick",
    "raymond",
    "jack",
    "dennis",
    "jerry",
    "tyler",
    "aaron",
    "jose",
    "adam",
    "nathan",
    "henry",
    "douglas",
    "zachary",
    "peter",
    "kyle",
    "ethan",
    "walter",
    "noah",
    "jeremy",
    "christian",
    "keith",
    "roger",
    "terry",
    "gerald",
    "harold",
    "sean",
    "austin",
    "carl",
    "arthur",
    "lawrence",
    "dylan",
    "jesse",
    "jordan",
    "bryan",
    "billy",
    "joe",
    "bruce",
    "gabriel",
    "logan",
    "albert",
    "willie",
    "alan",
    "juan",
    "wayne",
    "elijah",
    "randy",
    "roy",
    "vincent",
    "ralph",
    "eugene",
    "russell",
    "bobby",
    "mason",
    "philip",
    "louis",
    "omar",
    "ahmed",
    "wei",
    "hiroshi",
    "raj",
    "diego",
    "lars",
    "mateo",
    "luca",
    "tariq",
    "kwame",
    "ivan",
];
const FAMILY: &[&str] = &[
    "smith",
    "johnson",
    "williams",
    "brown",
    "jones",
    "garcia",
    "miller",
    "davis",
    "rodriguez",
    "martinez",
    "hernandez",
    "lopez",
    "gonzalez",
    "wilson",
    "anderson",
    "thomas",
    "taylor",
    "moore",
    "jackson",
    "martin",
    "lee",
    "perez",
    "thompson",
    "white",
    "harris",
    "sanchez",
    "clark",
    "ramirez",
    "lewis",
    "robinson",
    "walker",
    "young",
    "allen",
    "king",
    "wright",
    "scott",
    "torres",
    "nguyen",
    "hill",
    "flores",
    "green",
    "adams",
    "nelson",
    "baker",
    "hall",
    "rivera",
    "campbell",
    "mitchell",
    "carter",
    "roberts",
    "gomez",
    "phillips",
    "evans",
    "turner",
    "diaz",
    "parker",
    "cruz",
    "edwards",
    "collins",
    "reyes",
    "stewart",
    "morris",
    "morales",
    "murphy",
    "cook",
    "rogers",
    "gutierrez",
    "ortiz",
    "morgan",
    "cooper",
    "peterson",
    "bailey",
    "reed",
    "kelly",
    "howard",
    "ramos",
    "kim",
    "cox",
    "ward",
    "richardson",
    "watson",
    "brooks",
    "chavez",
    "wood",
    "james",
    "bennett",
    "gray",
    "mendoza",
    "ruiz",
    "hughes",
    "price",
    "alvarez",
    "castillo",
    "sanders",
    "patel",
    "myers",
    "long",
    "ross",
    "foster",
    "jimenez",
    "powell",
    "jenkins",
    "perry",
    "russell",
    "sullivan",
    "bell",
    "coleman",
    "butler",
    "henderson",
    "barnes",
    "gonzales",
    "fisher",
    "vasquez",
    "simmons",
    "romero",
    "jordan",
    "patterson",
    "alexander",
    "hamilton",
    "graham",
    "reynolds",
    "griffin",
    "wallace",
    "moreno",
    "west",
    "cole",
    "hayes",
    "bryant",
    "herrera",
    "gibson",
    "ellis",
    "tran",
    "medina",
    "aguilar",
    "stevens",
    "murray",
    "ford",
    "castro",
    "marshall",
    "owens",
    "harrison",
    "fernandez",
    "mcdonald",
    "woods",
    "washington",
    "kennedy",
    "wells",
    "vargas",
    "henry",
    "chen",
    "freeman",
    "webb",
    "tucker",
    "guzman",
    "burns",
    "crawford",
    "olson",
    "simpson",
    "porter",
    "hunter",
    "gordon",
    "mendez",
    "silva",
    "shaw",
    "snyder",
    "mason",
    "dixon",
    "munoz",
    "hunt",
    "hicks",
    "holmes",
    "palmer",
    "wagner",
    "black",
    "robertson",
    "boyd",
    "rose",
    "stone",
    "salazar",
    "fox",
    "warren",
    "mills",
    "meyer",
    "rice",
    "schmidt",
    "garza",
    "daniels",
    "ferguson",
    "nichols",
    "stephens",
    "soto",
    "weaver",
    "ryan",
    "gardner",
    "payne",
    "grant",
    "dunn",
    "kelley",
    "spencer",
    "hawkins",
    "arnold",
    "pierce",
    "vazquez",
    "hansen",
    "peters",
    "santos",
    "hart",
    "bradley",
    "knight",
    "elliott",
    "cunningham",
    "duncan",
    "armstrong",
    "hudson",
    "carroll",
    "lane",
    "riley",
    "andrews",
    "alvarado",
    "ray",
    "delgado",
    "berry",
    "perkins",
    "hoffman",
    "johnston",
    "matthews",
    "pena",
    "richards",
    "contreras",
    "willis",
    "carpenter",
    "lawrence",
    "sandoval",
    "okafor",
    "haddad",
    "kowalski",
    "novak",
    "yamamoto",
    "singh",
    "ivanov",
    "rossi",
    "muller",
];
const STREETS: &[&str] = &[
    "main",
    "oak",
    "pine",
    "maple",
    "cedar",
    "elm",
    "washington",
    "lake",
    "hill",
    "park",
    "view",
    "sunset",
    "river",
    "church",
    "mill",
    "spring",
    "ridge",
    "meadow",
    "forest",
    "highland",
    "jackson",
    "franklin",
    "lincoln",
    "madison",
    "chestnut",
    "walnut",
    "willow",
    "birch",
    "cherry",
    "dogwood",
    "harbor",
    "bay",
    "summit",
    "valley",
    "orchard",
    "railroad",
    "college",
    "center",
    "north",
    "south",
    "east",
    "west",
    "prospect",
    "union",
    "liberty",
    "bridge",
];
const STREET_KIND: &[&str] = &[
    "street",
    "avenue",
    "road",
    "drive",
    "lane",
    "court",
    "place",
    "boulevard",
    "way",
];
const CITIES: &[&str] = &[
    "springfield",
    "riverton",
    "fairview",
    "franklin",
    "greenville",
    "bristol",
    "clinton",
    "salem",
    "madison",
    "georgetown",
    "arlington",
    "ashland",
    "burlington",
    "manchester",
    "milton",
    "newport",
    "oxford",
    "kingston",
    "dover",
    "hudson",
    "marion",
    "jackson",
    "lebanon",
    "auburn",
    "dayton",
    "lexington",
    "chester",
    "winchester",
];
pub const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";

/// One synthetic person (the truth behind the records members hold).
#[derive(Debug, Clone)]
pub struct Person {
    pub id: u64,
    pub given: String,
    pub family: String,
    pub gender: &'static str,
    pub birth_date: String,
    pub street: String,
    pub city: String,
    pub postcode: String,
    pub phone: String,
    pub ssn: String,
}

pub struct Generator {
    rng: Rng,
    next: u64,
}

fn pick<'a>(rng: &mut Rng, list: &'a [&'a str]) -> &'a str {
    list[rng.usize(..list.len())]
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        Generator {
            rng: Rng::with_seed(seed),
            next: 0,
        }
    }

    pub fn person(&mut self) -> Person {
        let r = &mut self.rng;
        let female = r.bool();
        let year = 1930 + r.u32(..94);
        let (month, day) = (1 + r.u32(..12), 1 + r.u32(..28));
        self.next += 1;
        Person {
            id: self.next,
            given: pick(r, if female { GIVEN_F } else { GIVEN_M }).to_string(),
            family: pick(r, FAMILY).to_string(),
            gender: if female { "female" } else { "male" },
            birth_date: format!("{year:04}-{month:02}-{day:02}"),
            street: format!(
                "{} {} {}",
                1 + r.u32(..9999),
                pick(r, STREETS),
                pick(r, STREET_KIND)
            ),
            city: pick(r, CITIES).to_string(),
            postcode: format!("{:05}", 10000 + r.u32(..89999)),
            phone: format!("555{:07}", r.u32(..10_000_000)),
            ssn: format!(
                "{:03}{:02}{:04}",
                100 + r.u32(..800),
                1 + r.u32(..99),
                1 + r.u32(..9999)
            ),
        }
    }

    fn typo(&mut self, s: &str) -> String {
        let mut chars: Vec<char> = s.chars().collect();
        if chars.len() < 3 {
            return s.to_string();
        }
        let i = 1 + self.rng.usize(..chars.len() - 1);
        match self.rng.u8(..3) {
            0 => {
                chars.remove(i);
            }
            1 => chars.swap(i - 1, i),
            _ => chars[i] = (b'a' + self.rng.u8(..26)) as char,
        }
        chars.into_iter().collect()
    }

    /// A copy of `p` as another registration desk might have typed it.
    pub fn variant(&mut self, p: &Person) -> Person {
        let mut v = p.clone();
        for _ in 0..1 + self.rng.usize(..2) {
            match self.rng.u8(..8) {
                0 => v.given = self.typo(&v.given),
                1 => v.family = self.typo(&v.family),
                2 => {
                    let (y, m, d) = (&p.birth_date[..4], &p.birth_date[5..7], &p.birth_date[8..]);
                    if d.parse::<u32>().unwrap_or(99) <= 12 {
                        v.birth_date = format!("{y}-{d}-{m}");
                    }
                }
                3 => {
                    v.street = format!(
                        "{} {} {}",
                        1 + self.rng.u32(..9999),
                        pick(&mut self.rng, STREETS),
                        pick(&mut self.rng, STREET_KIND)
                    )
                }
                4 => v.phone = String::new(),
                5 => v.ssn = self.typo(&v.ssn),
                6 if p.gender == "female" => v.family = pick(&mut self.rng, FAMILY).to_string(),
                _ => v.postcode = self.typo(&v.postcode),
            }
        }
        v
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// A FHIR Patient for `p` as held by a member under `system|mrn`.
pub fn to_patient(p: &Person, system: &str, mrn: &str) -> Value {
    let mut ids = vec![json!({ "system": system, "value": mrn })];
    if !p.ssn.is_empty() {
        ids.push(json!({ "system": SSN_SYSTEM, "value": p.ssn }));
    }
    let mut r = json!({
        "resourceType": "Patient",
        "identifier": ids,
        "name": [{ "use": "official", "family": capitalise(&p.family), "given": [capitalise(&p.given)] }],
        "gender": p.gender,
        "birthDate": p.birth_date,
        "address": [{ "use": "home", "line": [capitalise(&p.street)], "city": capitalise(&p.city), "postalCode": p.postcode }]
    });
    if !p.phone.is_empty() {
        r["telecom"] = json!([{ "system": "phone", "value": p.phone }]);
    }
    r
}

/// What kind of records a simulated member keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Encounters, conditions, allergies, medications, immunizations.
    Hospital,
    /// Laboratory results.
    Lab,
    /// Emergency encounters and vital signs.
    Emergency,
}

const CONDITIONS: [(&str, &str); 5] = [
    ("44054006", "Diabetes mellitus type 2"),
    ("38341003", "Hypertensive disorder"),
    ("195967001", "Asthma"),
    ("13645005", "Chronic obstructive lung disease"),
    ("35489007", "Depressive disorder"),
];
const ALLERGIES: [(&str, &str); 3] = [
    ("91936005", "Allergy to penicillin"),
    ("91935009", "Allergy to peanuts"),
    ("294505008", "Allergy to amoxicillin"),
];
const MEDICATIONS: [(&str, &str); 4] = [
    ("860975", "metformin 500 MG Oral Tablet"),
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("895994", "albuterol 0.09 MG/ACTUAT Inhaler"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
];
const LABS: [(&str, &str, &str, f64, f64); 4] = [
    (
        "2345-7",
        "Glucose [Mass/volume] in Serum or Plasma",
        "mg/dL",
        70.0,
        180.0,
    ),
    (
        "718-7",
        "Hemoglobin [Mass/volume] in Blood",
        "g/dL",
        10.0,
        17.0,
    ),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.6,
        1.6,
    ),
    (
        "4548-4",
        "Hemoglobin A1c/Hemoglobin.total in Blood",
        "%",
        4.8,
        9.5,
    ),
];

impl Generator {
    /// Synthetic clinical records a member of `kind` holds about its patient `system|mrn`:
    /// valid FHIR R4 resources whose `subject`/`patient` carries that identifier.
    pub fn records(
        &mut self,
        kind: RecordKind,
        system: &str,
        mrn: &str,
        prefix: &str,
    ) -> Vec<Value> {
        let subject = json!({ "reference": format!("Patient/{mrn}"), "identifier": { "system": system, "value": mrn } });
        let mut out = Vec::new();
        let mut n = 0;
        let id = |n: &mut u32| {
            *n += 1;
            format!("{prefix}-{mrn}-{n}")
        };
        let r = &mut self.rng;
        let day = |r: &mut Rng| {
            format!(
                "2026-{:02}-{:02}T{:02}:{:02}:00Z",
                1 + r.u32(..10),
                1 + r.u32(..28),
                7 + r.u32(..12),
                r.u32(..60)
            )
        };
        let coded = |system: &str, code: &str, display: &str| json!({ "coding": [{ "system": system, "code": code, "display": display }], "text": display });
        let snomed = "http://snomed.info/sct";
        match kind {
            RecordKind::Hospital => {
                let when = day(r);
                out.push(json!({ "resourceType": "Encounter", "id": id(&mut n), "status": "finished",
                    "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP", "display": "inpatient encounter" },
                    "subject": subject, "period": { "start": when, "end": when } }));
                let (code, text) = CONDITIONS[r.usize(..CONDITIONS.len())];
                out.push(json!({ "resourceType": "Condition", "id": id(&mut n),
                    "clinicalStatus": coded("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
                    "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed"),
                    "code": coded(snomed, code, text), "subject": subject, "recordedDate": day(r) }));
                if r.u8(..3) > 0 {
                    let (code, text) = ALLERGIES[r.usize(..ALLERGIES.len())];
                    out.push(json!({ "resourceType": "AllergyIntolerance", "id": id(&mut n),
                        "clinicalStatus": coded("http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "active", "Active"),
                        "verificationStatus": coded("http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "confirmed", "Confirmed"),
                        "criticality": "high", "code": coded(snomed, code, text), "patient": subject, "recordedDate": day(r) }));
                }
                let (code, text) = MEDICATIONS[r.usize(..MEDICATIONS.len())];
                out.push(json!({ "resourceType": "MedicationStatement", "id": id(&mut n), "status": "active",
                    "medicationCodeableConcept": coded("http://www.nlm.nih.gov/research/umls/rxnorm", code, text),
                    "subject": subject, "effectiveDateTime": day(r) }));
                out.push(json!({ "resourceType": "Immunization", "id": id(&mut n), "status": "completed",
                    "vaccineCode": coded("http://hl7.org/fhir/sid/cvx", "140", "Influenza, seasonal, injectable, preservative free"),
                    "patient": subject, "occurrenceDateTime": day(r) }));
            }
            RecordKind::Lab => {
                for _ in 0..2 + r.usize(..3) {
                    let (code, text, unit, lo, hi) = LABS[r.usize(..LABS.len())];
                    let value = ((lo + (hi - lo) * r.f64()) * 10.0).round() / 10.0;
                    out.push(json!({ "resourceType": "Observation", "id": id(&mut n), "status": "final",
                        "category": [coded("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")],
                        "code": coded("http://loinc.org", code, text), "subject": subject, "effectiveDateTime": day(r),
                        "valueQuantity": { "value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit } }));
                }
            }
            RecordKind::Emergency => {
                let when = day(r);
                out.push(json!({ "resourceType": "Encounter", "id": id(&mut n), "status": "finished",
                    "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER", "display": "emergency" },
                    "subject": subject, "period": { "start": when, "end": when } }));
                out.push(json!({ "resourceType": "Observation", "id": id(&mut n), "status": "final",
                    "category": [coded("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs", "Vital Signs")],
                    "code": coded("http://loinc.org", "8867-4", "Heart rate"), "subject": subject, "effectiveDateTime": when,
                    "valueQuantity": { "value": 60 + r.u32(..60), "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" } }));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_seeded() {
        let a: Vec<String> = (0..5).map(|_| Generator::new(7).person().family).collect();
        let b: Vec<String> = (0..5).map(|_| Generator::new(7).person().family).collect();
        assert_eq!(a, b);
        let mut g = Generator::new(1);
        let p = g.person();
        let v = g.variant(&p);
        assert_eq!(v.id, p.id);
        assert_eq!(to_patient(&p, "urn:x", "1")["resourceType"], "Patient");
    }
}

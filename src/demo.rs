//! `hie demo`: the broker and three simulated members (a hospital, a lab, an emergency
//! department) as separate processes with their own certificates, synthetic patients with the
//! typos registration desks make, documents, and a walk through a whole exchange.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::audit::Actor;
use crate::certs::{Authority, CertInfo, Validity};
use crate::config::DatabaseConfig;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::ids::OrgId;
use crate::orgs::{NewOrganization, OrgType};
use crate::synth::{to_patient, Generator, Person, RecordKind};

const PEOPLE: usize = 40;

struct Member {
    id: &'static str,
    name: &'static str,
    kind: OrgType,
    system: &'static str,
    records: Option<RecordKind>,
}

const MEMBERS: [Member; 4] = [
    Member {
        id: "general-hospital",
        name: "General Hospital",
        kind: OrgType::Hospital,
        system: "urn:oid:2.16.840.1.113883.3.9999.1",
        records: Some(RecordKind::Hospital),
    },
    Member {
        id: "city-lab",
        name: "City Laboratory",
        kind: OrgType::Lab,
        system: "urn:oid:2.16.840.1.113883.3.9999.2",
        records: Some(RecordKind::Lab),
    },
    Member {
        id: "county-er",
        name: "County Emergency Department",
        kind: OrgType::Emergency,
        system: "urn:oid:2.16.840.1.113883.3.9999.3",
        records: Some(RecordKind::Emergency),
    },
    Member {
        id: "exchange-ops",
        name: "Exchange Operations",
        kind: OrgType::Operator,
        system: "",
        records: None,
    },
];

/// Children killed when the demo ends, however it ends.
struct Processes(Vec<(String, Child)>);

impl Processes {
    fn kill(&mut self, name: &str) {
        if let Some((_, c)) = self.0.iter_mut().find(|(n, _)| n == name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `hie ARGS` and waits for a stdout line containing `marker`; returns the text after it.
fn spawn(config: &Path, args: &[&str], marker: &str, log: &Path) -> Result<(Child, String)> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::config(format!("cannot find the hie binary: {e}")))?;
    let stderr = std::fs::File::create(log)
        .map_err(|e| Error::config(format!("cannot write {}: {e}", log.display())))?;
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Error::config(format!("cannot start hie {}: {e}", args.join(" "))))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| Error::internal("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if !sent {
                if let Some(rest) = line.split(marker.as_str()).nth(1) {
                    let _ = tx.send(
                        rest.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(found) => Ok((child, found)),
        Err(_) => {
            let _ = child.kill();
            Err(Error::config(format!(
                "hie {} did not start; see {}",
                args.join(" "),
                log.display()
            )))
        }
    }
}

fn client(certs: &Path, org: &str) -> Result<reqwest::Client> {
    let dir = certs.join("orgs").join(org);
    let tls = crate::tls::client_config(
        &certs.join(crate::certs::CA_CERT),
        Some((&dir.join("client.crt"), &dir.join("client.key"))),
    )?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| Error::config(format!("client: {e}")))
}

struct Walk {
    base: String,
    failures: usize,
    step: usize,
}

impl Walk {
    fn step(&mut self, title: &str) {
        self.step += 1;
        println!("\n== {}. {title}", self.step);
    }

    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            println!("   ✓ {what}");
        } else {
            self.failures += 1;
            println!("   ✗ {what}");
        }
    }

    async fn call(
        &self,
        c: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
        purpose: &str,
        body: Option<&Value>,
        extra: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut r = c
            .request(method, format!("{}/{path}", self.base))
            .header("X-Purpose-Of-Use", purpose)
            .header("X-User-Id", "demo-user");
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r
                .header("Content-Type", "application/fhir+json")
                .body(b.to_string());
        }
        match r.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({ "error": crate::outbound::describe(&e) })),
        }
    }
}

impl Walk {
    async fn get(&self, c: &reqwest::Client, path: &str, purpose: &str) -> (u16, Value) {
        self.call(c, reqwest::Method::GET, path, purpose, None, &[])
            .await
    }
}

fn entries<'a>(b: &'a Value, mode: &str) -> Vec<&'a Value> {
    b["entry"]
        .as_array()
        .map(|e| e.iter().filter(|x| x["search"]["mode"] == mode).collect())
        .unwrap_or_default()
}

fn cap(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn name_of(p: &Person) -> String {
    format!("{} {}", cap(&p.given), cap(&p.family))
}

/// A text document in a member's repository and its ITI-65 submission.
fn document(
    dir: &Path,
    base: &str,
    member: &Member,
    mrn: &str,
    name: &str,
    text: &str,
    category: (&str, &str),
) -> Result<Value> {
    std::fs::write(dir.join("documents").join(name), text)
        .map_err(|e| Error::config(format!("write document: {e}")))?;
    let spec = crate::member::DocumentSpec {
        file: name.into(),
        patient: mrn.into(),
        code: category.0.into(),
        display: category.1.into(),
        content_type: "text/plain".into(),
    };
    Ok(crate::member::submission(
        member.id,
        base,
        member.system,
        &spec,
        text.as_bytes(),
    ))
}

/// Runs the demo. With `once`, exits after the walk-through (status 1 if any step failed).
pub async fn run(dir: PathBuf, once: bool) -> Result<bool> {
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| Error::config(format!("cannot clear {}: {e}", dir.display())))?;
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::config(format!("cannot create {}: {e}", dir.display())))?;
    let certs = dir.join("certs");
    let db_path = dir.join("hie.db");
    let config = dir.join("hie.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n[certs]\ndir = \"{}\"\n[log]\nfilter = \"warn\"\n",
            db_path.display(),
            certs.display()
        ),
    )
    .map_err(|e| Error::config(format!("cannot write {}: {e}", config.display())))?;
    println!(
        "hie demo: a regional exchange in {} (synthetic data only)",
        dir.display()
    );
    Authority::init(
        &certs,
        "Demo Health Information Exchange",
        &["localhost".into(), "127.0.0.1".into()],
        false,
    )?;
    let ca = Authority::load(&certs)?;
    let mut procs = Processes(Vec::new());

    // Members' data: everyone at the hospital; the lab and the ER hold some of them, typed again
    // at their own desks (typos, transposed dates, nicknames...).
    let mut g = Generator::new(20261124);
    let people: Vec<Person> = (0..PEOPLE).map(|_| g.person()).collect();
    let mut bases = Vec::new();
    for (i, m) in MEMBERS.iter().enumerate() {
        let org = OrgId::parse(m.id)?;
        let server_names = if m.records.is_some() {
            vec!["localhost".to_string()]
        } else {
            Vec::new()
        };
        ca.issue_member(&org, Validity::days(30), &server_names, "")?;
        let Some(kind) = m.records else {
            bases.push(None);
            continue;
        };
        let data = dir.join("members").join(m.id);
        std::fs::create_dir_all(data.join("documents"))
            .map_err(|e| Error::config(format!("{e}")))?;
        let mut patients = String::new();
        let mut resources = String::new();
        for (k, p) in people.iter().enumerate() {
            let held = match i {
                0 => true,
                1 => k % 2 == 0,
                _ => k % 4 == 0,
            };
            if !held {
                continue;
            }
            let mrn = format!("{}{:05}", ["H", "L", "E"][i], 1000 + k);
            let record = if i == 0 { p.clone() } else { g.variant(p) };
            patients.push_str(&(to_patient(&record, m.system, &mrn).to_string() + "\n"));
            for r in g.records(kind, m.system, &mrn, &m.id[..3]) {
                resources.push_str(&(r.to_string() + "\n"));
            }
        }
        std::fs::write(data.join("patients.ndjson"), patients)
            .map_err(|e| Error::config(format!("{e}")))?;
        std::fs::write(data.join("resources.ndjson"), resources)
            .map_err(|e| Error::config(format!("{e}")))?;
        let (child, addr) = spawn(
            &config,
            &[
                "member-sim",
                "--org",
                m.id,
                "--data",
                &data.to_string_lossy(),
            ],
            "listening on https://",
            &dir.join(format!("{}.log", m.id)),
        )?;
        procs.0.push((m.id.to_string(), child));
        let port = addr
            .split('/')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .unwrap_or_default()
            .to_string();
        let base = format!("https://localhost:{port}/fhir");
        println!(
            "   member {:<18} {} (member-sim, pid {})",
            m.id,
            base,
            procs.0.last().map(|c| c.1.id()).unwrap_or(0)
        );
        bases.push(Some(base));
    }

    // Onboarding, as an operator would with `hie org add`.
    {
        let db = Db::open(&DatabaseConfig {
            url: format!("sqlite://{}", db_path.display()),
            pool_size: 1,
            connect_timeout_ms: 5000,
            busy_timeout_ms: 5000,
        })?;
        let mut conn = db.get()?;
        for (m, base) in MEMBERS.iter().zip(&bases) {
            let cert = crate::certs::read_cert(&certs.join("orgs").join(m.id).join("client.crt"))?;
            crate::orgs::add(
                &mut conn,
                NewOrganization {
                    id: OrgId::parse(m.id)?,
                    name: m.name.into(),
                    org_type: m.kind,
                    fhir_base: base.clone(),
                    identifier_systems: if m.system.is_empty() {
                        Vec::new()
                    } else {
                        vec![m.system.into()]
                    },
                },
                &CertInfo::from_x509(&cert)?,
                &Actor::cli(),
            )?;
        }
    }
    let (child, addr) = spawn(
        &config,
        &["serve"],
        "exchange listening on https://",
        &dir.join("broker.log"),
    )?;
    procs.0.push(("broker".into(), child));
    let port = addr
        .split('/')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .unwrap_or_default()
        .to_string();
    let base = format!("https://localhost:{port}/fhir");
    println!(
        "   broker                    {base} (hie serve, SQLite {})",
        db_path.display()
    );

    let hospital = client(&certs, "general-hospital")?;
    let lab = client(&certs, "city-lab")?;
    let er = client(&certs, "county-er")?;
    let ops = client(&certs, "exchange-ops")?;
    let mut w = Walk {
        base: base.clone(),
        failures: 0,
        step: 0,
    };
    let started = Instant::now();

    w.step("Members feed their patients (PIXm ITI-104 in batch Bundles); the MPI links them as they arrive");
    for (m, c) in MEMBERS.iter().zip([&hospital, &lab, &er]) {
        let text = std::fs::read_to_string(dir.join("members").join(m.id).join("patients.ndjson"))
            .unwrap_or_default();
        let entries: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|p| {
                let mrn = p["identifier"][0]["value"].as_str().unwrap_or_default().to_string();
                json!({ "resource": p, "request": { "method": "PUT", "url": format!("Patient?identifier={}|{mrn}", m.system) } })
            })
            .collect();
        let n = entries.len();
        let (status, resp) = w
            .call(
                c,
                reqwest::Method::POST,
                "",
                "TREAT",
                Some(&json!({ "resourceType": "Bundle", "type": "batch", "entry": entries })),
                &[],
            )
            .await;
        let linked = resp["entry"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter(|x| x.to_string().contains("linked"))
                    .count()
            })
            .unwrap_or(0);
        w.check(
            status == 200,
            &format!(
                "{} fed {n} patients ({linked} linked to people other members hold)",
                m.id
            ),
        );
    }

    let p = &people[0];
    let hosp_mrn = "H01000";
    w.step(&format!("The hospital and the lab register documents about {} (MHD ITI-65); the bytes stay with them", name_of(p)));
    let lab_mrn = "L01000";
    let docs = [
        (&hospital, 0usize, hosp_mrn, "discharge-summary.txt", format!("DISCHARGE SUMMARY (synthetic)\nPatient: {}\nAdmitted with community-acquired pneumonia; treated and discharged.\n", name_of(p)), ("18842-5", "Discharge summary")),
        (&lab, 1usize, lab_mrn, "cbc-report.txt", format!("LAB REPORT (synthetic)\nPatient: {}\nHemoglobin 13.9 g/dL; WBC 7.1 10*3/uL; Platelets 250 10*3/uL\n", name_of(p)), ("11502-2", "Laboratory report")),
    ];
    for (c, i, mrn, name, text, category) in docs {
        let m = &MEMBERS[i];
        let base_i = bases[i].clone().unwrap_or_default();
        let bundle = document(
            &dir.join("members").join(m.id),
            &base_i,
            m,
            mrn,
            name,
            &text,
            category,
        )?;
        let (status, resp) = w
            .call(c, reqwest::Method::POST, "", "TREAT", Some(&bundle), &[])
            .await;
        let loc = resp["entry"][1]["response"]["location"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        w.check(
            status == 200,
            &format!("{} registered {name} as {loc}", m.id),
        );
    }

    w.step("The hospital asks who this patient is elsewhere (PIXm ITI-83)");
    let (status, pix) = w
        .get(
            &hospital,
            &format!(
                "Patient/$ihe-pix?sourceIdentifier={}|{hosp_mrn}",
                MEMBERS[0].system
            ),
            "TREAT",
        )
        .await;
    let mut ids: Vec<String> = pix["parameter"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|x| {
                    let system = x["valueIdentifier"]["system"].as_str()?;
                    let value = x["valueIdentifier"]["value"].as_str()?;
                    let owner = MEMBERS
                        .iter()
                        .find(|m| !m.system.is_empty() && m.system == system)
                        .map(|m| m.id);
                    Some(match owner {
                        Some(m) => format!("{value} at {m}"),
                        None if system.ends_with(":enterprise") => format!("enterprise id {value}"),
                        None => format!("{value} ({system})"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids.dedup();
    w.check(
        status == 200 && ids.iter().any(|v| v.starts_with(lab_mrn)),
        &format!("{hosp_mrn} at general-hospital is also: {}", ids.join("; ")),
    );

    w.step("The hospital finds the patient's documents across the region (MHD ITI-67) and retrieves the lab's report through the broker (ITI-68)");
    let (status, found) = w
        .get(
            &hospital,
            &format!(
                "DocumentReference?patient.identifier={}|{hosp_mrn}",
                MEMBERS[0].system
            ),
            "TREAT",
        )
        .await;
    let holders: Vec<String> = entries(&found, "match")
        .iter()
        .map(|e| {
            format!(
                "{} ({})",
                e["resource"]["id"].as_str().unwrap_or("?"),
                e["resource"]["meta"]["source"].as_str().unwrap_or("?")
            )
        })
        .collect();
    w.check(
        status == 200 && holders.len() == 2,
        &format!("{} documents: {}", holders.len(), holders.join(", ")),
    );
    let lab_url = entries(&found, "match")
        .iter()
        .find(|e| e["resource"]["meta"]["source"] == "Organization/city-lab")
        .and_then(|e| {
            e["resource"]["content"][0]["attachment"]["url"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    let fetched = hospital
        .get(&lab_url)
        .header("X-Purpose-Of-Use", "TREAT")
        .send()
        .await;
    let text = match fetched {
        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
        _ => String::new(),
    };
    w.check(
        text.contains("Hemoglobin"),
        &format!(
            "GET {lab_url} -> {:?}",
            text.lines().nth(2).unwrap_or("nothing")
        ),
    );

    w.step("The hospital asks the region for the patient's lab results (federated query to the members that hold them)");
    let (status, obs) = w
        .get(
            &hospital,
            &format!(
                "federated/Observation?patient.identifier={}|{hosp_mrn}",
                MEMBERS[0].system
            ),
            "TREAT",
        )
        .await;
    let results: Vec<String> = entries(&obs, "match")
        .iter()
        .map(|e| {
            format!(
                "{} {} {} (from {})",
                e["resource"]["code"]["text"].as_str().unwrap_or("?"),
                e["resource"]["valueQuantity"]["value"],
                e["resource"]["valueQuantity"]["unit"]
                    .as_str()
                    .unwrap_or(""),
                e["resource"]["meta"]["tag"][0]["code"]
                    .as_str()
                    .unwrap_or("?")
            )
        })
        .collect();
    w.check(
        status == 200 && !results.is_empty(),
        &format!("{} results", results.len()),
    );
    for r in &results {
        println!("     {r}");
    }

    let stranger = &people[4];
    w.step(&format!(
        "Months ago {} asked the hospital to keep their mental-health notes private: a Consent (PATRQT) restricting PSY",
        name_of(stranger)
    ));
    let mut note = document(
        &dir.join("members").join(MEMBERS[0].id),
        &bases[0].clone().unwrap_or_default(),
        &MEMBERS[0],
        "H01004",
        "psychiatry-note.txt",
        "PSYCHIATRY NOTE (synthetic)\nAnxiety disorder, on sertraline 50 mg.\n",
        ("11488-4", "Consult note"),
    )?;
    if let Some(labels) = note["entry"][1]["resource"]["securityLabel"].as_array_mut() {
        labels.push(json!({ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY", "display": "psychiatry information sensitivity" }] }));
    }
    let (status, _) = w
        .call(
            &hospital,
            reqwest::Method::POST,
            "",
            "TREAT",
            Some(&note),
            &[],
        )
        .await;
    w.check(
        status == 200,
        "the hospital registered a psychiatry note labelled PSY",
    );
    let consent = json!({ "resourceType": "Consent", "status": "active",
        "patient": { "identifier": { "system": MEMBERS[0].system, "value": "H01004" } },
        "provision": { "type": "deny", "securityLabel": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "PSY" }] } });
    let (status, c) = w
        .call(
            &hospital,
            reqwest::Method::POST,
            "Consent",
            "PATRQT",
            Some(&consent),
            &[],
        )
        .await;
    w.check(
        status == 201,
        &format!(
            "recorded as Consent/{} version {}",
            c["id"].as_str().unwrap_or("?"),
            c["meta"]["versionId"].as_str().unwrap_or("?")
        ),
    );

    w.step(&format!(
        "County ER: an unconscious stranger, a {} born {}, surname overheard as '{}', postcode on a bus pass. $match on partial demographics",
        if stranger.gender == "female" { "woman" } else { "man" },
        stranger.birth_date,
        cap(&stranger.family)
    ));
    let query = json!({ "resourceType": "Parameters", "parameter": [
        { "name": "resource", "resource": { "resourceType": "Patient", "name": [{ "family": stranger.family }], "birthDate": stranger.birth_date, "gender": stranger.gender, "address": [{ "postalCode": stranger.postcode }] } },
        { "name": "count", "valueInteger": 3 } ] });
    let (status, matched) = w
        .call(
            &er,
            reqwest::Method::POST,
            "Patient/$match",
            "ETREAT",
            Some(&query),
            &[],
        )
        .await;
    let top = entries(&matched, "match").first().map(|e| {
        (
            e["resource"]["id"].as_str().unwrap_or_default().to_string(),
            e["search"]["score"].as_f64().unwrap_or(0.0),
            e["search"]["extension"][0]["valueCode"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
            e["resource"]["name"][0]["given"][0]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        )
    });
    let Some((person, score, grade, given)) = top else {
        w.check(false, &format!("$match found nobody ({status})"));
        return finish(w, once, &base, &certs, procs, started).await;
    };
    w.check(
        status == 200 && given.eq_ignore_ascii_case(&stranger.given),
        &format!(
            "best candidate Patient/{person}: {given} {}, score {score:.2}, grade {grade}",
            cap(&stranger.family)
        ),
    );

    w.step("The ER looks for the patient's documents: emergency treatment alone does not lift the patient's restriction; break-the-glass with a stated reason does, and is flagged");
    let reason = [(
        "X-Break-Glass-Reason",
        "unconscious patient, no identification",
    )];
    let query = format!("DocumentReference?patient=Patient/{person}");
    let (_, plain) = w.get(&er, &query, "ETREAT").await;
    let (_, glass) = w
        .call(&er, reqwest::Method::GET, &query, "ETREAT", None, &reason)
        .await;
    let (n_plain, n_glass) = (
        plain["total"].as_u64().unwrap_or(0),
        glass["total"].as_u64().unwrap_or(0),
    );
    let marked = glass["meta"]["security"].to_string().contains("BTG");
    w.check(n_glass == n_plain + 1 && marked, &format!("ETREAT: {n_plain} document(s); ETREAT + reason: {n_glass}, the answer marked BTG (break the glass)"));

    w.step("The lab's system goes down; under break-the-glass the ER asks the region for everything and gets what arrives within its emergency deadline");
    procs.kill("city-lab");
    let t = Instant::now();
    let (status, all) = w
        .call(
            &er,
            reqwest::Method::GET,
            &format!("federated/Patient/$everything?patient=Patient/{person}"),
            "ETREAT",
            None,
            &[(
                "X-Break-Glass-Reason",
                "unconscious patient, no identification",
            )],
        )
        .await;
    let got: Vec<String> = entries(&all, "match")
        .iter()
        .map(|e| {
            format!(
                "{} from {}",
                e["resource"]["resourceType"].as_str().unwrap_or("?"),
                e["resource"]["meta"]["tag"][0]["code"]
                    .as_str()
                    .unwrap_or("?")
            )
        })
        .collect();
    let warns: Vec<String> = entries(&all, "outcome")
        .iter()
        .map(|e| {
            e["resource"]["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    w.check(
        status == 200 && !got.is_empty(),
        &format!(
            "{} resources in {} ms: {}",
            got.len(),
            t.elapsed().as_millis(),
            got.join(", ")
        ),
    );
    w.check(
        warns.iter().any(|x| x.contains("city-lab")),
        &format!(
            "and says what is missing: {}",
            warns.first().cloned().unwrap_or_default()
        ),
    );

    w.step(
        "The exchange operator reviews who saw this person's record (audit trail, ATNA/BALP-style)",
    );
    let (status, audit) = w
        .get(
            &ops,
            &format!("AuditEvent?patient=Patient/{person}&_count=50"),
            "HOPERAT",
        )
        .await;
    let n = audit["entry"].as_array().map(Vec::len).unwrap_or(0);
    w.check(
        status == 200 && n > 0,
        &format!("{n} audit events for Patient/{person}"),
    );
    for e in audit["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .take(8)
    {
        let r = &e["resource"];
        println!(
            "     {} {} by {} ({}) {}",
            r["recorded"].as_str().unwrap_or("?"),
            r["subtype"][0]["code"].as_str().unwrap_or("?"),
            r["agent"][0]["who"]["identifier"]["value"]
                .as_str()
                .unwrap_or("?"),
            r["purposeOfEvent"][0]["coding"]
                .as_array()
                .map(|cs| cs
                    .iter()
                    .filter_map(|c| c["code"].as_str())
                    .collect::<Vec<_>>()
                    .join("+"))
                .unwrap_or_default(),
            r["outcomeDesc"].as_str().unwrap_or("")
        );
    }
    finish(w, once, &base, &certs, procs, started).await
}

async fn finish(
    w: Walk,
    once: bool,
    base: &str,
    certs: &Path,
    procs: Processes,
    started: Instant,
) -> Result<bool> {
    let ok = w.failures == 0;
    println!(
        "\nhie demo: {} steps, {} failed, {:.1} s",
        w.step,
        w.failures,
        started.elapsed().as_secs_f64()
    );
    let c = certs.display();
    println!(
        "\nRepeat any step with curl, e.g. as the hospital:\n\
         \x20 H=\"--cert {c}/orgs/general-hospital/client.crt --key {c}/orgs/general-hospital/client.key --cacert {c}/ca.crt -H X-Purpose-Of-Use:TREAT\"\n\
         \x20 curl $H '{base}/Patient?family=...&birthdate=...'\n\
         \x20 curl $H '{base}/Patient/$ihe-pix?sourceIdentifier=urn:oid:2.16.840.1.113883.3.9999.1|H01000'\n\
         \x20 curl $H '{base}/DocumentReference?patient.identifier=urn:oid:2.16.840.1.113883.3.9999.1|H01000'\n\
         \x20 curl $H '{base}/federated/Observation?patient.identifier=urn:oid:2.16.840.1.113883.3.9999.1|H01000'\n\
         \x20 curl $H '{base}/Patient/$locate?identifier=urn:oid:2.16.840.1.113883.3.9999.1|H01000'\n\
         (county-er and exchange-ops have certificates in {c}/orgs too; the ER uses -H X-Purpose-Of-Use:ETREAT)"
    );
    if once {
        drop(procs);
        return Ok(ok);
    }
    println!(
        "\nThe exchange keeps running for you to explore (the lab stays down); Ctrl-C stops it."
    );
    let _ = tokio::signal::ctrl_c().await;
    drop(procs);
    Ok(ok)
}

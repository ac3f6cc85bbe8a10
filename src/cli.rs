//! The `hie` command line.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::audit::{self, Actor, Verification};
use crate::certs::{self, Authority, CertInfo, Validity};
use crate::config::{Config, LogFormat};
use crate::db::{self, Db};
use crate::error::{Error, Result};
use crate::ids::OrgId;
use crate::orgs::{self, NewOrganization, OrgStatus, OrgType, Organization};

#[derive(Parser, Debug)]
#[command(
    name = "hie",
    version,
    about = "hie-broker: the central broker of a regional health information exchange"
)]
pub struct Cli {
    /// Configuration file (TOML); see config/default.toml for every setting.
    #[arg(long, global = true, env = "HIE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: text or json (overrides [log] format).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the broker (creates a dev CA and SQLite database on first run).
    Serve,
    /// Run pending database migrations and exit.
    Migrate,
    /// The exchange certificate authority.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Member organisations.
    #[command(subcommand)]
    Org(OrgCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Bulk-load a member's patients (NDJSON, one FHIR Patient per line) through the same
    /// matching as the online feed.
    Import {
        #[arg(long)]
        org: String,
        file: PathBuf,
        /// Records per batch at most: matched together, one audit record each. The first
        /// batches are smaller (1,000 records, doubling), so that writing starts at once. A
        /// transaction holds whole batches, up to 200,000 records.
        #[arg(long, default_value_t = 50_000)]
        batch: usize,
        /// Records written in one transaction at most, in whole batches: fewer commits write
        /// less (each copies the index pages it dirtied into the write-ahead log).
        #[arg(long, default_value_t = 200_000)]
        transaction_records: usize,
    },
    /// The master patient index: review queue, links, merges.
    #[command(subcommand)]
    Mpi(MpiCommand),
    /// Start the broker and three simulated members (hospital, lab, emergency department) with
    /// synthetic patients and documents, and walk through a whole exchange.
    Demo {
        /// Exit after the walk-through (status 1 if any step failed) instead of keeping the
        /// exchange running.
        #[arg(long)]
        once: bool,
        /// Working directory (cleared first).
        #[arg(long, default_value = "data/demo")]
        dir: PathBuf,
    },
    /// Run a simulated member EHR: an HTTPS FHIR server (mutual TLS, trusting the exchange CA)
    /// serving the member's documents from DIR/documents, for tests and demos.
    MemberSim {
        /// The member organisation it plays.
        #[arg(long)]
        org: String,
        /// Address to listen on (port 0 picks a free one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Data directory (documents/ holds the document files).
        #[arg(long)]
        data: PathBuf,
        /// Server certificate and key; default certs/orgs/ORG/client.{crt,key}, which
        /// `hie certs issue --org ORG --server-name localhost` makes usable as a server certificate.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        /// Answer every request this many milliseconds late (a slow member).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Misbehave on purpose: `invalid-json` answers searches with a body that is not JSON.
        #[arg(long, value_parser = ["invalid-json"])]
        fault: Option<String>,
        /// Before serving, feed DIR/patients.ndjson and register DIR/documents.ndjson at this
        /// broker FHIR base (e.g. https://localhost:8443/fhir), as this member.
        #[arg(long)]
        feed: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum MpiCommand {
    /// List review items (potential matches and potential duplicates).
    Review {
        #[arg(long, default_value = "open")]
        status: String,
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Resolve a review item: the same person (link) or not (never auto-linked again).
    Resolve {
        id: i64,
        #[arg(
            long,
            conflicts_with = "different",
            required_unless_present = "different"
        )]
        same: bool,
        #[arg(long)]
        different: bool,
    },
    /// Take a record (src-N) out of its identity.
    Unlink { source: String },
    /// Merge identity ent-A into ent-B.
    Merge {
        from: String,
        #[arg(long)]
        into: String,
    },
    /// Undo the last merge of an identity.
    Unmerge { identity: String },
    /// Why a record (src-N) was linked as it is; the history of an identity (ent-N).
    Explain { id: String },
    /// Estimate m/u weights from the loaded data (EM) and print them as a weights file.
    Estimate {
        #[arg(long, default_value_t = 20000)]
        sample: i64,
        #[arg(long, default_value_t = 25)]
        iterations: usize,
    },
}

#[derive(Args, Debug)]
pub struct DirArg {
    /// Certificate directory (default: [certs] dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Create the exchange CA, the broker's server and client certificates and an empty CRL.
    Init {
        #[command(flatten)]
        dir: DirArg,
        /// Names the broker's server certificate is valid for (default: [certs] hostnames).
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// Replace an existing CA (every issued certificate stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a member certificate into DIR/orgs/ORG_ID/ (client.crt, client.key, client.p12).
    Issue {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        org: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Also make it a server certificate for the member's own FHIR endpoint, valid for HOST.
        #[arg(long = "server-name")]
        server_names: Vec<String>,
        /// Password of the PKCS#12 bundle (empty by default).
        #[arg(long, default_value = "")]
        p12_password: String,
    },
    /// Revoke a certificate: add it to DIR/crl.pem (the broker picks it up without a restart).
    Revoke {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        cert: PathBuf,
    },
    /// Re-sign the CRL (extends its nextUpdate by 30 days).
    Crl {
        #[command(flatten)]
        dir: DirArg,
    },
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Onboard a member organisation with its client certificate.
    Add {
        #[arg(long)]
        id: String,
        #[arg(long)]
        name: String,
        /// hospital, clinic, lab, pharmacy, emergency or operator.
        #[arg(long = "type")]
        org_type: String,
        #[arg(long)]
        cert: PathBuf,
        /// The member's FHIR base URL (https://), where the broker forwards queries.
        #[arg(long)]
        fhir_base: Option<String>,
        /// An identifier system (assigning authority) the member owns; repeat for several.
        #[arg(long = "identifier-system")]
        identifier_systems: Vec<String>,
    },
    /// List member organisations.
    List,
    /// Suspend a member: its certificates stop working.
    Suspend { id: String },
    /// Register or change a member's FHIR endpoint (https://…/fhir); --none removes it.
    SetEndpoint {
        id: String,
        #[arg(long, required_unless_present = "none")]
        fhir_base: Option<String>,
        #[arg(long, conflicts_with = "fhir_base")]
        none: bool,
    },
    /// Re-activate a suspended member.
    Activate { id: String },
    /// Add another certificate to a member (rotation without downtime).
    AddCert {
        id: String,
        #[arg(long)]
        cert: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Walk the whole hash chain and name the first broken record.
    Verify,
    /// List break-the-glass accesses (ETREAT with a stated reason), newest first.
    BreakGlass {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

/// Parses the command line, runs it, and turns errors into a message and exit status.
pub fn main() -> ExitCode {
    // Initialise OpenSSL before libpq does, so that it registers no atexit cleanup: that
    // cleanup races with pooled PostgreSQL TLS connections and crashes the process at exit.
    openssl::init();
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hie: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config, cli.log_format.as_deref());
    crate::tls::install_crypto_provider();
    match run(cli.command, config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hie: {e}");
            ExitCode::from(if e.kind == crate::ErrorKind::Config {
                2
            } else {
                1
            })
        }
    }
}

fn init_logging(config: &Config, format: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        Some(f) => f == "json",
        None => config.log.format == LogFormat::Json,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn certs_dir(config: &Config, dir: DirArg) -> PathBuf {
    dir.dir.unwrap_or_else(|| config.certs.dir.clone())
}

fn run(command: Command, config: Config) -> Result<ExitCode> {
    match command {
        Command::Serve => {
            let system = actix_web::rt::System::new();
            system.block_on(crate::server::serve(config))?;
        }
        Command::MemberSim {
            org,
            listen,
            data,
            cert,
            key,
            delay_ms,
            fault,
            feed,
        } => {
            let (default_cert, default_key) = crate::member::default_paths(&config.certs.dir, &org);
            let options = crate::member::SimOptions {
                org,
                listen,
                data,
                cert: cert.unwrap_or(default_cert),
                key: key.unwrap_or(default_key),
                ca: config.certs.dir.join(certs::CA_CERT),
                crl: config.certs.dir.join(certs::CRL),
                delay: std::time::Duration::from_millis(delay_ms),
                fault,
                feed,
            };
            let system = actix_web::rt::System::new();
            system.block_on(crate::member::run(options))?;
        }
        Command::Demo { once, dir } => {
            let system = actix_web::rt::System::new();
            if !system.block_on(crate::demo::run(dir, once))? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Migrate => {
            let applied = db::migrate_only(&config.database)?;
            println!(
                "database {}: {applied} migration(s) applied",
                config.database.url
            );
        }
        Command::Certs(c) => certs_command(c, &config)?,
        Command::Org(c) => org_command(c, &config)?,
        Command::Audit(AuditCommand::Verify) => return audit_verify(&config),
        Command::Audit(AuditCommand::BreakGlass { limit }) => audit_break_glass(&config, limit)?,
        Command::Import {
            org,
            file,
            batch,
            transaction_records,
        } => import(&config, &org, &file, batch.max(1), transaction_records)?,
        Command::Mpi(c) => mpi_command(c, &config)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn certs_command(c: CertsCommand, config: &Config) -> Result<()> {
    match c {
        CertsCommand::Init {
            dir,
            hostnames,
            force,
        } => {
            let dir = certs_dir(config, dir);
            let hostnames = if hostnames.is_empty() {
                config.certs.hostnames.clone()
            } else {
                hostnames
            };
            let report = Authority::init(&dir, &config.exchange.name, &hostnames, force)?;
            if report.created {
                println!(
                    "created the exchange CA and broker certificates in {}",
                    dir.display()
                );
                println!("  ca.crt ca.key server.crt server.key client.crt client.key crl.pem");
            } else {
                println!(
                    "{} already holds an exchange CA; left alone (use --force to replace it)",
                    dir.display()
                );
            }
        }
        CertsCommand::Issue {
            dir,
            org,
            days,
            server_names,
            p12_password,
        } => {
            let ca = Authority::load(&certs_dir(config, dir))?;
            let org = OrgId::parse(&org)?;
            if days == 0 {
                return Err(Error::invalid("--days must be at least 1"));
            }
            let out = ca.issue_member(&org, Validity::days(days), &server_names, &p12_password)?;
            let info = CertInfo::from_x509(&certs::read_cert(&out.join(certs::CLIENT_CERT))?)?;
            println!("issued a certificate for '{org}' valid for {days} days:");
            println!(
                "  {}/client.crt\n  {}/client.key (0600)\n  {}/client.p12",
                out.display(),
                out.display(),
                out.display()
            );
            println!(
                "  subject {}\n  sha256 fingerprint {}",
                info.subject, info.fingerprint
            );
        }
        CertsCommand::Revoke { dir, cert } => {
            let ca = Authority::load(&certs_dir(config, dir))?;
            let x509 = certs::read_cert(&cert)?;
            let info = CertInfo::from_x509(&x509)?;
            if ca.revoke(&x509)? {
                println!(
                    "revoked {} (serial {}); {} updated",
                    info.subject,
                    info.serial,
                    ca.dir.join(certs::CRL).display()
                );
            } else {
                println!(
                    "{} (serial {}) was already revoked",
                    info.subject, info.serial
                );
            }
        }
        CertsCommand::Crl { dir } => {
            let ca = Authority::load(&certs_dir(config, dir))?;
            let n = ca.refresh_crl()?;
            println!(
                "re-signed {} with {n} revoked certificate(s)",
                ca.dir.join(certs::CRL).display()
            );
        }
    }
    Ok(())
}

fn print_org(o: &Organization) {
    println!(
        "{:<24} {:<10} {:<10} {}{}",
        o.id.as_str(),
        o.org_type.code(),
        o.status.code(),
        o.name,
        o.fhir_base
            .as_ref()
            .map(|b| format!("  <{b}>"))
            .unwrap_or_default()
    );
    for c in &o.certificates {
        println!(
            "    cert {}  {}  until {}",
            c.fingerprint,
            c.subject,
            crate::time::to_instant(c.not_after)
        );
    }
    for s in &o.identifier_systems {
        println!("    owns identifier system {s}");
    }
}

/// Reads a certificate file for enrollment and checks that the exchange CA issued it and that
/// it is still valid.
fn enrollment_cert(config: &Config, path: &std::path::Path) -> Result<CertInfo> {
    let cert = certs::read_cert(path)?;
    let ca = certs::read_cert(&config.certs.dir.join(certs::CA_CERT))?;
    let key = ca.public_key()?;
    if !cert.verify(&key).unwrap_or(false) {
        return Err(Error::invalid(format!(
            "{} was not issued by the exchange CA ({}); issue one with `hie certs issue`",
            path.display(),
            config.certs.dir.join(certs::CA_CERT).display()
        )));
    }
    let info = CertInfo::from_x509(&cert)?;
    if info.not_after <= crate::time::now_micros() {
        return Err(Error::invalid(format!("{} has expired", path.display())));
    }
    Ok(info)
}

fn org_command(c: OrgCommand, config: &Config) -> Result<()> {
    let db = Db::open(&config.database)?;
    let mut conn = db.get()?;
    let actor = Actor::cli();
    match c {
        OrgCommand::Add {
            id,
            name,
            org_type,
            cert,
            fhir_base,
            identifier_systems,
        } => {
            let info = enrollment_cert(config, &cert)?;
            let new = NewOrganization {
                id: OrgId::parse(&id)?,
                name,
                org_type: OrgType::parse(&org_type)?,
                fhir_base: fhir_base.map(|b| b.trim_end_matches('/').to_string()),
                identifier_systems,
            };
            let org = orgs::add(&mut conn, new, &info, &actor)?;
            println!("added:");
            print_org(&org);
        }
        OrgCommand::List => {
            let all = orgs::search(&mut conn, &orgs::OrgQuery::default())?;
            if all.is_empty() {
                println!("no member organisations yet (add one with `hie org add`)");
            }
            for o in &all {
                print_org(o);
            }
        }
        OrgCommand::Suspend { id } => {
            let org =
                orgs::set_status(&mut conn, &OrgId::parse(&id)?, OrgStatus::Suspended, &actor)?;
            println!(
                "suspended '{}': its certificates are refused from now on",
                org.id
            );
        }
        OrgCommand::SetEndpoint { id, fhir_base, .. } => {
            let org =
                orgs::set_fhir_base(&mut conn, &OrgId::parse(&id)?, fhir_base.as_deref(), &actor)?;
            match &org.fhir_base {
                Some(b) => println!("'{}' now has the FHIR endpoint {b}", org.id),
                None => println!("'{}' has no FHIR endpoint now", org.id),
            }
        }
        OrgCommand::Activate { id } => {
            let org = orgs::set_status(&mut conn, &OrgId::parse(&id)?, OrgStatus::Active, &actor)?;
            println!("activated '{}'", org.id);
        }
        OrgCommand::AddCert { id, cert } => {
            let info = enrollment_cert(config, &cert)?;
            let org = orgs::add_cert(&mut conn, &OrgId::parse(&id)?, &info, &actor)?;
            println!("added certificate {} to '{}'", info.fingerprint, org.id);
        }
    }
    Ok(())
}

fn audit_break_glass(config: &Config, limit: i64) -> Result<()> {
    let db = Db::open(&config.database)?;
    let mut conn = db.get()?;
    let found = db::audit::search(
        &mut conn,
        &db::audit::AuditFilter {
            break_glass: Some(true),
            ..Default::default()
        },
        limit.max(1),
    )?;
    if found.is_empty() {
        println!("no break-the-glass accesses");
    }
    for c in found {
        let r = &c.record;
        println!(
            "#{} {} org={} user={} role={} patient={} {} {} reason=\"{}\" outcome={}",
            c.seq,
            crate::time::to_instant(r.recorded_at),
            r.org_id.as_deref().unwrap_or("-"),
            r.user_id.as_deref().unwrap_or("-"),
            r.user_role.as_deref().unwrap_or("-"),
            r.patient.as_deref().unwrap_or("-"),
            r.subtype,
            r.entity.as_deref().unwrap_or("-"),
            r.break_glass.as_deref().unwrap_or(""),
            r.outcome_desc.as_deref().unwrap_or(&r.outcome),
        );
    }
    Ok(())
}

fn audit_verify(config: &Config) -> Result<ExitCode> {
    let db = Db::open(&config.database)?;
    let mut conn = db.get()?;
    match verify_chain(&mut conn)? {
        Verification::Intact { records, head_hash } => {
            println!("audit chain intact: {records} record(s), head {head_hash}");
            Ok(ExitCode::SUCCESS)
        }
        Verification::Broken { seq, reason } => {
            println!("audit chain BROKEN at record {seq}: {reason}");
            Ok(ExitCode::from(1))
        }
    }
}

/// Walks the whole chain in pages.
pub fn verify_chain(conn: &mut db::DbConn) -> Result<Verification> {
    let (mut seq, mut hash) = (0i64, audit::GENESIS_HASH.to_string());
    loop {
        let page = db::audit::page(conn, seq, 10_000)?;
        if page.is_empty() {
            break;
        }
        if let Some((at, reason)) = audit::verify_stretch(&mut seq, &mut hash, &page) {
            return Ok(Verification::Broken { seq: at, reason });
        }
    }
    let (head_seq, head_hash) = db::audit::head(conn)?;
    if head_seq != seq || head_hash != hash {
        return Ok(Verification::Broken {
            seq: seq + 1,
            reason: format!("the chain ends at record {seq} but its head says {head_seq}: records were removed from the end"),
        });
    }
    Ok(Verification::Intact {
        records: seq as u64,
        head_hash: hash,
    })
}

/// `hie import`: matching and writing run at once on two connections (`bulk::Pipeline`): the
/// next batch is read and matched while the last is written.
/// Tells the allocator (mimalloc, the binary's global allocator) to keep memory it has freed
/// instead of returning it to the system a second later. An import builds and drops tables of
/// hundreds of megabytes every batch; returned to the system, that memory came back zeroed by
/// the kernel on the next batch's first touch — 7 % of the 1M import's CPU in a profile, and
/// the run was 11–14 % faster without it. For a command that exits when it is done; the server
/// keeps the default.
fn keep_freed_memory() {
    // `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3); -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of mimalloc's options, read whenever it considers purging; any value
    // is valid, and this is harmless when mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Records in the first batch `hie import` matches; each next one is twice as large, up to
/// `--batch`.
const FIRST_BATCH: usize = 1_000;

/// `tx_records`: records `hie import` writes in one transaction, in whole batches, before it
/// commits.
fn import(
    config: &Config,
    org: &str,
    file: &std::path::Path,
    batch: usize,
    tx_records: usize,
) -> Result<()> {
    use crate::mpi::bulk::{write_group, Matched, Matcher, Pipeline, Submission, Written};
    use std::io::BufRead;
    keep_freed_memory();
    let settings = crate::mpi::MpiSettings::from_config(config)?;
    let db = Db::open(&config.database)?;
    let connect = || -> Result<db::PooledConn> {
        let mut conn = db.get()?;
        if conn.is_sqlite() {
            // The load touches index pages all over the file: keep them in memory for the run.
            diesel::connection::SimpleConnection::batch_execute(
                &mut *conn,
                "PRAGMA cache_size = -1048576",
            )?;
        }
        Ok(conn)
    };
    let mut conn = connect()?;
    let org = orgs::get(&mut conn, &OrgId::parse(org)?)?
        .ok_or_else(|| Error::not_found(format!("no organisation '{org}'")))?;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file)
            .map_err(|e| Error::invalid(format!("cannot read {}: {e}", file.display())))?,
    );
    let actor = Actor::cli();
    let started = std::time::Instant::now();
    // Into an empty index on PostgreSQL, what only readers need is built once at the end
    // rather than entry by entry (`restore_load_indexes`; at the next start after a failed
    // load), or as soon as the load reads the database.
    let deferred = db::mpi::defer_load_indexes(&mut conn)?;
    // Into an empty index, the load's records are the only candidates: matched from memory.
    let resident = match db::mpi::holds_no_records(&mut conn)? {
        true => Some(db::mpi::newest_id(
            &mut conn,
            db::mpi::IdTable::SourceRecords,
        )?),
        false => None,
    };
    let pipe = Pipeline::new(db.writes());
    if deferred {
        pipe.defer_indexes();
    }
    // The matcher reads on its own connection, alongside the writes. (On SQLite, reading on
    // the writer's connection — whose page cache stays warm — was measured too: at 1M the
    // writer is the busier thread, and loading it with the reads was slower, 5,703 against
    // 6,075 rec/s.)
    let (to_writer, batches) = std::sync::mpsc::sync_channel::<(Matched, Vec<usize>)>(1);
    let (mut ok, mut failed, mut linked) = (0u64, 0u64, 0u64);
    let mut read_failed = 0u64;
    let mut matched_again = 0u64;
    let loaded = std::thread::scope(|scope| -> Result<()> {
        let write_all = || -> Result<(u64, u64, u64, u64)> {
            let mut conn = connect()?;
            let mut written = match resident {
                Some(_) => Written::for_resident(),
                None => Written::default(),
            };
            let (mut ok, mut failed, mut linked) = (0u64, 0u64, 0u64);
            let mut upkeep = db::mpi::LoadUpkeep::new(&mut conn)?;
            // Moved in (a `recv` only borrows it): the closure owns the channel's end.
            let batches = batches;
            // A transaction takes the next batches as they come, up to `tx_records`: each
            // commit copies every index page the batch dirtied into the write-ahead log —
            // nearly every leaf of the random indexes — so fewer commits write less. It ends
            // sooner at the last batch, or after a batch whose records the matcher waits to
            // see written.
            while let Ok(first) = batches.recv() {
                let before = written.clone();
                let mut done: Vec<(Vec<usize>, Vec<Result<crate::mpi::FeedResult>>)> = Vec::new();
                let mut last_group = first.0.group();
                let results = db::write_tx(&mut conn, |c| {
                    let mut next = Some(first);
                    let mut records = 0;
                    while let Some((m, numbers)) = next.take() {
                        last_group = m.group();
                        let holds_up = m.holds_up_next();
                        let lines = (
                            numbers.first().copied().unwrap_or_default(),
                            numbers.last().copied().unwrap_or_default(),
                        );
                        let results =
                            write_group(c, &settings, &mut written, m, Some(&pipe), |c, rs| {
                                let record = import_audit(&actor, &org, file, lines, rs);
                                db::audit::append(c, &[record]).map(|_| ())
                            })?;
                        records += numbers.len();
                        done.push((numbers, results));
                        if holds_up || records >= tx_records {
                            break;
                        }
                        next = batches.recv().ok();
                    }
                    Ok(())
                });
                pipe.finished(last_group);
                results.inspect_err(|_| written = before)?;
                let fed = done
                    .iter()
                    .flat_map(|(_, rs)| rs)
                    .filter(|r| r.is_ok())
                    .count();
                upkeep.written(&mut conn, fed as u64, pipe.indexes_deferred())?;
                for (n, r) in done.iter().flat_map(|(ns, rs)| ns.iter().zip(rs)) {
                    match r {
                        Ok(r) => {
                            ok += 1;
                            linked += u64::from(r.outcome == "linked");
                        }
                        Err(e) => {
                            failed += 1;
                            eprintln!("line {n}: {e}");
                        }
                    }
                }
            }
            upkeep.finish(&mut conn);
            Ok((ok, failed, linked, written.matched_again()))
        };
        let writer = scope.spawn(|| -> Result<(u64, u64, u64, u64)> {
            let r = write_all();
            if r.is_err() {
                // Matching may wait for a batch this writer will never write.
                pipe.finished(u64::MAX - 1);
            }
            r
        });
        // The writer is the load's busiest thread and every other waits on it: this thread
        // and those it starts from here on (reading, preparing, scoring) yield it the core
        // they share. For a command that exits when it is done: the priority is not restored.
        crate::mpi::bulk::behind_the_writer();
        let mut matcher = resident.map_or_else(Matcher::default, Matcher::resident);
        // The writer stopped: its error is the one reported.
        let stopped = || Error::unavailable("the import's writer stopped");
        // The next batch's lines are read and parsed while this one is matched.
        type Lines = Result<(Vec<usize>, Vec<Submission>)>;
        let (to_matcher, parsed) = std::sync::mpsc::sync_channel::<Lines>(1);
        let read_all = scope.spawn(move || -> u64 {
            let mut lines = reader.lines().enumerate().peekable();
            let mut not_json = 0u64;
            // The first batches are small and double up to `batch`: until the first is
            // matched the writer waits, and with one of 50,000 records into a loaded database
            // that was 4 s of a 28 s load.
            let mut size = batch.min(FIRST_BATCH);
            while lines.peek().is_some() {
                // Each batch is matched together (and is written in one transaction, with
                // the batches around it); a line that is not a Patient is reported and skipped.
                let mut numbers = Vec::new();
                let mut patients = Vec::new();
                for (n, line) in lines.by_ref().take(size) {
                    let line = match line {
                        Ok(line) => line,
                        Err(e) => {
                            let e = Error::invalid(format!("cannot read {}: {e}", file.display()));
                            let _ = to_matcher.send(Err(e));
                            return not_json;
                        }
                    };
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<serde_json::Value>(&line) {
                        Ok(p) => {
                            numbers.push(n + 1);
                            patients.push(Submission::from(p));
                        }
                        Err(e) => {
                            not_json += 1;
                            eprintln!("line {}: not JSON: {e}", n + 1);
                        }
                    }
                }
                size = (size * 2).min(batch);
                if to_matcher.send(Ok((numbers, patients))).is_err() {
                    break;
                }
            }
            not_json
        });
        let matching = (|| -> Result<()> {
            for lines in parsed.iter() {
                let (numbers, patients) = lines?;
                // The writer writes the batch matched last while this one is matched (after
                // it, if its online records change what this one must see: `begin` waits).
                let m = matcher.match_group(&mut conn, &settings, &org, patients, Some(&pipe))?;
                to_writer.send((m, numbers)).map_err(|_| stopped())?;
            }
            Ok(())
        })();
        // A reader still sending stops at once.
        drop(parsed);
        read_failed = read_all
            .join()
            .map_err(|_| Error::internal("the import's reader failed"))?;
        drop(to_writer);
        let written = writer
            .join()
            .map_err(|_| Error::internal("the import's writer failed"))?;
        let (o, f, l, again) = written?;
        matching?;
        (ok, failed, linked, matched_again) = (o, f + read_failed, l, again);
        Ok(())
    });
    if deferred {
        let building = std::time::Instant::now();
        let mut helper = db.get();
        let built = match helper.as_deref_mut() {
            Ok(h) => db::mpi::restore_load_indexes(&mut conn, Some(h)),
            Err(_) => db::mpi::restore_load_indexes(&mut conn, None),
        };
        if let (Err(_), Err(e)) = (&loaded, &built) {
            // The load's error is the one returned; the next start builds them.
            eprintln!("the indexes the load deferred were not built after it failed: {e}");
        }
        loaded?;
        println!(
            "built {} index(es) and constraint(s) deferred by the load in {:.1} s",
            built?,
            building.elapsed().as_secs_f64()
        );
    } else {
        loaded?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {ok} record(s) for '{}' in {secs:.1} s ({:.0}/s): {linked} linked to existing people, {failed} refused",
        org.id,
        ok as f64 / secs.max(1e-9)
    );
    if matched_again > 0 {
        // Something else wrote while the file was loaded: those batches were decided again.
        println!(
            "{matched_again} batch(es) matched again as written (the database changed meanwhile)"
        );
    }
    Ok(())
}

/// The audit record of one batch of a bulk load (`lines`: its first and last line).
fn import_audit(
    actor: &Actor,
    org: &crate::orgs::Organization,
    file: &std::path::Path,
    (first_line, last_line): (usize, usize),
    rs: &[Result<crate::mpi::FeedResult>],
) -> crate::audit::AuditRecord {
    let fed: Vec<&crate::mpi::FeedResult> = rs.iter().filter_map(|r| r.as_ref().ok()).collect();
    crate::audit::AuditRecord::new(actor, "admin", crate::audit::Action::Create, "patient-feed")
        .entity(format!("Organization/{}", org.id))
        .query(format!(
            "import {} lines {first_line}-{last_line}",
            file.display()
        ))
        .outcome(
            crate::audit::Outcome::Success,
            format!(
                "bulk import: {} record(s) fed ({} linked), {} refused; source records {}",
                fed.len(),
                fed.iter().filter(|r| r.outcome == "linked").count(),
                rs.len() - fed.len(),
                source_span(&fed)
            ),
        )
}

/// `src-A..src-B` for the audit trail of a bulk load.
fn source_span(fed: &[&crate::mpi::FeedResult]) -> String {
    let lo = fed.iter().map(|r| r.source_id).min();
    let hi = fed.iter().map(|r| r.source_id).max();
    match (lo, hi) {
        (Some(lo), Some(hi)) => format!(
            "{}..{}",
            crate::mpi::source_ref(lo),
            crate::mpi::source_ref(hi)
        ),
        _ => "none".into(),
    }
}

fn parse_ref(s: &str, person: bool) -> Result<i64> {
    let parsed = if person {
        crate::mpi::parse_person_ref(s)
    } else {
        crate::mpi::parse_source_ref(s)
    };
    parsed.ok_or_else(|| {
        Error::invalid(format!(
            "'{s}' is not a {} id",
            if person {
                "person (ent-N)"
            } else {
                "record (src-N)"
            }
        ))
    })
}

fn print_source(label: &str, r: &db::mpi::SourceRow) {
    let d: crate::mpi::normalize::Demographics =
        serde_json::from_str(&r.demographics).unwrap_or_default();
    println!(
        "  {label} src-{} ({} {}|{}) in ent-{}: {} {} born {} {} {}",
        r.id,
        r.org_id,
        r.system,
        r.value,
        r.enterprise_id,
        d.given.unwrap_or_default(),
        d.family.unwrap_or_default(),
        d.birth_date.unwrap_or_else(|| "?".into()),
        d.street.unwrap_or_default(),
        d.postcode.unwrap_or_default()
    );
}

fn mpi_command(c: MpiCommand, config: &Config) -> Result<()> {
    let db = Db::open(&config.database)?;
    let mut conn = db.get()?;
    let actor = Actor::cli();
    match c {
        MpiCommand::Review { status, limit } => {
            let items = crate::mpi::review_queue(&mut conn, &status, 0, limit)?;
            if items.is_empty() {
                println!("no {status} review items");
            }
            for i in items {
                println!(
                    "review {} [{}] {} score {:.1}",
                    i.id, i.status, i.kind, i.score
                );
                print_source("A", &i.a);
                print_source("B", &i.b);
                if let Some(fields) = i.breakdown.get("fields").and_then(|f| f.as_array()) {
                    let parts: Vec<String> = fields
                        .iter()
                        .map(|f| {
                            format!(
                                "{}={} ({:+.1})",
                                f["field"].as_str().unwrap_or("?"),
                                f["level"].as_str().unwrap_or("?"),
                                f["weight"].as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect();
                    println!("    {}", parts.join(", "));
                }
                if let Some(h) = i
                    .breakdown
                    .get("hazards")
                    .and_then(|h| h.as_array())
                    .filter(|h| !h.is_empty())
                {
                    println!(
                        "    hazards: {}",
                        h.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        MpiCommand::Resolve {
            id,
            same,
            different: _,
        } => {
            let item = crate::mpi::resolve_review(&mut conn, id, same, &actor)?;
            println!(
                "review {} resolved: {}",
                item.id,
                if same {
                    "same person (linked)"
                } else {
                    "not the same person (remembered)"
                }
            );
        }
        MpiCommand::Unlink { source } => {
            let eid = crate::mpi::unlink(&mut conn, parse_ref(&source, false)?, &actor)?;
            println!("{source} now stands alone as ent-{eid}");
        }
        MpiCommand::Merge { from, into } => {
            let moved = crate::mpi::merge_identities(
                &mut conn,
                parse_ref(&from, true)?,
                parse_ref(&into, true)?,
                &actor,
            )?;
            println!("merged {from} into {into}: {} record(s) moved", moved.len());
        }
        MpiCommand::Unmerge { identity } => {
            let restored = crate::mpi::unmerge(&mut conn, parse_ref(&identity, true)?, &actor)?;
            println!("unmerged {identity}: {} record(s) restored", restored.len());
        }
        MpiCommand::Explain { id } => {
            if let Some(sid) = crate::mpi::parse_source_ref(&id) {
                for d in crate::mpi::explain(&mut conn, sid)? {
                    println!(
                        "{} {} candidate {} score {}: {}",
                        crate::time::to_instant(d.created_at),
                        d.outcome,
                        d.candidate_id
                            .map(|c| format!("src-{c}"))
                            .unwrap_or_else(|| "-".into()),
                        d.score
                            .map(|s| format!("{s:.1}"))
                            .unwrap_or_else(|| "-".into()),
                        crate::mpi::score::breakdown_value(&d.breakdown)
                    );
                }
            } else {
                for h in crate::mpi::history(&mut conn, parse_ref(&id, true)?)? {
                    println!(
                        "{} {} by {}: {}",
                        crate::time::to_instant(h.created_at),
                        h.action,
                        h.actor.unwrap_or_else(|| "matcher".into()),
                        h.detail
                    );
                }
            }
        }
        MpiCommand::Estimate { sample, iterations } => {
            let settings = crate::mpi::MpiSettings::from_config(config)?;
            let (w, p, n) =
                crate::mpi::estimate::estimate(&mut conn, &settings.weights, sample, iterations)?;
            let common = crate::mpi::estimate::term_frequencies(&mut conn, &w, 1000)?;
            println!("# estimated by `hie mpi estimate` from {n} candidate pairs; match proportion {p:.4}");
            println!(
                "# term_frequency: shares of the {} most common given and family names (exact agreement on them weighs log2(m / share))",
                common.values().map(|v| v.len()).sum::<usize>()
            );
            print!("{}", w.with_frequencies(common).to_toml());
        }
    }
    Ok(())
}

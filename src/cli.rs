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

//! hie-broker: the central broker of a regional health information exchange.
//!
//! Domain modules (`orgs`, `audit`, `policy`, `certs`) can be called from a test without a
//! server; only `api` knows actix and HTTP, only `db` knows diesel. See ARCHITECTURE.md.

pub mod api;
pub mod audit;
pub mod certs;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod error;
pub mod federation;
pub mod ids;
pub mod member;
pub mod metrics;
pub mod mpi;
pub mod orgs;
pub mod outbound;
pub mod policy;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod synth;
pub mod time;
pub mod tls;

pub use error::{Error, ErrorKind, Result};

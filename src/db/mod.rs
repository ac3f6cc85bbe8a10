//! Storage. Only this module knows diesel. One code path for SQLite (embedded default) and
//! PostgreSQL (production): `DbConn` is a diesel `MultiConnection`, so every query is written once.

pub mod audit;
pub mod consent;
pub mod documents;
pub mod mpi;
pub mod orgs;
pub mod prepared;
pub mod schema;
mod sqlite_memory;
mod wal_runs;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{self, ManageConnection};
use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::path::PathBuf;
use std::time::Duration;

use crate::config::DatabaseConfig;
use crate::error::{Error, Result};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Postgresql(PgConnection),
    Sqlite(SqliteConnection),
}

impl DbConn {
    pub fn is_sqlite(&self) -> bool {
        matches!(self, DbConn::Sqlite(_))
    }
}

/// A database URL, by scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbUrl {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DbUrl {
    pub fn parse(url: &str) -> Result<DbUrl> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::config(
                    "sqlite:// needs a file path, e.g. sqlite://data/hie.db",
                ));
            }
            Ok(DbUrl::Sqlite(PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbUrl::Postgres(url.to_string()))
        } else {
            Err(Error::config(format!(
                "'{}' is not a supported database URL: use sqlite://PATH or postgres://USER@HOST/DB",
                redact(url)
            )))
        }
    }

    /// For messages: never print a password.
    pub fn display(&self) -> String {
        match self {
            DbUrl::Sqlite(p) => format!("sqlite://{}", p.display()),
            DbUrl::Postgres(u) => redact(u),
        }
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Opens connections for the pool, picking the backend by URL scheme, so that a connection
/// failure reports the real cause at once.
#[derive(Debug, Clone)]
pub struct Manager {
    url: DbUrl,
    busy_timeout_ms: u64,
    /// PostgreSQL: the session plans every prepared statement generically
    /// (`plan_cache_mode`), for the identity feed's matcher, whose reads run outside a
    /// transaction (`FEED_PLANS`).
    generic_plans: bool,
}

/// What a feed transaction sets up (`begin_feed`), and the identity feed's matcher connection
/// for its session (`Manager::generic_plans`): its statements are index lookups and inserts by
/// arrays of ids and keys, which a plan made anew for each call's values (PostgreSQL's choice
/// for `= ANY($1)` and `unnest`) does not improve; that planning was a sixth of a small feed
/// batch's time in the database.
const FEED_PLANS: &str = "plan_cache_mode = force_generic_plan";

/// PostgreSQL: the page images a connection that writes puts in the server's log (the first
/// change of each page after a checkpoint), compressed. Nearly all of the log the identity
/// feed and a linking load write is such images of index pages; compressed, the 1M linking
/// load wrote 1.60 GB of log instead of 2.68 and the 8-client feed 332 MB instead of 446 for
/// 20,000 records, and fed 1,043 rec/s against 961 on a slow day (four pairs), within the
/// noise on a fast one (BENCHMARKS.md, sessions 37 and 38).
/// PostgreSQL lets a superuser set it, or a role granted `SET ON PARAMETER wal_compression`;
/// refused, the server's own setting holds, and that is said once.
fn compress_log(c: &mut PgConnection) {
    static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = c.batch_execute("SET wal_compression = lz4") {
        if !REFUSED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(error = %e, "wal_compression is not set for the broker's connections: the server's own setting holds");
        }
    }
}

impl ManageConnection for Manager {
    type Connection = DbConn;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConn, r2d2::Error> {
        match &self.url {
            DbUrl::Sqlite(path) => {
                // The allocator first: it can only be set before SQLite initialises.
                sqlite_memory::install();
                wal_runs::install();
                let mut c = SqliteConnection::establish(&path.to_string_lossy())
                    .map_err(r2d2::Error::ConnectionError)?;
                // busy_timeout first, so concurrent openers wait instead of failing with "locked".
                // The map covers the file's first 2 GiB, SQLite's compile-time cap (a 1M-patient
                // file); reads past it are copied into the page cache (ARCHITECTURE.md).
                c.batch_execute(&format!(
                    "PRAGMA busy_timeout = {}; PRAGMA foreign_keys = ON; PRAGMA synchronous = NORMAL; \
                     PRAGMA cache_size = -65536; PRAGMA temp_store = MEMORY; PRAGMA mmap_size = 2147418112;",
                    self.busy_timeout_ms
                ))
                .map_err(r2d2::Error::QueryError)?;
                let pages = WAL_RESTART_BYTES / sqlite_page_size(&mut c).max(512);
                c.batch_execute(&format!("PRAGMA wal_autocheckpoint = {pages};"))
                    .map_err(r2d2::Error::QueryError)?;
                Ok(DbConn::Sqlite(c))
            }
            DbUrl::Postgres(url) => {
                let mut c = PgConnection::establish(url).map_err(r2d2::Error::ConnectionError)?;
                if self.generic_plans {
                    c.batch_execute(&format!("SET {FEED_PLANS}"))
                        .map_err(r2d2::Error::QueryError)?;
                } else {
                    compress_log(&mut c);
                }
                Ok(DbConn::Postgresql(c))
            }
        }
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), r2d2::Error> {
        conn.batch_execute("SELECT 1")
            .map_err(r2d2::Error::QueryError)
    }

    /// A connection given back inside a transaction (work that failed mid-way, a rollback
    /// that failed) or with its transaction state in error is closed, not handed to the next
    /// caller.
    fn has_broken(&self, conn: &mut DbConn) -> bool {
        in_transaction(conn)
    }
}

pub type PooledConn = r2d2::PooledConnection<Manager>;

/// The connection pool, cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: r2d2::Pool<Manager>,
    url: DbUrl,
    /// SQLite has one writer: writes queue for one dedicated connection and thread, which
    /// group-commits whatever has queued up (see `writer_loop`). None on PostgreSQL, where
    /// writes run concurrently on the pool.
    writer: Option<std::sync::mpsc::SyncSender<WriteJob>>,
    /// SQLite: held while any clone of this Db lives; the checkpointer stops once it is gone.
    _alive: Option<std::sync::Arc<()>>,
    /// Counts writes (`write`) as they start and as they finish: what the identity feed's
    /// matching compares to know that nothing else wrote while it matched.
    writes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// PostgreSQL: the connections the identity feed's matcher and writer keep between
    /// batches (`Kept`).
    kept: std::sync::Arc<[Kept; 3]>,
    /// PostgreSQL: where the identity feed's matcher takes its connection, which plans
    /// generically for its whole session (`Manager::generic_plans`): it is never lent to
    /// anything else.
    feed_reads: Option<r2d2::Pool<Manager>>,
}

/// A pool connection kept between one busy loop's database calls, so that each call does not
/// check a connection out again: a checkout tests the connection with a round trip of its own
/// (two of a small feed batch's ~20). Kept only after a call that succeeded, and for a short
/// while: an unused one goes back to the pool (`Db::release_kept`), and one that failed is
/// returned at once, to be tested at its next checkout.
#[derive(Default)]
struct Kept(std::sync::Mutex<Option<(PooledConn, std::time::Instant)>>);

/// How long a kept connection is used without a test.
pub const KEEP_FOR: Duration = Duration::from_secs(1);

impl Kept {
    /// The kept connection if it is fresh. A stale one goes back to its pool, its begun
    /// transaction (`OpenWrite::commit`) ended first; so this may block.
    fn take(&self) -> Option<PooledConn> {
        let taken = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        match taken {
            Some((c, at)) if at.elapsed() < KEEP_FOR => Some(c),
            Some((mut c, _)) => {
                end_begun(&mut c);
                None
            }
            None => None,
        }
    }

    fn keep(&self, conn: PooledConn) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some((conn, std::time::Instant::now()));
    }
}

/// Which of the feed's loops a kept connection serves.
#[derive(Clone, Copy)]
enum Keeper {
    Matcher = 0,
    Writer = 1,
    /// The PostgreSQL feed's writer alternates between two connections: one commits a batch
    /// while the other writes the next (`Db::write_open`).
    SecondWriter = 2,
}

/// How often the SQLite checkpointer copies the write-ahead log into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The SQLite checkpointer: on its own connection and thread, copies committed WAL frames into
/// the database file (PASSIVE: it never blocks readers or the writer) and syncs it. The writer
/// still checkpoints when the log passes `wal_autocheckpoint` pages — only then can the log
/// restart from the beginning instead of growing — but by then nearly every frame is already
/// copied. Checkpoints on the writer's thread were a sixth of the HTTP feed's time while the
/// second core sat idle. Stops when the last clone of the Db is dropped.
fn checkpointer_loop(mut conn: DbConn, alive: std::sync::Weak<()>) {
    while alive.strong_count() > 0 {
        std::thread::sleep(CHECKPOINT_EVERY);
        if let Err(e) = conn.batch_execute("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
        }
    }
}

/// Called once the group's transaction has committed (Ok) or failed (Err).
type Completion = Box<dyn FnOnce(Result<()>) + Send>;
/// Runs one write inside the group's transaction and says how to answer its caller.
type WriteJob = Box<dyn FnOnce(&mut DbConn) -> Completion + Send>;

/// Queues a job for the SQLite writer without blocking the executor: at once when its queue
/// has room (nearly always), otherwise from a blocking thread, whose handle is returned. A job
/// the stopped writer cannot take is dropped with its answer channel, so its caller hears
/// "the database writer has stopped". (Always going through a blocking thread cost each write
/// a thread hand-off.)
fn queue_job(
    writer: &std::sync::mpsc::SyncSender<WriteJob>,
    job: WriteJob,
) -> Option<tokio::task::JoinHandle<()>> {
    match writer.try_send(job) {
        Err(std::sync::mpsc::TrySendError::Full(job)) => {
            let writer = writer.clone();
            Some(tokio::task::spawn_blocking(move || {
                let _ = writer.send(job);
            }))
        }
        Ok(()) | Err(std::sync::mpsc::TrySendError::Disconnected(_)) => None,
    }
}

/// The SQLite writer: takes every queued write, runs each in its own savepoint inside one
/// transaction, commits once, then answers each caller. A failing write rolls back only its
/// savepoint; nobody is answered before the commit, so nothing is reported written that is not.
fn writer_loop(mut conn: DbConn, jobs: std::sync::mpsc::Receiver<WriteJob>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < 64 {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let mut completions = Vec::with_capacity(batch.len());
        let committed = conn.transaction::<_, Error, _>(|c| {
            for job in batch {
                completions.push(job(c));
            }
            Ok(())
        });
        for done in completions {
            done(committed.clone());
        }
    }
}

impl Db {
    /// Connects (creating the SQLite file and its directory if needed) and runs pending migrations.
    pub fn open(config: &DatabaseConfig) -> Result<Db> {
        // One connection by hand first: r2d2 would retry a bad URL silently until its timeout.
        migrate_only(config)?;
        let url = DbUrl::parse(&config.url)?;
        let manager = Manager {
            url: url.clone(),
            busy_timeout_ms: config.busy_timeout_ms,
            generic_plans: false,
        };
        let (writer, alive) = match url {
            DbUrl::Sqlite(_) => {
                let conn = manager
                    .connect()
                    .map_err(|e| Error::config(format!("cannot open the database writer: {e}")))?;
                let (tx, rx) = std::sync::mpsc::sync_channel::<WriteJob>(1024);
                std::thread::Builder::new()
                    .name("sqlite-writer".into())
                    .spawn(move || writer_loop(conn, rx))
                    .map_err(|e| Error::config(format!("cannot start the database writer: {e}")))?;
                let checkpoints = manager.connect().map_err(|e| {
                    Error::config(format!("cannot open the database checkpointer: {e}"))
                })?;
                let alive = std::sync::Arc::new(());
                let watch = std::sync::Arc::downgrade(&alive);
                std::thread::Builder::new()
                    .name("sqlite-checkpointer".into())
                    .spawn(move || checkpointer_loop(checkpoints, watch))
                    .map_err(|e| {
                        Error::config(format!("cannot start the database checkpointer: {e}"))
                    })?;
                (Some(tx), Some(alive))
            }
            DbUrl::Postgres(_) => (None, None),
        };
        // One connection, made when the feed first matches; two at most, should a matcher
        // still hold one while the next begins.
        let feed_reads = match url {
            DbUrl::Postgres(_) => Some(
                r2d2::Pool::builder()
                    .max_size(2)
                    .min_idle(Some(0))
                    .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
                    .build_unchecked(Manager {
                        generic_plans: true,
                        ..manager.clone()
                    }),
            ),
            DbUrl::Sqlite(_) => None,
        };
        let pool = r2d2::Pool::builder()
            .max_size(config.pool_size)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_millis(config.connect_timeout_ms))
            .build(manager)
            .map_err(|e| Error::config(format!("cannot open the database pool: {e}")))?;
        Ok(Db {
            pool,
            url,
            writer,
            _alive: alive,
            writes: Default::default(),
            kept: Default::default(),
            feed_reads,
        })
    }

    pub fn url(&self) -> &DbUrl {
        &self.url
    }

    /// The embedded backend (one writer thread; `write` queues for it).
    pub fn is_sqlite(&self) -> bool {
        matches!(self.url, DbUrl::Sqlite(_))
    }

    pub fn get(&self) -> Result<PooledConn> {
        Ok(self.pool.get()?)
    }

    /// `run` on the connection `keeper` kept from its last call, if it is fresh.
    async fn run_kept<T, F>(&self, keeper: Keeper, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.on_kept(keeper, f))
            .await
            .map_err(|e| Error::internal(format!("database task failed: {e}")))?
    }

    /// `run_kept` on the calling thread, which may block.
    fn on_kept<T, F>(&self, keeper: Keeper, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T>,
    {
        let mut conn = self.checkout(keeper)?;
        end_begun(&mut conn);
        let r = f(&mut conn);
        if r.is_ok() {
            self.kept[keeper as usize].keep(conn);
        }
        r
    }

    /// The connection `keeper` kept, if it is fresh, else one from the pool (blocking): the
    /// matcher's from its own (`feed_reads`). A kept writer's connection may be inside the
    /// transaction its last commit began (`OpenWrite::commit`).
    fn checkout(&self, keeper: Keeper) -> Result<PooledConn> {
        if let Some(c) = self.kept[keeper as usize].take() {
            return Ok(c);
        }
        match (keeper, &self.feed_reads) {
            (Keeper::Matcher, Some(reads)) => Ok(reads.get()?),
            _ => Ok(self.pool.get()?),
        }
    }

    /// The identity feed's matcher reading on the connection it keeps, from a thread that
    /// may block (its own): `read_on_writer` without the trip to another thread. For
    /// PostgreSQL, where the matcher's reads do not go through the writer; the connection is
    /// one of `feed_reads`, whose sessions plan generically, so that the reads need no
    /// transaction to set that up (`ReadRequest::statement_snapshots`).
    pub fn read_kept<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T>,
    {
        self.on_kept(Keeper::Matcher, f)
    }

    /// Returns the connections the identity feed kept to the pool (it has been idle), off the
    /// async executor: a writer's begun transaction is ended first (`OpenWrite::commit`).
    pub fn release_kept(&self) {
        let kept: Vec<PooledConn> = self
            .kept
            .iter()
            .filter_map(|k| k.0.lock().unwrap_or_else(|e| e.into_inner()).take())
            .map(|(c, _)| c)
            .collect();
        if !kept.is_empty() {
            tokio::task::spawn_blocking(move || {
                for mut c in kept {
                    end_begun(&mut c);
                }
            });
        }
    }

    /// Runs blocking database work off the async executor.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.get()?;
            f(&mut conn)
        })
        .await
        .map_err(|e| Error::internal(format!("database task failed: {e}")))?
    }

    /// Runs blocking database work that writes, as one atomic unit: all of it or none. On SQLite
    /// it joins the writer's next group commit, in a savepoint of its own; on PostgreSQL it is a
    /// transaction on the pool.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        use std::sync::atomic::Ordering;
        self.writes.fetch_add(1, Ordering::SeqCst);
        let r = self.write_on(None, f).await;
        self.writes.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// The count `write` keeps.
    pub fn writes(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        std::sync::Arc::clone(&self.writes)
    }

    /// `write` without counting it: for the identity feed's own pipelined writes, which check
    /// themselves what they were matched against. On PostgreSQL, on the connection the feed's
    /// writer keeps (`Kept`).
    pub async fn write_uncounted<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.write_on(Some(Keeper::Writer), f).await
    }

    /// PostgreSQL: `f` in a feed transaction (READ COMMITTED) on one of the feed writer's two
    /// kept connections (`second`: the other one), left open for the caller to commit
    /// (`OpenWrite::commit`) or roll back (dropping it), so that the commit's wait for the
    /// log flush can overlap the next batch's statements on the other connection. Not
    /// counted in `writes`, like `write_uncounted`. Not on SQLite, whose writer commits for
    /// the whole process.
    pub async fn write_open<T, F>(&self, second: bool, f: F) -> Result<(T, OpenWrite)>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        if self.writer.is_some() {
            return Err(Error::internal("an open write needs PostgreSQL"));
        }
        let keeper = match second {
            true => Keeper::SecondWriter,
            false => Keeper::Writer,
        };
        let db = self.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let mut conn = db.checkout(keeper)?;
            // Begun by the commit before on this connection, or now.
            let begun = in_transaction(&mut conn);
            let v = {
                let DbConn::Postgresql(pg) = &mut *conn else {
                    return Err(Error::internal("an open write needs PostgreSQL"));
                };
                if !begun {
                    begin_feed(pg, "READ COMMITTED")?;
                }
                let done = f(&mut conn);
                let DbConn::Postgresql(pg) = &mut *conn else {
                    return Err(Error::internal("the connection changed backend"));
                };
                end_feed(pg, done, false)?
            };
            Ok((
                v,
                OpenWrite {
                    conn: Some(conn),
                    kept: std::sync::Arc::clone(&db.kept),
                    keeper,
                },
            ))
        })
        .await;
        opened.map_err(|e| Error::internal(format!("database task failed: {e}")))?
    }

    async fn write_on<T, F>(&self, keeper: Option<Keeper>, f: F) -> Result<T>
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(writer) = &self.writer else {
            return match keeper {
                Some(k) => {
                    self.run_kept(k, move |c| feed_transaction(c, "READ COMMITTED", f))
                        .await
                }
                None => self.run(move |c| c.transaction(f)).await,
            };
        };
        let (answer, wait) = tokio::sync::oneshot::channel::<Result<T>>();
        let job: WriteJob = Box::new(move |conn| {
            let outcome = conn.transaction(f);
            Box::new(move |committed: Result<()>| {
                let _ = answer.send(committed.and(outcome));
            })
        });
        if let Some(queued) = queue_job(writer, job) {
            queued
                .await
                .map_err(|e| Error::internal(format!("database task failed: {e}")))?;
        }
        wait.await
            .map_err(|_| Error::unavailable("the database writer has stopped"))?
    }

    /// Reads on the SQLite writer's connection (its page cache is warm: another connection's
    /// is emptied by every commit it did not make), queued behind the writes already
    /// submitted and answered as soon as it ran — it writes nothing, so waits for no commit.
    /// It may see writes of its group that are not committed yet: for callers that check
    /// what they read against `writes` (the identity feed's matcher). On PostgreSQL, a read
    /// on the connection the feed's matcher keeps (`Kept`). The job is queued before this
    /// returns; await the answer.
    pub fn read_on_writer<T, F>(
        &self,
        f: F,
    ) -> impl std::future::Future<Output = Result<T>> + Send + 'static
    where
        F: FnOnce(&mut DbConn) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (answer, wait) = tokio::sync::oneshot::channel::<Result<T>>();
        match &self.writer {
            Some(writer) => {
                let job: WriteJob = Box::new(move |conn| {
                    let _ = answer.send(conn.transaction(f));
                    Box::new(|_| {})
                });
                // A full queue: the read runs a little later, which costs time, not
                // correctness.
                let _ = queue_job(writer, job);
            }
            None => {
                let db = self.clone();
                tokio::spawn(async move {
                    let _ = answer.send(db.run_kept(Keeper::Matcher, f).await);
                });
            }
        }
        async move {
            wait.await
                .map_err(|_| Error::unavailable("the database writer has stopped"))?
        }
    }

    /// For /readyz.
    pub async fn ping(&self) -> Result<()> {
        self.run(|c| c.batch_execute("SELECT 1").map_err(Error::from))
            .await
    }
}

/// `hie migrate`: connects once and runs pending migrations.
pub fn migrate_only(config: &DatabaseConfig) -> Result<usize> {
    let url = DbUrl::parse(&config.url)?;
    if let DbUrl::Sqlite(path) = &url {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(format!(
                    "cannot create database directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
    }
    let manager = Manager {
        url: url.clone(),
        busy_timeout_ms: config.busy_timeout_ms,
        generic_plans: false,
    };
    let mut conn = manager.connect().map_err(|e| {
        Error::config(format!(
            "cannot connect to the database {}: {e}",
            url.display()
        ))
    })?;
    migrate(&mut conn)
}

/// How much WAL a SQLite writer lets grow before its own checkpoint, after which the log
/// restarts from the beginning (`wal_autocheckpoint`, which counts pages: 64K pages of 4 KiB,
/// 128K of 2 KiB). Each restart costs the writer a sync; with half as much log between them the
/// 1M HTTP feed ran 5–10 % slower.
const WAL_RESTART_BYTES: i64 = 256 << 20;

fn sqlite_page_size(c: &mut SqliteConnection) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct PageSize {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        page_size: i64,
    }
    diesel::RunQueryDsl::load::<PageSize>(
        diesel::sql_query("SELECT page_size FROM pragma_page_size"),
        c,
    )
    .ok()
    .and_then(|rows| rows.into_iter().next())
    .map_or(4096, |r| r.page_size)
}

/// The page size of a new SQLite database (an existing file keeps its own: SQLite fixes it when
/// the file is created). The identity feed's commits are mostly index pages dirtied at random —
/// a dozen per record — and each goes to the WAL whole: 2 KiB pages halve those writes against
/// the default 4 KiB, and the 1M HTTP feed ran 7 % faster (1,024-byte pages: no faster, deeper
/// trees); a bulk import, which dirties each page many times per commit, ran ~5 % slower.
const SQLITE_PAGE_SIZE: u32 = 2048;

/// Runs pending migrations. On PostgreSQL an advisory lock keeps several brokers starting at
/// once from migrating concurrently; SQLite is switched to WAL here, once.
/// The steps SQL cannot do (`mpi::rekey_blocking_keys`) run after them, under the same lock, and
/// any index or constraint an initial import deferred and did not build
/// (`mpi::restore_load_indexes`).
pub fn migrate(conn: &mut DbConn) -> Result<usize> {
    let failed =
        |e: &dyn std::fmt::Display| Error::config(format!("database migration failed: {e}"));
    let pg = !conn.is_sqlite();
    if pg {
        conn.batch_execute("SELECT pg_advisory_lock(727274)")?;
    }
    let applied = match &mut *conn {
        DbConn::Sqlite(c) => c
            .batch_execute(&format!(
                "PRAGMA page_size = {SQLITE_PAGE_SIZE}; PRAGMA journal_mode = WAL;"
            ))
            .map_err(|e| failed(&e))
            .and_then(|_| {
                c.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|v| v.len())
                    .map_err(|e| failed(&e))
            }),
        DbConn::Postgresql(c) => c
            .run_pending_migrations(POSTGRES_MIGRATIONS)
            .map(|v| v.len())
            .map_err(|e| failed(&e)),
    };
    let rekeyed = applied.and_then(|n| {
        // Those an initial `hie import` deferred and did not get to build (it stopped midway).
        let built = mpi::restore_load_indexes(conn, None).map_err(|e| failed(&e))?;
        if built > 0 {
            tracing::info!(
                built,
                "indexes and constraints an import had deferred built"
            );
        }
        let moved = mpi::rekey_blocking_keys(conn, mpi::REKEY_PAGE).map_err(|e| failed(&e))?;
        if moved > 0 {
            tracing::info!(keys = moved, "blocking keys filed by key id");
        }
        Ok(n)
    });
    if pg {
        conn.batch_execute("SELECT pg_advisory_unlock(727274)")?;
    }
    rekeyed
}

/// A write transaction. On SQLite it takes the write lock first (a deferred transaction that
/// reads before it writes can fail with SQLITE_BUSY instead of waiting).
pub fn write_tx<T, F>(conn: &mut DbConn, f: F) -> Result<T>
where
    F: FnOnce(&mut DbConn) -> Result<T>,
{
    conn.transaction(|conn| {
        if conn.is_sqlite() {
            audit::lock_head(conn)?;
        }
        f(conn)
    })
}

/// Reads in one snapshot: on PostgreSQL, outside any transaction, a REPEATABLE READ, READ
/// ONLY transaction begun in the same round trip as its settings (`feed_transaction`);
/// otherwise `conn.transaction` (on SQLite a transaction is a snapshot; inside another, a
/// savepoint). For the identity feed's matcher.
pub fn snapshot<T, F>(conn: &mut DbConn, f: F) -> Result<T>
where
    F: FnOnce(&mut DbConn) -> Result<T>,
{
    feed_transaction(conn, "REPEATABLE READ, READ ONLY", f)
}

/// A transaction of the identity feed's (`isolation`: PostgreSQL's mode, after `BEGIN
/// ISOLATION LEVEL`). On PostgreSQL, outside any transaction, it is begun and set up in one
/// round trip — diesel's `BEGIN` and a `SET TRANSACTION` after it were two — and its statements
/// run on generic plans: they are index lookups and inserts by arrays of ids and keys, which a
/// plan made anew for each call's values (PostgreSQL's choice for `= ANY($1)` and `unnest`)
/// does not improve; that planning was a sixth of a small feed batch's time in the database.
/// Otherwise `conn.transaction`.
pub fn feed_transaction<T, F>(conn: &mut DbConn, isolation: &str, f: F) -> Result<T>
where
    F: FnOnce(&mut DbConn) -> Result<T>,
{
    let outermost = !in_transaction(conn);
    let pg = match conn {
        DbConn::Postgresql(pg) if outermost => pg,
        _ => return conn.transaction(f),
    };
    begin_feed(pg, isolation)?;
    let done = f(conn);
    let DbConn::Postgresql(pg) = conn else {
        return Err(Error::internal("the connection changed backend"));
    };
    end_feed(pg, done, true)
}

/// Begins a feed transaction (`feed_transaction`) on PostgreSQL, in one round trip.
fn begin_feed(pg: &mut diesel::PgConnection, isolation: &str) -> Result<()> {
    use diesel::connection::AnsiTransactionManager;
    AnsiTransactionManager::begin_transaction_sql(
        pg,
        &format!("BEGIN ISOLATION LEVEL {isolation}; SET LOCAL {FEED_PLANS}"),
    )?;
    Ok(())
}

/// Whether diesel knows the connection to be inside a transaction (or its transaction state to
/// be in error).
fn in_transaction(conn: &mut DbConn) -> bool {
    use diesel::connection::{TransactionManager, TransactionManagerStatus};
    !matches!(
        <DbConn as Connection>::TransactionManager::transaction_manager_status_mut(conn),
        TransactionManagerStatus::Valid(v) if v.transaction_depth().is_none()
    )
}

/// Commits the feed writer's transaction and begins its next one on the same connection, in one
/// round trip: the next batch on it then starts with its first statement (a round trip fewer
/// on the writer's path; the commit itself overlaps the next batch's statements on the other
/// connection). The begun transaction has done nothing — no snapshot (READ COMMITTED takes one
/// a statement), no lock, no transaction id — until the next batch; `end_begun` ends it on a
/// connection that leaves the feed. If the commit fails, nothing after it runs and the
/// server's transaction is over; diesel is told so by a rollback, and the error is returned.
fn commit_and_begin(pg: &mut diesel::PgConnection) -> Result<()> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    // diesel's depth stays at one throughout: one transaction ends, the next begins.
    let sql = format!("COMMIT; BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL {FEED_PLANS}");
    match pg.batch_execute(&sql) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = AnsiTransactionManager::rollback_transaction(pg);
            Err(e.into())
        }
    }
}

/// Ends a transaction begun ahead of its work (`commit_and_begin`), so that the connection goes
/// back to the pool (or to other work) outside one; a failed rollback leaves it marked broken,
/// and the pool closes it.
fn end_begun(conn: &mut DbConn) {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    if !in_transaction(conn) {
        return;
    }
    if let DbConn::Postgresql(pg) = conn {
        let _ = AnsiTransactionManager::rollback_transaction(pg);
    }
}

/// Ends a feed transaction after its work: rolled back if the work failed (its error is the
/// one reported; a failed rollback leaves the connection marked broken, and it is not kept),
/// otherwise committed when `commit`, else left open for the caller.
fn end_feed<T>(pg: &mut diesel::PgConnection, done: Result<T>, commit: bool) -> Result<T> {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    match done {
        Ok(v) => {
            if commit {
                AnsiTransactionManager::commit_transaction(pg)?;
            }
            Ok(v)
        }
        Err(e) => {
            let _ = AnsiTransactionManager::rollback_transaction(pg);
            Err(e)
        }
    }
}

/// A PostgreSQL write transaction left open by `Db::write_open`. `commit` commits it and keeps
/// its connection for the next batch; dropped, it is rolled back and its connection goes back
/// to the pool (which tests it before giving it out again).
pub struct OpenWrite {
    conn: Option<PooledConn>,
    kept: std::sync::Arc<[Kept; 3]>,
    keeper: Keeper,
}

impl OpenWrite {
    /// Commits, off the async executor, and begins the connection's next feed transaction in
    /// the same round trip (`commit_and_begin`).
    pub async fn commit(mut self) -> Result<()> {
        tokio::task::spawn_blocking(move || {
            let Some(mut conn) = self.conn.take() else {
                return Err(Error::internal("the open write was already ended"));
            };
            let DbConn::Postgresql(pg) = &mut *conn else {
                return Err(Error::internal("an open write needs PostgreSQL"));
            };
            commit_and_begin(pg)?;
            self.kept[self.keeper as usize].keep(conn);
            Ok(())
        })
        .await
        .map_err(|e| Error::internal(format!("database task failed: {e}")))?
    }

    /// Rolls back, off the async executor.
    pub async fn rollback(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

impl Drop for OpenWrite {
    /// Still holding its connection, the write was neither committed nor ended: its
    /// transaction is open.
    fn drop(&mut self) {
        use diesel::connection::{AnsiTransactionManager, TransactionManager};
        if let Some(DbConn::Postgresql(pg)) = self.conn.as_deref_mut() {
            let _ = AnsiTransactionManager::rollback_transaction(pg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::RunQueryDsl;

    #[test]
    fn urls_pick_the_backend() {
        assert_eq!(
            DbUrl::parse("sqlite://data/hie.db").ok(),
            Some(DbUrl::Sqlite("data/hie.db".into()))
        );
        assert!(matches!(
            DbUrl::parse("postgresql://u@h/db"),
            Ok(DbUrl::Postgres(_))
        ));
        assert!(DbUrl::parse("mysql://x").is_err());
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }

    fn sqlite_pragma(db: &Db, pragma: &str) -> String {
        #[derive(diesel::QueryableByName)]
        struct Value {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        let mut conn = db.get().expect("connection");
        let rows: Vec<Value> = diesel::sql_query(format!(
            "SELECT CAST({pragma} AS TEXT) AS v FROM pragma_{pragma}"
        ))
        .load(&mut *conn)
        .expect("pragma");
        rows.into_iter().next().map(|r| r.v).unwrap_or_default()
    }

    #[test]
    fn a_new_sqlite_database_gets_small_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = |name: &str| DatabaseConfig {
            url: format!("sqlite://{}", dir.path().join(name).display()),
            pool_size: 2,
            connect_timeout_ms: 5_000,
            busy_timeout_ms: 5_000,
        };
        let fresh = Db::open(&config("new.db")).expect("open");
        assert_eq!(
            sqlite_pragma(&fresh, "page_size"),
            SQLITE_PAGE_SIZE.to_string()
        );
        assert_eq!(sqlite_pragma(&fresh, "journal_mode"), "wal");
        // The log restarts after as many bytes whatever the page size.
        #[derive(diesel::QueryableByName)]
        struct Frames {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            wal_autocheckpoint: i64,
        }
        // Every connection is opened alike (the writer's too).
        let frames = |db: &Db| {
            let mut conn = db.get().expect("connection");
            diesel::sql_query("PRAGMA wal_autocheckpoint")
                .load::<Frames>(&mut *conn)
                .ok()
                .and_then(|rows| rows.into_iter().next())
                .map(|r| r.wal_autocheckpoint)
        };
        assert_eq!(frames(&fresh), Some(WAL_RESTART_BYTES / 2048));

        // A database made before the change (default 4 KiB pages) opens and migrates as it is.
        let old = dir.path().join("old.db");
        let mut c = SqliteConnection::establish(&old.to_string_lossy()).expect("create");
        c.batch_execute("PRAGMA page_size = 4096; CREATE TABLE before_us (x INTEGER);")
            .expect("old file");
        drop(c);
        let old = Db::open(&config("old.db")).expect("open old");
        assert_eq!(sqlite_pragma(&old, "page_size"), "4096");
        assert_eq!(sqlite_pragma(&old, "journal_mode"), "wal");
        assert_eq!(frames(&old), Some(WAL_RESTART_BYTES / 4096));
    }

    /// A connection given back to the pool inside a transaction (work that failed half way)
    /// is closed: the next caller gets one outside any transaction, not the half-done one.
    #[test]
    fn a_connection_given_back_inside_a_transaction_is_not_handed_out_again() {
        use diesel::connection::{
            AnsiTransactionManager, TransactionManager, TransactionManagerStatus,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open(&DatabaseConfig {
            url: format!("sqlite://{}", dir.path().join("hie.db").display()),
            pool_size: 1,
            connect_timeout_ms: 5_000,
            busy_timeout_ms: 5_000,
        })
        .expect("open");
        let depth = |conn: &mut DbConn| match AnsiTransactionManager::transaction_manager_status_mut(
            match conn {
                DbConn::Sqlite(c) => c,
                DbConn::Postgresql(_) => unreachable!("a SQLite test"),
            },
        ) {
            TransactionManagerStatus::Valid(v) => v.transaction_depth().map(|d| d.get()),
            TransactionManagerStatus::InError => Some(u32::MAX),
        };
        {
            let mut conn = db.get().expect("connection");
            if let DbConn::Sqlite(c) = &mut *conn {
                AnsiTransactionManager::begin_transaction(c).expect("begin");
            }
            assert_eq!(depth(&mut conn), Some(1));
        }
        let mut again = db.get().expect("a connection again");
        assert_eq!(depth(&mut again), None);
    }
}

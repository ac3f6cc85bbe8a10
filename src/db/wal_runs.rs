//! SQLite's write-ahead log written in runs, not frame by frame.
//!
//! SQLite appends each WAL frame with two `pwrite` calls, its 24-byte header and then the page,
//! and a frame (4,120 bytes with 4 KiB pages; 2,072 with the 2 KiB of databases made since)
//! straddles two pages of the kernel's page cache: a commit of 72 frames (a feed batch of three
//! records at 1M) made 145 system calls and ~216 page-cache updates, a fifth of the writer
//! thread's time (BENCHMARKS.md, session 12). This VFS wraps
//! the platform's default one and changes one thing: a WAL file's appended frames collect in
//! memory and reach the file as one write.
//!
//! Nothing committed waits in memory. A frame header whose commit field is set (bytes 4..8,
//! the database size after the commit) is written out at once with everything before it, and
//! the commit frame's page after it goes straight to the file, so a transaction is wholly in
//! the file (in the kernel's page cache, as before: `synchronous = NORMAL`) before
//! `walFrames` publishes it in the shared WAL index for other connections and processes. Any
//! other use of the file first writes out what waits: a read (SQLite reads back frames a
//! spilled transaction wrote, and rewrites checksums), a sync, a size, a truncation, a file
//! control, the close. A write that does not continue the run also writes the run out first,
//! so writes reach the file in SQLite's order. Frames not yet written out belong to a
//! transaction nobody else can see; a crash then loses only that transaction, as a crash
//! before its commit would. The database file and every other file are the default VFS's own,
//! untouched.

use libsqlite3_sys as ffi;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A run is written out once it holds this much (a large transaction spilling pages).
const MAX_RUN: usize = 1 << 20;
/// The most the default VFS writes in one call: the unix VFS masks a write's length to 17
/// bits (`seekAndWriteFd`), so a longer one would be cut short.
const MAX_WRITE: usize = 0x1f000;
/// A WAL frame header's size; SQLite writes nothing else of this size to a WAL file.
const FRAME_HEADER: usize = 24;

/// The state of one open WAL file, kept after the default VFS's own file object.
struct WalFile {
    inner: *const ffi::sqlite3_io_methods,
    run: Vec<u8>,
    /// The file offset of `run[0]`.
    start: i64,
    /// The next write goes straight to the file: the page of a commit frame.
    direct: bool,
}

/// The wrapped default VFS (`*mut sqlite3_vfs`, as an address) and where `WalFile` starts in
/// a file object; set before the VFS is registered, so every `open` finds them.
static WRAPPED: AtomicUsize = AtomicUsize::new(0);
static OFFSET: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Registers the VFS as the default, once, before the first connection opens. If SQLite has
/// no default VFS to wrap, nothing changes.
pub fn install() {
    INSTALLED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find initialises SQLite and returns a VFS that lives as long as
        // the process (or null); the copy registered below is leaked, so it lives as long too.
        unsafe {
            let inner = ffi::sqlite3_vfs_find(std::ptr::null());
            if inner.is_null() {
                return false;
            }
            let align = std::mem::align_of::<WalFile>();
            let Ok(size) = usize::try_from((*inner).szOsFile) else {
                return false;
            };
            let offset = size.div_ceil(align) * align;
            let Ok(total) = c_int::try_from(offset + std::mem::size_of::<WalFile>()) else {
                return false;
            };
            let mut vfs: ffi::sqlite3_vfs = *inner;
            vfs.szOsFile = total;
            vfs.zName = c"hie-wal-runs".as_ptr();
            vfs.pNext = std::ptr::null_mut();
            vfs.xOpen = Some(open);
            WRAPPED.store(inner as usize, Ordering::SeqCst);
            OFFSET.store(offset, Ordering::SeqCst);
            ffi::sqlite3_vfs_register(Box::leak(Box::new(vfs)), 1) == ffi::SQLITE_OK
        }
    });
}

/// Whether connections opened from now on write their WAL in runs.
#[cfg(test)]
fn installed() -> bool {
    INSTALLED.get().copied().unwrap_or(false)
}

unsafe fn state<'a>(f: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    &mut *((f as *mut u8).add(OFFSET.load(Ordering::Relaxed)) as *mut WalFile)
}

unsafe fn inner<'a>(f: *mut ffi::sqlite3_file) -> &'a ffi::sqlite3_io_methods {
    &*state(f).inner
}

unsafe extern "C" fn open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    f: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let wrapped = WRAPPED.load(Ordering::SeqCst) as *mut ffi::sqlite3_vfs;
    if wrapped.is_null() {
        return ffi::SQLITE_CANTOPEN;
    }
    let Some(inner_open) = (*wrapped).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = inner_open(wrapped, name, f, flags, out_flags);
    if rc == ffi::SQLITE_OK && flags & ffi::SQLITE_OPEN_WAL != 0 && !(*f).pMethods.is_null() {
        let at = (f as *mut u8).add(OFFSET.load(Ordering::SeqCst)) as *mut WalFile;
        at.write(WalFile {
            inner: (*f).pMethods,
            run: Vec::new(),
            start: 0,
            direct: false,
        });
        (*f).pMethods = &WAL_METHODS;
    }
    rc
}

/// Writes out the run waiting in memory, if any, in writes the default VFS takes whole.
unsafe fn write_out(f: *mut ffi::sqlite3_file) -> c_int {
    let w = state(f);
    if w.run.is_empty() {
        return ffi::SQLITE_OK;
    }
    let Some(write) = (*w.inner).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let mut rc = ffi::SQLITE_OK;
    let mut at = w.start;
    for chunk in w.run.chunks(MAX_WRITE) {
        // A chunk is at most MAX_WRITE bytes: it fits a c_int.
        let len = chunk.len() as c_int;
        rc = write(f, chunk.as_ptr() as *const c_void, len, at);
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += i64::from(len);
    }
    w.run.clear();
    rc
}

unsafe extern "C" fn write(
    f: *mut ffi::sqlite3_file,
    data: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let w = state(f);
    let Some(inner_write) = (*w.inner).xWrite else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    let Ok(len) = usize::try_from(amount) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    if w.direct {
        w.direct = false;
        return written_out(f, || Some(inner_write(f, data, amount, offset)));
    }
    let end = w.start + w.run.len() as i64;
    if !w.run.is_empty() && offset != end {
        let rc = write_out(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let w = state(f);
    if w.run.is_empty() {
        w.start = offset;
    }
    let bytes = std::slice::from_raw_parts(data as *const u8, len);
    w.run.extend_from_slice(bytes);
    let commit = len == FRAME_HEADER && bytes[4..8] != [0, 0, 0, 0];
    if commit {
        w.direct = true;
        return write_out(f);
    }
    if w.run.len() >= MAX_RUN {
        return write_out(f);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(f: *mut ffi::sqlite3_file) -> c_int {
    let written = write_out(f);
    let w = state(f);
    let methods = w.inner;
    std::ptr::drop_in_place(w as *mut WalFile);
    // SQLite calls xClose once; the default VFS's own close follows with its methods.
    (*f).pMethods = methods;
    let closed = match (*methods).xClose {
        Some(c) => c(f),
        None => ffi::SQLITE_OK,
    };
    if written != ffi::SQLITE_OK {
        written
    } else {
        closed
    }
}

/// Writes out what waits, then calls the default VFS's method.
unsafe fn written_out(f: *mut ffi::sqlite3_file, call: impl FnOnce() -> Option<c_int>) -> c_int {
    match write_out(f) {
        ffi::SQLITE_OK => call().unwrap_or(ffi::SQLITE_IOERR),
        rc => rc,
    }
}

unsafe extern "C" fn read(
    f: *mut ffi::sqlite3_file,
    data: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    written_out(f, || Some(inner(f).xRead?(f, data, amount, offset)))
}

unsafe extern "C" fn truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    written_out(f, || Some(inner(f).xTruncate?(f, size)))
}

unsafe extern "C" fn sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    written_out(f, || Some(inner(f).xSync?(f, flags)))
}

unsafe extern "C" fn file_size(f: *mut ffi::sqlite3_file, size: *mut ffi::sqlite3_int64) -> c_int {
    written_out(f, || Some(inner(f).xFileSize?(f, size)))
}

unsafe extern "C" fn lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match inner(f).xLock {
        Some(l) => l(f, level),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    match inner(f).xUnlock {
        Some(u) => u(f, level),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    match inner(f).xCheckReservedLock {
        Some(c) => c(f, out),
        None => {
            *out = 0;
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn file_control(f: *mut ffi::sqlite3_file, op: c_int, arg: *mut c_void) -> c_int {
    written_out(f, || Some(inner(f).xFileControl?(f, op, arg)))
}

unsafe extern "C" fn sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    match inner(f).xSectorSize {
        Some(s) => s(f),
        None => 4096,
    }
}

unsafe extern "C" fn device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    match inner(f).xDeviceCharacteristics {
        Some(d) => d(f),
        None => 0,
    }
}

/// Version 1: a WAL file is never memory-mapped and has no shared memory of its own (the
/// WAL index is the database file's), so SQLite calls none of the later methods on it.
static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, RunQueryDsl, SqliteConnection};
    use std::io::{BufRead, Write};

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }

    #[derive(diesel::QueryableByName)]
    struct Check {
        #[diesel(sql_type = diesel::sql_types::Text)]
        integrity_check: String,
    }

    fn connect(path: &std::path::Path) -> SqliteConnection {
        install();
        assert!(installed(), "the WAL VFS is the default");
        let mut c = SqliteConnection::establish(&path.to_string_lossy()).expect("open");
        c.batch_execute(
            "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;",
        )
        .expect("pragmas");
        c
    }

    fn count(c: &mut SqliteConnection) -> i64 {
        diesel::sql_query("SELECT count(*) AS n FROM t")
            .get_result::<Count>(c)
            .expect("count")
            .n
    }

    fn integrity(c: &mut SqliteConnection) -> String {
        diesel::sql_query("PRAGMA integrity_check")
            .get_result::<Check>(c)
            .expect("integrity_check")
            .integrity_check
    }

    /// Another connection sees each commit as soon as it is made; a transaction that spilled
    /// frames into the log and rolled back leaves nothing; the log restarts and is
    /// checkpointed; the file stays sound.
    #[test]
    fn commits_are_visible_at_once_and_spills_roll_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let mut w = connect(&path);
        let mut r = connect(&path);
        w.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
            .expect("create");
        for i in 1..=200i64 {
            w.batch_execute(&format!(
                "INSERT INTO t (body) VALUES (randomblob({}))",
                100 + (i * 397) % 9000
            ))
            .expect("insert");
            assert_eq!(count(&mut r), i, "the reader sees commit {i}");
        }
        // A transaction larger than the page cache spills frames before its commit.
        w.batch_execute("PRAGMA cache_size = 10").expect("cache");
        let spilled = w.transaction::<(), diesel::result::Error, _>(|c| {
            c.batch_execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
                 INSERT INTO t (body) SELECT randomblob(3000) FROM n",
            )?;
            c.batch_execute("UPDATE t SET body = randomblob(50) WHERE id % 7 = 0")?;
            assert_eq!(count(c), 2200);
            Err(diesel::result::Error::RollbackTransaction)
        });
        assert!(spilled.is_err());
        assert_eq!(count(&mut w), 200);
        assert_eq!(count(&mut r), 200);
        // The same, committed; rewriting pages it already wrote makes SQLite rewrite the
        // frames' checksums at commit.
        w.transaction::<_, diesel::result::Error, _>(|c| {
            c.batch_execute(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) \
                 INSERT INTO t (body) SELECT randomblob(3000) FROM n",
            )?;
            c.batch_execute("UPDATE t SET body = randomblob(50) WHERE id % 7 = 0")
        })
        .expect("large commit");
        assert_eq!(count(&mut r), 2200);
        r.batch_execute("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint");
        w.batch_execute("INSERT INTO t (body) VALUES (x'01')")
            .expect("after restart");
        assert_eq!(count(&mut r), 2201);
        drop(w);
        drop(r);
        let mut again = connect(&path);
        assert_eq!(count(&mut again), 2201);
        assert_eq!(integrity(&mut again), "ok");
    }

    const CHILD: &str = "HIE_WAL_RUNS_CHILD_DB";

    /// Rows of batch `i`: every tenth commit is a large one that spills.
    fn rows_of(i: i64) -> i64 {
        if i % 10 == 0 {
            300
        } else {
            1
        }
    }

    /// A writer killed at an arbitrary moment (SIGKILL, no chance to write anything out) loses
    /// no commit it had seen succeed, and leaves a sound database with every commit whole.
    /// Three rounds on one database; the test runs itself as the child.
    #[test]
    fn a_killed_writer_loses_no_acknowledged_commit() {
        if let Ok(path) = std::env::var(CHILD) {
            let mut c = connect(std::path::Path::new(&path));
            c.batch_execute("PRAGMA cache_size = 20").expect("cache");
            let from = diesel::sql_query("SELECT coalesce(max(batch), 0) AS n FROM t")
                .get_result::<Count>(&mut c)
                .expect("max")
                .n;
            let mut out = std::io::stdout();
            for i in from + 1.. {
                c.batch_execute(&format!(
                    "BEGIN; WITH RECURSIVE n(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM n \
                     WHERE k < {}) INSERT INTO t (batch, body) SELECT {i}, randomblob(900) \
                     FROM n; COMMIT;",
                    rows_of(i)
                ))
                .expect("child commit");
                writeln!(out, "acknowledged {i}").expect("stdout");
                out.flush().expect("flush");
            }
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        connect(&path)
            .batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, batch INTEGER, body BLOB)")
            .expect("create");
        let exe = std::env::current_exe().expect("test binary");
        for round in 1..=3i64 {
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "db::wal_runs::tests::a_killed_writer_loses_no_acknowledged_commit",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD, &path)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn child");
            let stdout = child.stdout.take().expect("child stdout");
            let mut last = 0i64;
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.expect("read child");
                if let Some(n) = line.strip_prefix("acknowledged ") {
                    last = n.parse().expect("number");
                    if last >= round * 157 {
                        break;
                    }
                }
            }
            child.kill().expect("kill child");
            let _ = child.wait();
            assert!(last > 0, "round {round}: the child committed nothing");
            let mut c = connect(&path);
            assert_eq!(integrity(&mut c), "ok", "round {round}");
            let have = diesel::sql_query("SELECT coalesce(max(batch), 0) AS n FROM t")
                .get_result::<Count>(&mut c)
                .expect("max")
                .n;
            assert!(
                have >= last,
                "round {round}: acknowledged {last}, found {have}"
            );
            let expected: i64 = (1..=have).map(rows_of).sum();
            assert_eq!(count(&mut c), expected, "round {round}: every commit whole");
        }
    }
}

//! SQLite's own allocations (its page cache above all) go to mimalloc, the allocator the rest
//! of the broker uses, instead of the C library's `malloc`.
//!
//! With glibc's `malloc`, the pages of SQLite's page cache that a commit or a cache shrink gave
//! back were returned to the system and faulted in again, zeroed by the kernel, on the next
//! touch (the linking member's 1M import ran ~13 % slower). mimalloc keeps per-thread heaps
//! and, in `hie import`, keeps what it frees (`cli::keep_freed_memory`).

use libsqlite3_sys as ffi;
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Hands SQLite mimalloc's functions, once, before SQLite initialises (its first connection).
/// Called after that, SQLite refuses (`SQLITE_MISUSE`) and keeps the allocator it has, which
/// is harmless: whether it took is returned for the tests.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        let methods = ffi::sqlite3_mem_methods {
            xMalloc: Some(x_malloc),
            xFree: Some(x_free),
            xRealloc: Some(x_realloc),
            xSize: Some(x_size),
            xRoundup: Some(x_roundup),
            xInit: Some(x_init),
            xShutdown: Some(x_shutdown),
            pAppData: std::ptr::null_mut(),
        };
        // SAFETY: SQLITE_CONFIG_MALLOC takes a pointer to an `sqlite3_mem_methods`, which
        // SQLite copies; every function in it is a valid implementation of its contract
        // (8-byte aligned blocks, `xSize` the block's usable size, null on failure).
        unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &methods) == ffi::SQLITE_OK }
    })
}

unsafe extern "C" fn x_malloc(n: c_int) -> *mut c_void {
    match usize::try_from(n) {
        // SAFETY: any size may be asked of mimalloc; it returns null when it cannot serve it.
        Ok(n) => unsafe { libmimalloc_sys::mi_malloc(n) },
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn x_free(p: *mut c_void) {
    // SAFETY: SQLite frees only blocks `x_malloc` or `x_realloc` gave it (or null).
    unsafe { libmimalloc_sys::mi_free(p) }
}

unsafe extern "C" fn x_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    match usize::try_from(n) {
        // SAFETY: `p` is a block of this allocator (SQLite never reallocates null here).
        Ok(n) => unsafe { libmimalloc_sys::mi_realloc(p, n) },
        Err(_) => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn x_size(p: *mut c_void) -> c_int {
    // SAFETY: `p` is a live block of this allocator, or null (whose size mimalloc gives as 0).
    let size = unsafe { libmimalloc_sys::mi_usable_size(p) };
    c_int::try_from(size).unwrap_or(c_int::MAX)
}

/// SQLite asks what a request would really get; 8-byte multiples, as its own allocator.
unsafe extern "C" fn x_roundup(n: c_int) -> c_int {
    n.saturating_add(7) & !7
}

unsafe extern "C" fn x_init(_: *mut c_void) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_shutdown(_: *mut c_void) {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether SQLite took the allocator depends on what ran first in this test process (a
    /// test may have opened SQLite before); either way, what `install` reports is what SQLite
    /// does. (In the broker the pool's first connection installs it: `Manager::connect`.)
    #[test]
    fn sqlite_allocates_where_install_says() {
        let took = install();
        // SAFETY: a block asked of SQLite and given back to it.
        unsafe {
            let p = ffi::sqlite3_malloc(100);
            assert!(!p.is_null());
            assert_eq!(libmimalloc_sys::mi_is_in_heap_region(p), took);
            assert!(ffi::sqlite3_msize(p) >= 100);
            ffi::sqlite3_free(p);
        }
    }
}

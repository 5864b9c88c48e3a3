//! A safe wrapper over the few SQLite C calls that the enqueue writer
//! (`tinyfat-store`'s group commit) makes: open a connection, run plain SQL,
//! prepare statements once, bind text, integers and NULL, step, read text
//! and integer columns.
//!
//! Why this crate exists: sqlx runs each SQLite connection on a worker
//! thread of its own, so every statement is a round trip between threads.
//! With the writer's five statements per batch on 2 busy cores that cost
//! about 0.4 ms of a 2 ms batch (`BENCHMARKS.md`, ingest). The writer owns
//! one connection on one OS thread and calls SQLite directly through this
//! crate instead. Why `unsafe`: it is FFI; every `unsafe` block states the
//! contract it relies on. Everything else in the project goes through sqlx.
//!
//! It also owns the busy handler that every connection of the project uses
//! (`busy_wait`), this one's and sqlx's pool connections' alike
//! (`set_busy_handler`): SQLite's own (`sqlite3_busy_timeout`) sleeps 1 ms,
//! then 2, 5, 10 … between tries, so a writer that meets a lock held for a
//! 0.3 ms commit waited 1–3 ms (seen in every web chat turn that started
//! while the previous one still wrote). `busy_wait` tries again after
//! 20 µs, doubling up to 1 ms, until the timeout has been slept.
//!
//! What it must not do: grow into a general driver. No pooling, no async
//! beyond installing the busy handler on a sqlx connection, no type mapping
//! beyond text, `i64` and NULL. The library is the one `libsqlite3-sys`
//! links (bundled, thread-safe), shared with sqlx.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::rc::Rc;
use std::time::Duration;

use libsqlite3_sys as ffi;

/// An error SQLite reported, with its extended result code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sqlite error {code}: {message}")]
pub struct Error {
    /// SQLite's extended result code (`SQLITE_BUSY` is 5, ...).
    pub code: i32,
    pub message: String,
}

impl Error {
    /// `SQLITE_BUSY` or one of its extended codes: another connection held
    /// the lock past the busy timeout.
    pub fn is_busy(&self) -> bool {
        self.code & 0xff == ffi::SQLITE_BUSY
    }

    fn misuse(message: &str) -> Self {
        Self { code: ffi::SQLITE_MISUSE, message: message.to_owned() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The open `sqlite3*`, closed when the connection and its last statement
/// are gone (statements hold an `Rc` to it).
struct Handle(NonNull<ffi::sqlite3>);

impl Handle {
    fn ptr(&self) -> *mut ffi::sqlite3 {
        self.0.as_ptr()
    }

    /// The connection's last error, for a call that returned `code`.
    fn error(&self, code: c_int) -> Error {
        // SAFETY: the handle is open (closed only in Drop); errmsg returns a
        // NUL-terminated string owned by SQLite, valid until the next call on
        // this connection, and copied here at once.
        let message = unsafe { CStr::from_ptr(ffi::sqlite3_errmsg(self.ptr())) }.to_string_lossy().into_owned();
        // SAFETY: as above.
        let extended = unsafe { ffi::sqlite3_extended_errcode(self.ptr()) };
        Error { code: if extended & 0xff == code & 0xff { extended } else { code }, message }
    }

    fn check(&self, code: c_int) -> Result<()> {
        if code == ffi::SQLITE_OK { Ok(()) } else { Err(self.error(code)) }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: every statement holds an Rc of this handle, so all are
        // finalized before it drops, and close succeeds.
        unsafe { ffi::sqlite3_close(self.ptr()) };
    }
}

/// One SQLite connection. `Send`-free on purpose: it lives and dies on the
/// thread that opened it.
pub struct Connection {
    handle: Rc<Handle>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens an existing database file for reading and writing (it is not
    /// created: the caller's migrations made it), waiting up to
    /// `busy_timeout` for locks other connections hold.
    pub fn open(path: &Path, busy_timeout: Duration) -> Result<Self> {
        let path = path.to_str().ok_or_else(|| Error::misuse("database path is not UTF-8"))?;
        let path = CString::new(path).map_err(|_| Error::misuse("database path contains NUL"))?;
        let mut db = ptr::null_mut();
        let flags = ffi::SQLITE_OPEN_READWRITE | ffi::SQLITE_OPEN_NOMUTEX;
        // SAFETY: `path` is NUL-terminated and outlives the call; `db`
        // receives a handle (possibly even on error, closed below).
        let code = unsafe { ffi::sqlite3_open_v2(path.as_ptr(), &mut db, flags, ptr::null()) };
        let Some(db) = NonNull::new(db) else {
            return Err(Error { code, message: "out of memory opening the database".to_owned() });
        };
        let handle = Rc::new(Handle(db));
        handle.check(code)?;
        // SAFETY: the handle is open and used by this thread only.
        handle.check(unsafe { install_busy_wait(handle.ptr(), busy_timeout) })?;
        Ok(Self { handle })
    }

    /// Runs one or more statements that take no parameters and whose rows,
    /// if any, are not needed (`PRAGMA`, `BEGIN`, `COMMIT`).
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        let sql = CString::new(sql).map_err(|_| Error::misuse("SQL contains NUL"))?;
        let mut message: *mut c_char = ptr::null_mut();
        // SAFETY: `sql` is NUL-terminated; no callback; on error `message`
        // is allocated by SQLite and freed here.
        let code = unsafe { ffi::sqlite3_exec(self.handle.ptr(), sql.as_ptr(), None, ptr::null_mut(), &mut message) };
        if code == ffi::SQLITE_OK {
            return Ok(());
        }
        let mut error = self.handle.error(code);
        if !message.is_null() {
            // SAFETY: SQLite returned a NUL-terminated string it allocated.
            error.message = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
            // SAFETY: allocated by sqlite3_malloc, freed exactly once.
            unsafe { ffi::sqlite3_free(message.cast()) };
        }
        Err(error)
    }

    /// Compiles one statement, to be kept and run many times.
    pub fn prepare(&self, sql: &str) -> Result<Statement> {
        let length = c_int::try_from(sql.len()).map_err(|_| Error::misuse("SQL too long"))?;
        let mut stmt = ptr::null_mut();
        let mut tail: *const c_char = ptr::null();
        // SAFETY: `sql` is valid for `length` bytes (no NUL needed when the
        // length is given); `stmt` and `tail` are out-pointers.
        let code = unsafe {
            ffi::sqlite3_prepare_v3(
                self.handle.ptr(),
                sql.as_ptr().cast(),
                length,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                &mut tail,
            )
        };
        self.handle.check(code)?;
        let stmt = NonNull::new(stmt).ok_or_else(|| Error::misuse("SQL holds no statement"))?;
        let statement = Statement { stmt, handle: Rc::clone(&self.handle) };
        // SAFETY: `tail` points into `sql` (at its end when fully consumed).
        let consumed = unsafe { tail.offset_from(sql.as_ptr().cast()) };
        if usize::try_from(consumed).is_ok_and(|n| !sql[n..].trim().is_empty()) {
            return Err(Error::misuse("prepare takes exactly one statement"));
        }
        Ok(statement)
    }

    /// Rows changed by the last INSERT, UPDATE or DELETE.
    pub fn changes(&self) -> u64 {
        // SAFETY: the handle is open.
        u64::try_from(unsafe { ffi::sqlite3_changes64(self.handle.ptr()) }).unwrap_or(0)
    }
}

/// What a step produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A row is ready to read with `text` / `int`.
    Row,
    Done,
}

/// A prepared statement. Parameters are numbered from 1 in the order they
/// appear (`?`). Bound text is copied, so it need not outlive the call.
pub struct Statement {
    stmt: NonNull<ffi::sqlite3_stmt>,
    handle: Rc<Handle>,
}

impl fmt::Debug for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Statement").finish_non_exhaustive()
    }
}

impl Statement {
    fn ptr(&self) -> *mut ffi::sqlite3_stmt {
        self.stmt.as_ptr()
    }

    pub fn bind_text(&mut self, index: usize, value: &str) -> Result<()> {
        let index = param(index)?;
        let length = c_int::try_from(value.len()).map_err(|_| Error::misuse("text too long"))?;
        // SAFETY: `value` is valid for `length` bytes of UTF-8;
        // SQLITE_TRANSIENT makes SQLite copy it before returning.
        let code = unsafe {
            ffi::sqlite3_bind_text(self.ptr(), index, value.as_ptr().cast(), length, ffi::SQLITE_TRANSIENT())
        };
        self.handle.check(code)
    }

    pub fn bind_int(&mut self, index: usize, value: i64) -> Result<()> {
        let index = param(index)?;
        // SAFETY: the statement is live; SQLite checks the index.
        self.handle.check(unsafe { ffi::sqlite3_bind_int64(self.ptr(), index, value) })
    }

    pub fn bind_null(&mut self, index: usize) -> Result<()> {
        let index = param(index)?;
        // SAFETY: the statement is live; SQLite checks the index.
        self.handle.check(unsafe { ffi::sqlite3_bind_null(self.ptr(), index) })
    }

    /// Runs the statement to its next row or to its end.
    pub fn step(&mut self) -> Result<Step> {
        // SAFETY: the statement is live and used by one thread.
        match unsafe { ffi::sqlite3_step(self.ptr()) } {
            ffi::SQLITE_ROW => Ok(Step::Row),
            ffi::SQLITE_DONE => Ok(Step::Done),
            code => Err(self.handle.error(code)),
        }
    }

    /// Column `index` (from 0) of the current row as text; `None` for NULL.
    pub fn text(&self, index: usize) -> Result<Option<String>> {
        let index = c_int::try_from(index).map_err(|_| Error::misuse("column index"))?;
        // SAFETY: called after `step` returned Row; the pointer is valid
        // until the next step/reset, and `bytes` (read after `text`, as
        // SQLite requires) is its length. Copied out at once.
        unsafe {
            let text = ffi::sqlite3_column_text(self.ptr(), index);
            if text.is_null() {
                return Ok(None);
            }
            let bytes = usize::try_from(ffi::sqlite3_column_bytes(self.ptr(), index)).unwrap_or(0);
            let slice = std::slice::from_raw_parts(text, bytes);
            String::from_utf8(slice.to_vec()).map(Some).map_err(|_| Error::misuse("column is not UTF-8"))
        }
    }

    /// Column `index` (from 0) of the current row as an integer (NULL is 0).
    pub fn int(&self, index: usize) -> Result<i64> {
        let index = c_int::try_from(index).map_err(|_| Error::misuse("column index"))?;
        // SAFETY: called after `step` returned Row.
        Ok(unsafe { ffi::sqlite3_column_int64(self.ptr(), index) })
    }

    /// Makes the statement ready to run again and clears its bindings.
    pub fn reset(&mut self) {
        // SAFETY: the statement is live. reset's return code repeats the
        // last step's error, which that step already reported.
        unsafe {
            ffi::sqlite3_reset(self.ptr());
            ffi::sqlite3_clear_bindings(self.ptr());
        }
    }
}

impl Drop for Statement {
    fn drop(&mut self) {
        // SAFETY: finalized exactly once; the handle is still open (this
        // statement holds an Rc of it).
        unsafe { ffi::sqlite3_finalize(self.ptr()) };
    }
}

/// The first wait after a busy try; each next one doubles, up to
/// `BUSY_WAIT_MAX`.
const BUSY_WAIT_FIRST: Duration = Duration::from_micros(20);
const BUSY_WAIT_MAX: Duration = Duration::from_millis(1);

/// How long to sleep after busy try number `tries` (from 0).
fn busy_wait_step(tries: u32) -> Duration {
    BUSY_WAIT_FIRST.saturating_mul(1 << tries.min(16)).min(BUSY_WAIT_MAX)
}

/// How long the waits before try number `tries` slept in all.
fn busy_waited_before(tries: u32) -> Duration {
    let mut total = Duration::ZERO;
    for n in 0..tries {
        let step = busy_wait_step(n);
        if step == BUSY_WAIT_MAX {
            // Every later step is the maximum too.
            return total + BUSY_WAIT_MAX * (tries - n);
        }
        total += step;
    }
    total
}

/// SQLite's busy callback: sleep and try again (non-zero) until the budget
/// `arg` carries (microseconds, as a pointer-sized integer: nothing to free)
/// has been slept, then give up (zero: the call fails with `SQLITE_BUSY`).
extern "C" fn busy_wait(arg: *mut c_void, tries: c_int) -> c_int {
    let budget = Duration::from_micros(arg as usize as u64);
    let tries = u32::try_from(tries).unwrap_or(0);
    if busy_waited_before(tries) >= budget {
        return 0;
    }
    std::thread::sleep(busy_wait_step(tries));
    1
}

/// Installs `busy_wait` with a budget of `timeout` on `db`.
///
/// # Safety
/// `db` is an open connection that no other thread uses during the call.
unsafe fn install_busy_wait(db: *mut ffi::sqlite3, timeout: Duration) -> c_int {
    let budget = usize::try_from(timeout.as_micros()).unwrap_or(usize::MAX);
    // SAFETY: the caller's contract; the argument is an integer, not a
    // pointer SQLite or the callback would dereference.
    unsafe { ffi::sqlite3_busy_handler(db, Some(busy_wait), budget as *mut c_void) }
}

/// Replaces a sqlx SQLite connection's busy handler (sqlx installs SQLite's
/// own through `busy_timeout`) with `busy_wait`, waiting up to `timeout`.
/// For `SqlitePoolOptions::after_connect`.
pub async fn set_busy_handler(conn: &mut sqlx::SqliteConnection, timeout: Duration) -> Result<(), sqlx::Error> {
    let mut handle = conn.lock_handle().await?;
    let db = handle.as_raw_handle();
    // SAFETY: the locked handle gives this task the connection alone until
    // it drops; the sqlite3 pointer is open while sqlx holds it.
    let code = unsafe { install_busy_wait(db.as_ptr(), timeout) };
    if code == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!("installing the busy handler failed: sqlite error {code}")))
    }
}

fn param(index: usize) -> Result<c_int> {
    c_int::try_from(index).map_err(|_| Error::misuse("parameter index"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_new() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::File::create(&path).unwrap();
        let conn = Connection::open(&path, Duration::from_secs(1)).unwrap();
        (dir, conn)
    }

    #[test]
    fn binds_steps_and_reads_back_text_integers_and_null() {
        let (_dir, conn) = open_new();
        conn.execute_batch("CREATE TABLE t (a TEXT, b INTEGER)").unwrap();
        let mut insert = conn.prepare("INSERT INTO t VALUES (?, ?), (?, ?) RETURNING a").unwrap();
        insert.bind_text(1, "héllo 'quoted' \u{0}nul").unwrap();
        insert.bind_int(2, i64::MIN).unwrap();
        insert.bind_null(3).unwrap();
        insert.bind_int(4, 7).unwrap();
        assert_eq!(insert.step().unwrap(), Step::Row);
        assert_eq!(insert.text(0).unwrap().as_deref(), Some("héllo 'quoted' \u{0}nul"));
        assert_eq!(insert.step().unwrap(), Step::Row);
        assert_eq!(insert.text(0).unwrap(), None);
        assert_eq!(insert.step().unwrap(), Step::Done);
        insert.reset();
        assert_eq!(conn.changes(), 2);

        let mut select = conn.prepare("SELECT b FROM t ORDER BY b").unwrap();
        let mut seen = Vec::new();
        while select.step().unwrap() == Step::Row {
            seen.push(select.int(0).unwrap());
        }
        assert_eq!(seen, [i64::MIN, 7]);
    }

    #[test]
    fn errors_carry_sqlite_code_and_message() {
        let (_dir, conn) = open_new();
        let error = conn.prepare("SELECT * FROM missing").unwrap_err();
        assert_eq!(error.code, ffi::SQLITE_ERROR);
        assert!(error.message.contains("no such table: missing"), "{error}");
        conn.execute_batch("CREATE TABLE u (k TEXT PRIMARY KEY)").unwrap();
        let mut insert = conn.prepare("INSERT INTO u VALUES (?)").unwrap();
        insert.bind_text(1, "x").unwrap();
        insert.step().unwrap();
        insert.reset();
        insert.bind_text(1, "x").unwrap();
        let error = insert.step().unwrap_err();
        assert_eq!(error.code, ffi::SQLITE_CONSTRAINT_PRIMARYKEY, "{error}");
        assert!(conn.execute_batch("NOT SQL").is_err());
        assert!(conn.prepare("SELECT 1; SELECT 2").is_err(), "one statement only");
    }

    #[test]
    fn a_missing_database_is_not_created() {
        let dir = tempfile::tempdir().unwrap();
        let error = Connection::open(&dir.path().join("none.db"), Duration::ZERO).unwrap_err();
        assert_eq!(error.code & 0xff, ffi::SQLITE_CANTOPEN, "{error}");
    }

    #[test]
    fn a_statement_outlives_its_connection_value_safely() {
        let (_dir, conn) = open_new();
        let mut stmt = conn.prepare("SELECT 41 + 1").unwrap();
        drop(conn);
        assert_eq!(stmt.step().unwrap(), Step::Row);
        assert_eq!(stmt.int(0).unwrap(), 42);
    }

    #[test]
    fn busy_is_reported_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::File::create(&path).unwrap();
        let first = Connection::open(&path, Duration::from_millis(10)).unwrap();
        let second = Connection::open(&path, Duration::from_millis(10)).unwrap();
        first.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();
        let error = second.execute_batch("BEGIN IMMEDIATE").unwrap_err();
        assert!(error.is_busy(), "{error}");
        assert!(started.elapsed() >= Duration::from_millis(10), "gave up after {:?}", started.elapsed());
    }

    #[test]
    fn busy_waits_start_short_and_double_up_to_one_millisecond() {
        let steps: Vec<u128> = (0..9).map(|n| busy_wait_step(n).as_micros()).collect();
        assert_eq!(steps, [20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        for tries in 0..40 {
            let summed: Duration = (0..tries).map(busy_wait_step).sum();
            assert_eq!(busy_waited_before(tries), summed, "{tries} tries");
        }
        // Ten seconds of budget are many tries, not an overflow.
        assert_eq!(busy_waited_before(u32::MAX), Duration::from_micros(1260) + BUSY_WAIT_MAX * (u32::MAX - 6));
    }

    #[test]
    fn a_busy_writer_gets_the_lock_once_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        std::fs::File::create(&path).unwrap();
        let holder_path = path.clone();
        let (locked, is_locked) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let first = Connection::open(&holder_path, Duration::from_secs(1)).unwrap();
            first.execute_batch("BEGIN IMMEDIATE; CREATE TABLE t (a)").unwrap();
            locked.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(30));
            first.execute_batch("COMMIT").unwrap();
        });
        is_locked.recv().unwrap();
        let second = Connection::open(&path, Duration::from_secs(5)).unwrap();
        second.execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1); COMMIT").unwrap();
        holder.join().unwrap();
    }

    #[tokio::test]
    async fn sqlx_connections_take_the_busy_handler() {
        use sqlx::Connection as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let mut pooled = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("CREATE TABLE t (a)").execute(&mut pooled).await.unwrap();
        set_busy_handler(&mut pooled, Duration::from_millis(40)).await.unwrap();
        let holder = Connection::open(&path, Duration::from_secs(1)).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();
        let error = sqlx::query("BEGIN IMMEDIATE").execute(&mut pooled).await.unwrap_err();
        let waited = started.elapsed();
        assert!(error.to_string().contains("locked"), "{error}");
        assert!(waited >= Duration::from_millis(40), "the handler's budget is the timeout: gave up after {waited:?}");
        holder.execute_batch("ROLLBACK").unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut pooled).await.unwrap();
    }
}

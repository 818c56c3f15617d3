"""The one place that opens SQLite: pragmas, transactions, migrations, corruption.

Every store owns one database file in its own directory and talks to it through a
``Database``. Settings, chosen from measurements in reliability.md §1.1:

* WAL with ``synchronous=FULL``: a commit that returned survives a power cut (NORMAL lost
  17,326 acknowledged rows in 100 simulated cuts; FULL lost none);
* ``busy_timeout`` so the CLI and the daemon can share a file;
* writes in ``BEGIN IMMEDIATE`` transactions so a writer never deadlocks upgrading a lock;
* a commit made without fsync (``durable=False``) becomes durable with the next durable
  commit: WAL frames are appended in order and that commit's fsync covers all of them.

A file that SQLite says is not a database (or is malformed) is moved aside as
``<name>.corrupt-<time>`` with its -wal/-shm, never deleted, and a fresh one is created.
"""

import contextlib
import logging
import os
import sqlite3
import threading
import time

from .defaults import SQLITE_BUSY_TIMEOUT_MS
from .errors import BusyError, StorageError
from .fsutil import ensure_dir, fsync_dir

log = logging.getLogger("fmedge.db")

_CORRUPT_MARKERS = ("file is not a database", "malformed", "file is encrypted")


class Database:
    """One SQLite connection shared by the threads of one process, behind a lock."""

    def __init__(self, path, migrations, *, quarantine_corrupt=True):
        self.path = os.path.abspath(path)
        self.lock = threading.RLock()
        self.quarantined_to = None
        # True after a commit without fsync, until a durable commit covers it.
        self.unsynced = False
        # Counts this process's write transactions through this object (committed or
        # not): what a reader caching rows compares to see its own process's writes.
        self.generation = 0
        ensure_dir(os.path.dirname(self.path))
        try:
            self.conn = _open(self.path, migrations)
        except sqlite3.DatabaseError as exc:
            if not (quarantine_corrupt and is_corruption(exc)):
                raise map_error(exc, self.path) from exc
            self.quarantined_to = quarantine(self.path, exc)
            self.conn = _open(self.path, migrations)

    def execute(self, sql, params=()):
        """Run one statement (autocommit) and return all rows."""
        with self.lock, self.errors():
            return self.conn.execute(sql, params).fetchall()

    def query_one(self, sql, params=()):
        with self.lock, self.errors():
            return self.conn.execute(sql, params).fetchone()

    @contextlib.contextmanager
    def transaction(self, durable=True):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any exception.

        ``durable=False`` commits without waiting for fsync (WAL + synchronous=NORMAL:
        still atomic and consistent, but a power cut may undo it). Only for writes that
        are safe to lose, such as marking results synced: a lost mark means the result is
        sent again and the cloud de-duplicates it.
        """
        with self._writing(durable) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                if durable and self.unsynced:
                    # A transaction that changed no page commits without fsync, so
                    # rewrite page 1 (application_id, which fm-edge leaves 0): this
                    # COMMIT then fsyncs the WAL, and with it the earlier commits.
                    conn.execute("PRAGMA application_id=0")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def write(self, sql, params=(), durable=True):
        """One statement as its own transaction (SQLite's autocommit): one call into SQLite
        where ``transaction`` makes three (BEGIN, the statement, COMMIT). Each call gives up
        the GIL, and under load a thread waits behind all the others to get it back.
        Only for a statement that changes a page (see ``transaction``)."""
        with self.lock:
            if durable and self.unsynced:
                # Covering earlier commits needs the page-1 rewrite ``transaction`` does.
                with self.transaction() as conn:
                    conn.execute(sql, params)
                return
            with self._writing(durable) as conn:
                conn.execute(sql, params)

    @contextlib.contextmanager
    def _writing(self, durable):
        """Around one write: the lock, error mapping, fsync setting and bookkeeping (this
        process's write count; whether every commit so far is durable)."""
        with self.lock, self.errors():
            self.generation += 1
            if not durable:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                yield self.conn
                self.unsynced = not durable
            finally:
                if not durable:
                    self.conn.execute("PRAGMA synchronous=FULL")

    def make_durable(self):
        """Make every commit so far durable (those made with ``durable=False`` too); one
        fsync, or nothing when they already are."""
        with self.lock:
            if self.unsynced:
                with self.transaction():
                    pass

    @contextlib.contextmanager
    def errors(self):
        """Map sqlite3 errors to fm-edge errors that say what to do."""
        try:
            yield
        except sqlite3.Error as exc:
            raise map_error(exc, self.path) from exc

    def used_bytes(self):
        """Bytes of pages in use (free pages of deleted rows are not counted)."""
        row = self.query_one("SELECT page_count, freelist_count, page_size "
                             "FROM pragma_page_count, pragma_freelist_count, pragma_page_size")
        return (row[0] - row[1]) * row[2]

    def integrity_ok(self):
        return self.query_one("PRAGMA integrity_check")[0] == "ok"

    def close(self):
        with self.lock:
            self.conn.close()


def _open(path, migrations):
    conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000.0,
                           isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise StorageError(f"cannot use WAL journaling for {path}: the filesystem may "
                               "not support shared memory; put the data dir on a local disk")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn, migrations):
    """Apply the migrations past ``PRAGMA user_version``, each in its own transaction."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    for version, script in enumerate(migrations[current:], start=current + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read inside the lock: another process may have migrated meanwhile.
            if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _statements(script):
    return [part.strip() for part in script.split(";") if part.strip()]


def is_corruption(exc):
    text = str(exc).lower()
    return any(marker in text for marker in _CORRUPT_MARKERS)


def quarantine(path, exc):
    """Move a corrupt database (and its -wal/-shm) aside; return the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = f"{path}.corrupt-{stamp}-{suffix}"
    for extra in ("", "-wal", "-shm"):
        if os.path.exists(path + extra):
            os.replace(path + extra, target + extra)
    fsync_dir(os.path.dirname(path))
    log.error("database %s is corrupt (%s): moved it to %s and started a fresh one; "
              "nothing was deleted", path, exc, target)
    return target


def map_error(exc, path):
    """The fm-edge error for a sqlite3 error on ``path``."""
    text = str(exc).lower()
    if "database or disk is full" in text or "disk i/o error" in text:
        return StorageError(f"cannot write {path}: {exc}; free space on that disk "
                            "(fm-edge clear-cache, or delete other files)")
    if "locked" in text or "busy" in text:
        return BusyError(f"database {path} is locked by another process; try again")
    if "readonly" in text or "unable to open" in text:
        return StorageError(f"cannot open {path} for writing: {exc}; fix its permissions "
                            "or choose another data dir with --data-dir")
    if is_corruption(exc):
        return StorageError(f"database {path} is corrupt: {exc}; restart fm-edge to move "
                            "it aside and start a fresh one")
    return StorageError(f"database error on {path}: {exc}")

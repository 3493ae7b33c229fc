//! The data-directory lock: one running allium process per data directory.
//!
//! Every role that keeps state in a `data_dir` (authority, relay, proxy) holds an exclusive
//! advisory lock (`flock`) on `<data_dir>/lock` for as long as it runs, and writes its process
//! id into that file. A second process (or a second role in the same process) pointed at the same
//! directory is refused with a message that names the holder, instead of starting with the same
//! identity and publishing it at another address (Tor's `lock` file does the same).
//!
//! The lock is released when the [`DataDirLock`] is dropped or the process exits (the kernel
//! drops `flock` locks with the last descriptor), so a crashed process never leaves a stale lock;
//! the file itself stays, with the last holder's pid in it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "lock";

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirLockError {
    /// Another process (or another role of this one) holds the lock.
    #[error(
        "data directory {} is in use by another allium process ({}); stop it or choose another data_dir",
        dir.display(),
        match pid { Some(p) => format!("pid {p}"), None => "pid unknown".to_owned() }
    )]
    InUse {
        /// The data directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it into the lock file.
        pid: Option<u32>,
    },
    /// The directory or the lock file could not be created, opened or locked.
    #[error("cannot lock data directory {}: {source} (check that it exists and is writable by this user)", dir.display())]
    Io {
        /// The data directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock on a data directory, held until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    file: File,
    dir: PathBuf,
}

impl DataDirLock {
    /// Create `dir` if missing (mode 0700), then lock `dir/lock` without waiting and write this
    /// process's id into it.
    pub fn acquire(dir: &Path) -> Result<Self, DataDirLockError> {
        let io = |source| DataDirLockError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        if !dir.is_dir() {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
            b.create(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = (&file).take(32).read_to_string(&mut text);
                return Err(DataDirLockError::InUse {
                    dir: dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first makes the order explicit.
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_pid_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let first = DataDirLock::acquire(&dir).unwrap();
        assert_eq!(first.dir(), dir);
        let err = DataDirLock::acquire(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DataDirLockError::InUse { pid: Some(p), .. } if p == std::process::id()),
            "{msg}"
        );
        assert!(
            msg.contains(&format!(
                "data directory {} is in use by another allium process (pid {})",
                dir.display(),
                std::process::id()
            )) && msg.contains("choose another data_dir"),
            "{msg}"
        );
        drop(first);
        let again = DataDirLock::acquire(&dir).unwrap();
        drop(again);
    }

    #[test]
    fn unwritable_place_is_an_io_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = DataDirLock::acquire(&file.join("sub")).unwrap_err();
        assert!(matches!(err, DataDirLockError::Io { .. }), "{err}");
    }
}

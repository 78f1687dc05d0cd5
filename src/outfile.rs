//! Output files written whole or not at all, without replacing what is not
//! a file.
//!
//! A receipt, a model or a dump goes to a temporary file beside its
//! destination and is renamed over it once complete, so a reader never sees
//! half of one. That is right for a regular file (or a new path) and wrong
//! for anything else: renaming over `/dev/null` as root replaces the device
//! with a regular file, and every later program that "discards" output into
//! it writes into a file instead (and reads that back as its stdin). So a
//! destination that exists and is not a regular file (a device, a FIFO, a
//! terminal) is written in place, and a symbolic link is followed, so the
//! file it names is replaced and the link stays. A replaced file keeps its
//! mode and owner.
//!
//! Temporary and side files never outlive their process when it can run
//! code: every one is registered while it exists, and
//! [`remove_unfinished`] (called by the command line's signal handler
//! before it exits) removes them. Those of a process that could not run any
//! (SIGKILL, a power cut) carry its pid in their name, `.{name}.{pid}.{tag}`
//! beside the output, and the next run writing that output removes them.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary and side files being written now.
static UNFINISHED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn unfinished() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    UNFINISHED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a temporary file so that [`remove_unfinished`] removes it.
pub(crate) fn register(path: &Path) {
    unfinished().push(path.to_path_buf());
}

/// The file was renamed into place or removed: nothing to clean up.
pub(crate) fn forget(path: &Path) {
    unfinished().retain(|p| p != path);
}

/// Removes every temporary and side file of outputs not yet complete (the
/// process is about to exit on a signal). Finished outputs are untouched.
pub fn remove_unfinished() {
    for p in unfinished().drain(..) {
        let _ = std::fs::remove_file(p);
    }
}

/// Whether a process with this pid exists.
fn alive(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks the pid.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The path of this process's temporary (or side) file `tag` for `out`,
/// `.{name}.{pid}.{tag}` beside it; those of processes that are gone are
/// removed first.
pub(crate) fn temporary_beside(out: &Path, tag: &str) -> io::Result<PathBuf> {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a file path", out.display()),
        )
    })?;
    let name = name.to_string_lossy();
    let prefix = format!(".{name}.");
    let suffix = format!(".{tag}");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let file = e.file_name();
            let file = file.to_string_lossy();
            let pid = file
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(&suffix))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid.filter(|&p| p > 0 && p as u32 != std::process::id()) {
                if !alive(pid) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(dir.join(format!("{prefix}{}{suffix}", std::process::id())))
}

/// Refuses an output that is one of the inputs (the same file, by device
/// and inode, or the same path): writing it would destroy what is read.
pub fn refuse_overwriting(output: &Path, inputs: &[&Path]) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let out_id = id(output);
    for input in inputs {
        let same = match (out_id, id(input)) {
            (Some(a), Some(b)) => a == b,
            _ => output == *input,
        };
        if same && std::fs::metadata(output).map_or(true, |m| m.is_file()) {
            return Err(format!(
                "the output {} is also an input ({}): writing it would destroy what is read",
                output.display(),
                input.display()
            ));
        }
    }
    Ok(())
}

/// Where an output's bytes go until [`Destination::commit`].
#[derive(Debug)]
pub(crate) enum Destination {
    /// A regular file or a new path: a temporary file, renamed over `path`.
    Replace { path: PathBuf, tmp: PathBuf },
    /// An existing non-file (`/dev/null`, `/dev/stdout`, a FIFO): written
    /// directly.
    InPlace(PathBuf),
}

impl Destination {
    /// The destination for `path`; `tag` names the temporary file's kind.
    pub(crate) fn of(path: &Path, tag: &str) -> io::Result<Destination> {
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            if path.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    format!("{} is a directory", path.display()),
                ));
            }
            return Ok(Destination::InPlace(path.to_path_buf()));
        }
        let path = match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path)?,
            _ => path.to_path_buf(),
        };
        let tmp = temporary_beside(&path, tag)?;
        Ok(Destination::Replace { path, tmp })
    }

    /// The file to write into.
    pub(crate) fn create(&self) -> io::Result<File> {
        match self {
            Destination::Replace { tmp, .. } => {
                register(tmp);
                File::create(tmp)
            }
            Destination::InPlace(path) => OpenOptions::new().write(true).open(path),
        }
    }

    /// The path being written (the temporary file, for error messages).
    pub(crate) fn writing(&self) -> &Path {
        match self {
            Destination::Replace { tmp, .. } => tmp,
            Destination::InPlace(path) => path,
        }
    }

    /// Makes the written bytes the destination's: fsync and rename for a
    /// file (and the directory's fsync, where the filesystem has one).
    pub(crate) fn commit(&self, file: File) -> io::Result<()> {
        match self {
            Destination::Replace { path, tmp } => {
                keep_mode_and_owner(path, &file);
                file.sync_all()?;
                drop(file);
                std::fs::rename(tmp, path)?;
                forget(tmp);
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    if let Ok(d) = File::open(dir) {
                        let _ = d.sync_all();
                    }
                }
                Ok(())
            }
            // Devices and pipes have nothing to sync (fsync may even refuse).
            Destination::InPlace(_) => Ok(()),
        }
    }

    /// Removes what an unfinished write left.
    pub(crate) fn abandon(&self) {
        if let Destination::Replace { tmp, .. } = self {
            let _ = std::fs::remove_file(tmp);
            forget(tmp);
        }
    }

    /// Writes `bytes` whole, or leaves the destination as it was.
    pub(crate) fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let result = self.create().and_then(|mut f| {
            f.write_all(bytes)?;
            self.commit(f)
        });
        if result.is_err() {
            self.abandon();
        }
        result
    }
}

/// The file being replaced keeps its mode and, where we may set it, its
/// owner (a 0444 receipt stays read-only). Best effort: a new file keeps
/// the umask's mode, and a refused chown (not root) changes nothing.
fn keep_mode_and_owner(path: &Path, new: &File) {
    use std::os::unix::fs::MetadataExt;
    if let Some(old) = std::fs::metadata(path).ok().filter(|m| m.is_file()) {
        let _ = new.set_permissions(old.permissions());
        let _ = std::os::unix::fs::fchown(new, Some(old.uid()), Some(old.gid()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    // What `/dev/null` needs, shown on a FIFO of our own: a test that got it
    // wrong on `/dev/null` itself would break the machine it runs on.
    fn a_fifo_is_written_in_place_and_stays_a_fifo() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                File::open(fifo).unwrap().read_to_string(&mut s).unwrap();
                s
            })
        };
        let d = Destination::of(&fifo, "tmp").unwrap();
        assert!(matches!(d, Destination::InPlace(_)), "{d:?}");
        d.write_all(b"receipt").unwrap();
        assert_eq!(reader.join().unwrap(), "receipt");
        let kind = std::fs::symlink_metadata(&fifo).unwrap().file_type();
        assert!(kind.is_fifo(), "the FIFO was replaced: {kind:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_symlink_keeps_pointing_at_the_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        let link = dir.path().join("link.json");
        std::fs::write(&real, "old").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        Destination::of(&link, "tmp")
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new");
    }

    #[test]
    fn a_regular_file_is_replaced_whole_and_no_temporary_file_stays() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.json");
        std::fs::write(&out, "a much longer old content").unwrap();
        Destination::of(&out, "tmp")
            .unwrap()
            .write_all(b"new")
            .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        assert!(Destination::of(dir.path(), "tmp").is_err());
    }
}

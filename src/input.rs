//! Reading untrusted input files: never more than a stated limit, and never
//! blocking on a special file.
//!
//! Every text or JSON input (receipts, sweeps, policies, maps, corpora,
//! tokenizer files, chat templates) goes through [`read_text`] or
//! [`read_bytes`] with the limit of its kind (a constant beside its reader):
//! a regular file larger than the limit is refused before a byte is read,
//! and anything else (a pipe, `/dev/stdin`, `/dev/zero`) is read up to the
//! limit and refused past it, so `--policy /dev/zero` is an error naming the
//! file and the limit, not a process that grows until it is killed.
//!
//! Every file is opened with `O_NONBLOCK`: `open(2)` of a FIFO without a
//! writer otherwise waits forever for one. A FIFO with no writer then reads
//! as empty, which is refused by name. Files that must be mapped, hashed or
//! read whole (models, dumps) go through [`open_regular`], which refuses
//! anything but a regular file. Errors do not repeat the path: callers name
//! it, as they do for `std::fs::read`.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading without blocking in `open(2)`, then makes
/// reads blocking again (a pipe with a writer is then read as usual).
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; it touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// What a file type is called in messages.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// `limit` bytes in words: `1 MiB`, `1000 bytes`.
fn size(limit: u64) -> String {
    if limit >= 1 << 20 && limit.is_multiple_of(1 << 20) {
        format!("{} MiB", limit >> 20)
    } else {
        format!("{limit} bytes")
    }
}

fn too_large(what: &str, limit: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::FileTooLarge,
        format!("the {what} is larger than its limit of {}", size(limit)),
    )
}

/// Opens a file that must be a regular file of at most `limit` bytes (a
/// model to map, a dump, a file to hash): a FIFO, a device or a directory
/// is refused without blocking.
pub fn open_regular(path: &Path, limit: u64, what: &str) -> io::Result<File> {
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the {what} is {}, not a regular file",
                kind_of(meta.file_type())
            ),
        ));
    }
    if meta.len() > limit {
        return Err(too_large(what, limit));
    }
    Ok(file)
}

/// The bytes of `path`, refusing more than `limit` (see the module docs for
/// special files; a regular file that grows while it is read is cut at the
/// limit and refused).
pub fn read_bytes(path: &Path, limit: u64, what: &str) -> io::Result<Vec<u8>> {
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    let t = meta.file_type();
    if t.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            format!("the {what} is a directory, not a file"),
        ));
    }
    if t.is_file() && meta.len() > limit {
        return Err(too_large(what, limit));
    }
    let mut bytes = Vec::with_capacity(if t.is_file() { meta.len() as usize } else { 0 });
    // One byte past the limit tells a file of exactly the limit from a longer one.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(what, limit));
    }
    if bytes.is_empty() && t.is_fifo() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the {what} is a FIFO with no writer: nothing to read"),
        ));
    }
    Ok(bytes)
}

/// [`read_bytes`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, what: &str) -> io::Result<String> {
    String::from_utf8(read_bytes(path, limit, what)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the {what} is not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

/// The value of `key` in a `/proc` file of `Key:  N kB` lines
/// (`/proc/self/status`, `/proc/meminfo`, `smaps_rollup`), in bytes; `None`
/// when the file or the key is absent. Read like any input: at most 1 MiB.
pub fn proc_kb_value(path: &Path, key: &str) -> Option<u64> {
    let text = read_text(path, 1 << 20, "proc file").ok()?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_limit_is_read_and_one_past_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, [b'a'; 16]).unwrap();
        assert_eq!(read_text(&p, 16, "test input").unwrap(), "a".repeat(16));
        std::fs::write(&p, [b'a'; 17]).unwrap();
        let e = read_text(&p, 16, "test input").unwrap_err().to_string();
        assert_eq!(e, "the test input is larger than its limit of 16 bytes");
        let e = open_regular(&p, 16, "model").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
    }

    #[test]
    fn proc_values_are_found_by_whole_key_in_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        std::fs::write(&p, "VmHWMX:\t 5 kB\nVmHWM:\t  123 kB\nBad:\t x kB\n").unwrap();
        assert_eq!(proc_kb_value(&p, "VmHWM"), Some(123 * 1024));
        assert_eq!(proc_kb_value(&p, "VmHWMX"), Some(5 * 1024));
        assert_eq!(proc_kb_value(&p, "VmHW"), None);
        assert_eq!(proc_kb_value(&p, "Bad"), None);
        assert_eq!(proc_kb_value(&dir.path().join("absent"), "VmHWM"), None);
        // The real files, on Linux.
        if Path::new("/proc/self/status").exists() {
            assert!(proc_kb_value(Path::new("/proc/self/status"), "VmHWM").is_some_and(|b| b > 0));
            assert!(proc_kb_value(Path::new("/proc/meminfo"), "MemAvailable").is_some());
        }
    }

    #[test]
    fn an_endless_device_is_read_to_the_limit_only() {
        let e = read_bytes(Path::new("/dev/zero"), 16, "test input").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
        let e = open_regular(Path::new("/dev/zero"), u64::MAX, "model").unwrap_err();
        assert!(e
            .to_string()
            .contains("character device, not a regular file"));
    }

    #[test]
    fn a_fifo_without_a_writer_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let e = read_text(&fifo, 16, "map").unwrap_err().to_string();
        assert!(e.contains("a FIFO with no writer"), "{e}");
        let e = open_regular(&fifo, 16, "model").unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
        let e = read_text(dir.path(), 16, "map").unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }
}

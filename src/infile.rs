//! Input files read with a bound and without hanging on special files.
//!
//! Every text or JSON input (receipts, sweeps, policies, maps, corpora,
//! tokenizer files, chat templates) goes through [`read_text`] or
//! [`read_bytes`] with the [`Limit`] of its kind: a regular file larger than
//! the limit is refused before a byte is read, and anything else (a pipe,
//! `/dev/stdin`, `/dev/zero`) is read until the limit and refused past it,
//! so `--policy /dev/zero` is an error naming the file and the limit, not a
//! process that grows until it is killed.
//!
//! Every file is opened with `O_NONBLOCK`: `open(2)` of a FIFO without a
//! writer otherwise waits forever for one. A FIFO with no writer then reads
//! as empty, which is refused by name. Files that must be mapped or read
//! twice (models, dumps) go through [`open_regular`], which refuses
//! anything but a regular file.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The most bytes an input of one kind may have, and the kind's name for
/// messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// What the file is (`a receipt`, `a policy`), for messages.
    pub what: &'static str,
    /// The most bytes it may have.
    pub bytes: u64,
}

const MIB: u64 = 1 << 20;

impl Limit {
    /// A receipt: the largest checked in is 120 KB; `--keep-going` over
    /// thousands of steps stays well below this.
    pub const RECEIPT: Limit = Limit::new("a receipt", 64 * MIB);
    /// A sweep file (or one shard of one).
    pub const SWEEP: Limit = Limit::new("a sweep file", 256 * MIB);
    /// What `report` reads: a receipt or a sweep file.
    pub const REPORT_INPUT: Limit = Limit::new("a receipt or sweep file", 256 * MIB);
    /// A tolerance policy.
    pub const POLICY: Limit = Limit::new("a policy", 16 * MIB);
    /// A `--map` file.
    pub const MAP: Limit = Limit::new("a map", 16 * MIB);
    /// A prompt corpus (`sweep --prompts`).
    pub const CORPUS: Limit = Limit::new("a prompt corpus", 64 * MIB);
    /// `tokens --inputs`.
    pub const TOKEN_INPUTS: Limit = Limit::new("a tokens input file", 64 * MIB);
    /// A Hugging Face `tokenizer.json` (llama3's is 9 MB).
    pub const TOKENIZER_JSON: Limit = Limit::new("a tokenizer.json", 256 * MIB);
    /// A chat template file (real ones are a few KB).
    pub const CHAT_TEMPLATE: Limit = Limit::new("a chat template", MIB);

    const fn new(what: &'static str, bytes: u64) -> Limit {
        Limit { what, bytes }
    }
}

/// Opens `path` for reading without blocking in `open(2)`, then makes
/// reads blocking again (a pipe with a writer is then read as usual).
fn open_nonblocking(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    set_blocking(&file)?;
    Ok(file)
}

fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; it touches no memory of ours.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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

/// Opens a file that must be a regular file (a model to map, a dump, a file
/// to hash): a FIFO, a device or a directory is refused without blocking.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = open_nonblocking(path)?;
    let t = file.metadata()?.file_type();
    if !t.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}, not a regular file", kind_of(t)),
        ));
    }
    Ok(file)
}

/// Reads `path` whole, refusing more than `limit` bytes (see the module
/// docs for special files). Errors do not repeat the path: callers name it,
/// as they do for `std::fs::read`.
pub fn read_bytes(path: &Path, limit: Limit) -> io::Result<Vec<u8>> {
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    let t = meta.file_type();
    if t.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "a directory, not a file",
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::FileTooLarge,
            format!(
                "more than {} MiB, the limit for {}",
                limit.bytes / MIB,
                limit.what
            ),
        )
    };
    if t.is_file() && meta.len() > limit.bytes {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(if t.is_file() { meta.len() as usize } else { 0 });
    // One byte past the limit tells a file of exactly the limit from a longer one.
    file.take(limit.bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit.bytes {
        return Err(too_large());
    }
    if bytes.is_empty() && t.is_fifo() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "a FIFO with no writer: nothing to read",
        ));
    }
    Ok(bytes)
}

/// [`read_bytes`] as UTF-8 text.
pub fn read_text(path: &Path, limit: Limit) -> io::Result<String> {
    String::from_utf8(read_bytes(path, limit)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: Limit = Limit::new("a test input", 16);

    #[test]
    fn a_file_within_the_limit_is_read_and_one_past_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, [b'a'; 16]).unwrap();
        assert_eq!(read_text(&p, TINY).unwrap(), "a".repeat(16));
        std::fs::write(&p, [b'a'; 17]).unwrap();
        let e = read_text(&p, TINY).unwrap_err().to_string();
        assert!(e.contains("the limit for a test input"), "{e}");
    }

    #[test]
    fn an_endless_device_is_read_to_the_limit_only() {
        let e = read_bytes(Path::new("/dev/zero"), TINY).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::FileTooLarge, "{e}");
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
        let e = read_text(&fifo, TINY).unwrap_err().to_string();
        assert!(e.contains("a FIFO with no writer"), "{e}");
        let e = open_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("a FIFO, not a regular file"), "{e}");
        let e = read_text(dir.path(), TINY).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
    }
}

//! Reading untrusted input files: only regular files, and never more than a
//! stated limit. A FIFO would block in `open()` and `/dev/zero` would be read
//! until memory runs out; both are refused before anything is read.

use std::io::Read;
use std::path::Path;

/// Opens `path` for reading if it is a regular file (checked without
/// opening it, so a FIFO cannot block) no larger than `limit` bytes.
pub fn open_regular(path: &Path, limit: u64, what: &str) -> std::io::Result<std::fs::File> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the {what} is not a regular file"),
        ));
    }
    if meta.len() > limit {
        return Err(too_large(what, limit));
    }
    std::fs::File::open(path)
}

fn too_large(what: &str, limit: u64) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the {what} is larger than its limit of {limit} bytes"),
    )
}

/// The bytes of a regular file of at most `limit` bytes (a file that grows
/// while it is read is cut at the limit and refused).
pub fn read_bytes(path: &Path, limit: u64, what: &str) -> std::io::Result<Vec<u8>> {
    let file = open_regular(path, limit, what)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(what, limit));
    }
    Ok(bytes)
}

/// [`read_bytes`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64, what: &str) -> std::io::Result<String> {
    String::from_utf8(read_bytes(path, limit, what)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the {what} is not UTF-8 text"),
        )
    })
}

//! What kind of file a path holds, from its first bytes, so that a file handed to the wrong
//! reader gets an error saying what it is and what to pass instead (a GGUF given to
//! `translate`, a GGUF given to `quantize --input`, ...) rather than a parser's complaint
//! about its own format.

use std::io::Read;
use std::path::Path;

/// File kinds quantlab reads or is often handed by mistake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Gguf,
    /// A safetensors file: an 8-byte header length followed by a JSON object.
    Safetensors,
    /// A zip archive (PyTorch's `pytorch_model.bin` since torch 1.6).
    Zip,
    Gzip,
    /// An IDX array (MNIST): two zero bytes, a type byte and a rank byte.
    Idx,
    Json,
    Other,
}

impl FileKind {
    /// Words for messages: "a GGUF file", ...
    pub fn describe(self) -> &'static str {
        match self {
            Self::Gguf => "a GGUF file",
            Self::Safetensors => "a safetensors file",
            Self::Zip => "a zip archive (a PyTorch checkpoint?)",
            Self::Gzip => "a gzip file",
            Self::Idx => "an IDX array file",
            Self::Json => "a JSON file",
            Self::Other => "an unrecognized file",
        }
    }
}

/// The kind of the first bytes of a file.
pub fn kind_of_bytes(head: &[u8]) -> FileKind {
    if head.starts_with(b"GGUF") || head.starts_with(b"FUGG") {
        return FileKind::Gguf;
    }
    if head.starts_with(b"PK\x03\x04") {
        return FileKind::Zip;
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return FileKind::Gzip;
    }
    if head.len() >= 9 && head[8] == b'{' {
        let n = u64::from_le_bytes(head[..8].try_into().unwrap_or([0; 8]));
        if n > 1 && n < (100 << 20) {
            return FileKind::Safetensors;
        }
    }
    if head.len() >= 4 && head[0] == 0 && head[1] == 0 && head[3] > 0 && head[3] <= 8 {
        return FileKind::Idx;
    }
    let text = head.iter().position(|b| !b.is_ascii_whitespace());
    if text.is_some_and(|i| head[i] == b'{' || head[i] == b'[') {
        return FileKind::Json;
    }
    FileKind::Other
}

/// The kind of the file at `path`; `None` when it cannot be read (it is not a regular file,
/// or it is missing): the caller's own open reports that.
pub fn kind_of_file(path: &Path) -> Option<FileKind> {
    if !path.is_file() {
        return None;
    }
    let mut head = Vec::with_capacity(16);
    std::fs::File::open(path)
        .ok()?
        .take(16)
        .read_to_end(&mut head)
        .ok()?;
    Some(kind_of_bytes(&head))
}

/// Fails when `path` is a symbolic link whose target does not exist, saying so and naming
/// the target (a plain "not found" or "not in the cache" would hide the cause).
pub fn ensure_not_dangling(path: &Path) -> anyhow::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() && !path.exists() {
            let target = std::fs::read_link(path)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "an unreadable target".into());
            anyhow::bail!(
                "{} is a broken symbolic link: its target {target} does not exist",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_magic_numbers() {
        assert_eq!(kind_of_bytes(b"GGUF\x03\0\0\0"), FileKind::Gguf);
        assert_eq!(kind_of_bytes(b"PK\x03\x04rest"), FileKind::Zip);
        assert_eq!(kind_of_bytes(&[0x1f, 0x8b, 8, 0]), FileKind::Gzip);
        assert_eq!(kind_of_bytes(&[0, 0, 8, 3, 0, 0]), FileKind::Idx);
        let mut st = 20u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"a\":1}");
        assert_eq!(kind_of_bytes(&st), FileKind::Safetensors);
        assert_eq!(kind_of_bytes(b"  {\"x\": 1}"), FileKind::Json);
        assert_eq!(kind_of_bytes(b"hello"), FileKind::Other);
        assert_eq!(kind_of_bytes(b""), FileKind::Other);
    }

    #[cfg(unix)]
    #[test]
    fn dangling_links_are_named_with_their_target() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("model");
        std::os::unix::fs::symlink(dir.path().join("gone"), &link).unwrap();
        let e = ensure_not_dangling(&link).unwrap_err().to_string();
        assert!(
            e.contains("broken symbolic link") && e.contains("gone"),
            "{e}"
        );
        assert!(ensure_not_dangling(dir.path()).is_ok());
        assert!(ensure_not_dangling(&dir.path().join("absent")).is_ok());
    }
}

//! Definition files: a copy of a topic's or subscription's definition kept
//! in the directory that holds its data.
//!
//! The metadata store (sled, `meta.rs`) is the source of truth for
//! definitions. This copy exists so that the data can always be accounted
//! for: it is written and fsynced (file, then directory) *before* the
//! definition is stored in the metadata store, so a directory that the
//! metadata store does not know (a power cut took the store's last
//! change, or the store was damaged) still says what it is, and recovery
//! can restore the definition instead of guessing.
//!
//! A file is replaced atomically: written to `definition.json.tmp`,
//! fdatasynced, renamed over `definition.json`, and the directory fsynced.
//! A reader therefore sees the old or the new definition, never a torn one;
//! a leftover `.tmp` file is ignored.

use std::path::Path;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::storage::error::{Result, StorageError};
use crate::storage::io::{Fs, OpenMode};

/// Name of the definition file in a topic's or subscription's directory.
pub const DEFINITION_FILE: &str = "definition.json";
const DEFINITION_TMP_FILE: &str = "definition.json.tmp";
/// Version of the definition file layout.
const DEFINITION_FORMAT_VERSION: u32 = 1;
/// A definition file larger than this is not one of ours.
const DEFINITION_FILE_BYTES_MAX: u64 = 1024 * 1024;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    format_version: u32,
    /// "topic" or "subscription": a file is never read as the other kind.
    kind: String,
    definition: T,
}

/// Writes `definition` as the definition file of `dir` (which must exist)
/// and makes it durable before returning.
///
/// # Errors
/// `Io` naming the file if a write, sync or rename fails.
pub fn write<T: Serialize>(fs: &dyn Fs, dir: &Path, kind: &str, definition: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(&Envelope {
        format_version: DEFINITION_FORMAT_VERSION,
        kind: kind.to_string(),
        definition,
    })
    .map_err(|e| StorageError::Metadata(format!("cannot encode {kind} definition: {e}")))?;
    let tmp = dir.join(DEFINITION_TMP_FILE);
    let file = fs
        .open(&tmp, OpenMode::CreateTruncate)
        .map_err(|e| StorageError::io(&tmp, e))?;
    file.write_at(&bytes, 0)
        .and_then(|()| file.sync_data())
        .map_err(|e| StorageError::io(&tmp, e))?;
    drop(file);
    let path = dir.join(DEFINITION_FILE);
    fs.rename(&tmp, &path)
        .map_err(|e| StorageError::io(&path, e))?;
    fs.sync_dir(dir).map_err(|e| StorageError::io(dir, e))?;
    Ok(())
}

/// Reads the definition file of `dir`: `Ok(None)` if there is none.
///
/// # Errors
/// `Io` if it cannot be read; `Format` if it is not a definition of `kind`
/// in a known layout.
pub fn read<T: DeserializeOwned>(fs: &dyn Fs, dir: &Path, kind: &str) -> Result<Option<T>> {
    let path = dir.join(DEFINITION_FILE);
    if !fs.exists(&path) {
        return Ok(None);
    }
    let file = fs
        .open(&path, OpenMode::Existing)
        .map_err(|e| StorageError::io(&path, e))?;
    let len = file.len().map_err(|e| StorageError::io(&path, e))?;
    let format = |detail: String| StorageError::Format {
        path: path.clone(),
        detail,
    };
    if len > DEFINITION_FILE_BYTES_MAX {
        return Err(format(format!(
            "{len} bytes; a definition is at most {DEFINITION_FILE_BYTES_MAX}"
        )));
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    let mut at = 0usize;
    while at < buf.len() {
        let n = file
            .read_at(&mut buf[at..], at as u64)
            .map_err(|e| StorageError::io(&path, e))?;
        if n == 0 {
            return Err(format("shorter than its length".into()));
        }
        at += n;
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(&buf).map_err(|e| format(format!("not a definition: {e}")))?;
    if envelope.format_version != DEFINITION_FORMAT_VERSION {
        return Err(format(format!(
            "format version {} is not supported",
            envelope.format_version
        )));
    }
    if envelope.kind != kind {
        return Err(format(format!(
            "holds a {} definition, expected a {kind}",
            envelope.kind
        )));
    }
    Ok(Some(envelope.definition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::io::SimFs;
    use crate::storage::meta::{Retention, TopicDef};

    fn def() -> TopicDef {
        TopicDef {
            id: 7,
            name: "orders".into(),
            retention: Retention::default(),
            created_ms: 1,
        }
    }

    #[test]
    fn a_written_definition_survives_power_loss() {
        let fs = SimFs::new();
        let dir = Path::new("/d/topics/7");
        fs.create_dir_all(dir).unwrap();
        fs.sync_dir(Path::new("/d/topics")).unwrap();
        write(&fs, dir, "topic", &def()).unwrap();
        fs.power_loss();
        assert_eq!(read::<TopicDef>(&fs, dir, "topic").unwrap(), Some(def()));
    }

    #[test]
    fn a_definition_of_another_kind_is_refused() {
        let fs = SimFs::new();
        let dir = Path::new("/d/x");
        fs.create_dir_all(dir).unwrap();
        write(&fs, dir, "topic", &def()).unwrap();
        assert!(matches!(
            read::<TopicDef>(&fs, dir, "subscription"),
            Err(StorageError::Format { .. })
        ));
        assert_eq!(
            read::<TopicDef>(&fs, Path::new("/d/none"), "topic").unwrap(),
            None
        );
    }
}

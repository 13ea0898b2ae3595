//! Adaptation blocks as a client states them: the changes the command line names, checked
//! and turned into the operations the engine applies.

use std::path::PathBuf;

use seedcast_core::FileEntry;
use seedcast_core::manifest::validate_file_name;
use seedcast_core::protocol::{AdaptOp, MAX_WRITE};

use super::ClientError;

/// One change of an adaptation block, as the CLI states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `--file PATH=NEWFILE`: a new version of an existing file.
    Replace { path: String, file: PathBuf },
    /// `--write PATH@OFFSET=DATAFILE`: DATAFILE's bytes written at OFFSET.
    Write {
        path: String,
        offset: u64,
        data_file: PathBuf,
    },
    /// `--add PATH=FILE`: a new file.
    Add { path: String, file: PathBuf },
    /// `--remove PATH`.
    Remove { path: String },
}

impl Change {
    fn split_eq(s: &str, flag: &str, form: &str) -> Result<(String, PathBuf), ClientError> {
        let (a, b) = s
            .split_once('=')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| ClientError::Usage(format!("{flag} {s:?}: expected {form}")))?;
        Ok((a.to_string(), PathBuf::from(b)))
    }

    pub fn parse_file(s: &str) -> Result<Self, ClientError> {
        let (path, file) = Self::split_eq(s, "--file", "PATH=NEWFILE")?;
        Ok(Change::Replace { path, file })
    }

    pub fn parse_add(s: &str) -> Result<Self, ClientError> {
        let (path, file) = Self::split_eq(s, "--add", "PATH=FILE")?;
        Ok(Change::Add { path, file })
    }

    pub fn parse_write(s: &str) -> Result<Self, ClientError> {
        let form = "PATH@OFFSET=DATAFILE";
        let (target, data_file) = Self::split_eq(s, "--write", form)?;
        let (path, off) = target
            .rsplit_once('@')
            .ok_or_else(|| ClientError::Usage(format!("--write {s:?}: expected {form}")))?;
        let offset = off.parse::<u64>().map_err(|_| {
            ClientError::Usage(format!("--write {s:?}: offset {off:?} is not a number"))
        })?;
        Ok(Change::Write {
            path: path.to_string(),
            offset,
            data_file,
        })
    }
}

/// The files whose new contents must be chunked and uploaded: (local file, name in the
/// image), each once.
pub(crate) fn uploads(changes: &[Change]) -> Result<Vec<(PathBuf, String)>, ClientError> {
    let mut out: Vec<(PathBuf, String)> = Vec::new();
    for c in changes {
        if let Change::Replace { path, file } | Change::Add { path, file } = c {
            validate_file_name(path).map_err(|e| ClientError::Usage(e.to_string()))?;
            if !out.iter().any(|(f, p)| f == file && p == path) {
                out.push((file.clone(), path.clone()));
            }
        }
    }
    Ok(out)
}

/// The block's operations, in the order of `changes`; `entries` are the uploaded files.
pub(crate) fn ops(changes: &[Change], entries: &[FileEntry]) -> Result<Vec<AdaptOp>, ClientError> {
    let entry = |path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .cloned()
            .ok_or_else(|| ClientError::Internal(format!("no entry for {path}")))
    };
    let mut ops = Vec::new();
    for c in changes {
        ops.push(match c {
            Change::Replace { path, .. } => {
                let e = entry(path)?;
                AdaptOp::Replace {
                    path: e.path,
                    mode: e.mode,
                    recipe: e.recipe,
                    format: e.format,
                }
            }
            Change::Add { path, .. } => AdaptOp::Add(entry(path)?),
            Change::Remove { path } => AdaptOp::Remove { path: path.clone() },
            Change::Write {
                path,
                offset,
                data_file,
            } => write_op(path, *offset, data_file)?,
        });
    }
    Ok(ops)
}

/// A write's operation, with DATAFILE's bytes (at most [`MAX_WRITE`], not empty).
fn write_op(path: &str, offset: u64, data_file: &PathBuf) -> Result<AdaptOp, ClientError> {
    let file_err = |source| ClientError::File {
        path: data_file.clone(),
        source,
    };
    let md = std::fs::metadata(data_file).map_err(file_err)?;
    if md.len() as usize > MAX_WRITE {
        return Err(ClientError::Usage(format!(
            "{}: a write carries at most {MAX_WRITE} bytes; use --file to replace the whole file",
            data_file.display()
        )));
    }
    let data = std::fs::read(data_file).map_err(file_err)?;
    if data.is_empty() {
        return Err(ClientError::Usage(format!(
            "{}: an empty write changes nothing",
            data_file.display()
        )));
    }
    Ok(AdaptOp::Write {
        path: path.to_string(),
        offset,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_parse_from_their_flags() {
        assert_eq!(
            Change::parse_write("disk.raw@4096=patch.bin").unwrap(),
            Change::Write {
                path: "disk.raw".into(),
                offset: 4096,
                data_file: "patch.bin".into()
            }
        );
        assert_eq!(
            Change::parse_file("disk.raw=new.raw").unwrap(),
            Change::Replace {
                path: "disk.raw".into(),
                file: "new.raw".into()
            }
        );
        for bad in ["disk.raw", "=x", "disk.raw=", "disk.raw@x=p", "disk.raw=p"] {
            assert!(Change::parse_write(bad).is_err(), "{bad}");
        }
        assert!(Change::parse_add("=f").is_err());
    }

    #[test]
    fn uploads_are_named_once_and_checked() {
        let c = vec![
            Change::parse_file("a=f1").unwrap(),
            Change::parse_file("a=f1").unwrap(),
            Change::parse_add("b=f2").unwrap(),
            Change::Remove { path: "c".into() },
        ];
        assert_eq!(
            uploads(&c).unwrap(),
            [("f1".into(), "a".into()), ("f2".into(), "b".into())]
        );
        let e = uploads(&[Change::parse_add("../x=f").unwrap()]).unwrap_err();
        assert!(e.to_string().contains("invalid file name"), "{e}");
    }

    #[test]
    fn writes_refuse_empty_oversized_and_missing_data() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let e = write_op("d", 0, &empty).unwrap_err();
        assert!(e.to_string().contains("empty write"), "{e}");
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_WRITE as u64 + 1)
            .unwrap();
        let e = write_op("d", 0, &big).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        let e = write_op("d", 0, &dir.path().join("absent")).unwrap_err();
        assert_eq!(e.kind(), crate::client::ErrorClass::File);
    }
}

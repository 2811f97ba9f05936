//! What a run folder's `config.json` records so a result can be traced to its inputs: digests of
//! the files a run read (spec, data, model, action files), the versions of the Python packages
//! that compute rewards, the git commit of etpo itself, and UTC timestamps.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{hex, ExperimentError};

/// Files larger than this are recorded by size only (a 7B checkpoint would take a minute to hash).
pub const HASH_LIMIT: u64 = 4 << 30;

/// One file a run read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileDigest {
    pub path: PathBuf,
    pub size_bytes: u64,
    /// Left out for files over [`HASH_LIMIT`] bytes.
    pub sha256: Option<String>,
}

/// The size and sha256 of `path`.
pub fn digest(path: &Path) -> Result<FileDigest, ExperimentError> {
    let io = |e| ExperimentError::io(path, e);
    let meta = std::fs::metadata(path).map_err(io)?;
    let sha256 = if meta.len() <= HASH_LIMIT {
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Some(hex(&hasher.finalize()))
    } else {
        None
    };
    Ok(FileDigest { path: path.to_path_buf(), size_bytes: meta.len(), sha256 })
}

/// Digests of every file under `dir` (recursively), sorted by path.
pub fn folder_digests(dir: &Path) -> Result<Vec<FileDigest>, ExperimentError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| ExperimentError::io(&d, e))? {
            let path = entry.map_err(|e| ExperimentError::io(&d, e))?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(digest(&path)?);
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Python's and numpy / scipy / scikit-learn's versions, or `None` if the interpreter cannot tell.
pub fn python_versions(python: &Path) -> Option<serde_json::Value> {
    let script = "import json, sys, numpy, scipy, sklearn; print(json.dumps({'python': sys.version.split()[0], \
                  'numpy': numpy.__version__, 'scipy': scipy.__version__, 'scikit-learn': sklearn.__version__}))";
    let out = std::process::Command::new(python).args(["-c", script]).env("OPENBLAS_NUM_THREADS", "1").output().ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The commit etpo was built from (`<sha>-dirty` with uncommitted changes), when its source tree
/// is a git checkout.
pub fn git_commit() -> Option<String> {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("git").args(["-C", dir, "rev-parse", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8(out.stdout).ok()?.trim().to_string();
    let dirty = std::process::Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    Some(if dirty { format!("{commit}-dirty") } else { commit })
}

/// UTC time as `20261125-114501` (folder names) or `2026-11-25T11:45:01Z` (`iso`).
pub fn utc_timestamp(t: std::time::SystemTime, iso: bool) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let (hh, mm, ss) = (s / 3600, s % 3600 / 60, s % 60);
    if iso {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    } else {
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2000-03-01 is day 11017; 2024-02-29 is day 19782.
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(19_782 * 86_400 + 3_723);
        assert_eq!(utc_timestamp(t, false), "20240229-010203");
        assert_eq!(utc_timestamp(t, true), "2024-02-29T01:02:03Z");
    }

    #[test]
    fn digests_name_the_bytes_and_the_files_of_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"abc").unwrap();
        std::fs::write(dir.path().join("a.txt"), b"").unwrap();
        let all = folder_digests(dir.path()).unwrap();
        assert_eq!(
            all.iter().map(|d| d.path.strip_prefix(dir.path()).unwrap().to_path_buf()).collect::<Vec<_>>(),
            [PathBuf::from("a.txt"), PathBuf::from("sub/b.txt")]
        );
        // sha256("abc") and sha256("").
        assert_eq!(all[1].sha256.as_deref(), Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
        assert_eq!(all[0].sha256.as_deref(), Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        assert_eq!((all[1].size_bytes, all[0].size_bytes), (3, 0));
        let err = digest(&dir.path().join("missing")).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}

//! The last snapshot applied from the control plane, kept on disk
//! (`--policy-cache`), so that a proxy restarted while the control plane is
//! away still serves its last good policy.
//!
//! The file holds the snapshot's version and its resources in wire form (each
//! document as JSON), and is read back through the same boundary as a push,
//! `PolicySet::from_resources`. It is replaced atomically: written beside the
//! old one, synced, then renamed over it, so a crash leaves the old file or
//! the new one, never half of either.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use infermesh_proto::policy_api::Resource;
use serde::{Deserialize, Serialize};

/// A cache file that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The file exists but cannot be read.
    #[error("cannot read the policy cache {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a policy cache.
    #[error("the policy cache {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The file cannot be written.
    #[error("cannot write the policy cache {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A snapshot as read back from the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct Cached {
    /// The control plane's version of it.
    pub version: u64,
    /// Its resources, in wire form.
    pub resources: Vec<Resource>,
}

/// The file's layout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u64,
    resources: Vec<CachedResource>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CachedResource {
    kind: String,
    name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    namespace: String,
    /// The whole document, as JSON (not a string of it), so the file reads well.
    document: serde_json::Value,
}

/// The on-disk home of the last good snapshot.
#[derive(Debug, Clone)]
pub struct PolicyCache {
    path: PathBuf,
}

impl PolicyCache {
    /// A cache at `path`; nothing is read or written yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where the cache lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cached snapshot; `None` when there is no cache file yet.
    pub fn load(&self) -> Result<Option<Cached>, CacheError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let file: CacheFile =
            serde_json::from_slice(&text).map_err(|source| CacheError::Parse {
                path: self.path.clone(),
                source,
            })?;
        let resources = file
            .resources
            .into_iter()
            .map(|r| Resource {
                kind: r.kind,
                name: r.name,
                namespace: r.namespace,
                json: match r.document {
                    serde_json::Value::String(json) => json,
                    document => document.to_string(),
                },
            })
            .collect();
        Ok(Some(Cached {
            version: file.version,
            resources,
        }))
    }

    /// Replaces the cache with this snapshot, atomically.
    pub fn store(&self, version: u64, resources: &[Resource]) -> Result<(), CacheError> {
        let file = CacheFile {
            version,
            resources: resources
                .iter()
                .map(|r| CachedResource {
                    kind: r.kind.clone(),
                    name: r.name.clone(),
                    namespace: r.namespace.clone(),
                    // Only applied snapshots are cached, and those parsed.
                    document: serde_json::from_str(&r.json)
                        .unwrap_or_else(|_| serde_json::Value::String(r.json.clone())),
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(|e| CacheError::Write {
            path: self.path.clone(),
            source: e.into(),
        })?;
        json.push(b'\n');
        self.write_atomically(&json)
            .map_err(|source| CacheError::Write {
                path: self.path.clone(),
                source,
            })
    }

    fn write_atomically(&self, bytes: &[u8]) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "policy-cache".into());
        let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let written = (|| {
            let mut file = File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
            return written;
        }
        // The rename is durable once the directory is; not every file system
        // lets a directory be synced, and the data is safe either way.
        if let Ok(dir) = File::open(&dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resources() -> Vec<Resource> {
        vec![
            Resource {
                kind: "Backend".into(),
                name: "vllm".into(),
                namespace: String::new(),
                json: r#"{"apiVersion":"infermesh.io/v1alpha1","kind":"Backend","metadata":{"name":"vllm"},"spec":{"endpoints":["127.0.0.1:8000"]}}"#.into(),
            },
            Resource {
                kind: "ModelRoute".into(),
                name: "chat".into(),
                namespace: "team-a".into(),
                json: r#"{"apiVersion":"infermesh.io/v1alpha1","kind":"ModelRoute","metadata":{"name":"chat","namespace":"team-a"},"spec":{"backends":[{"backend":"vllm"}]}}"#.into(),
            },
        ]
    }

    #[test]
    fn a_stored_snapshot_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PolicyCache::new(dir.path().join("sub/policy.json"));
        assert_eq!(cache.load().unwrap(), None, "no file yet");
        cache.store(42, &resources()).unwrap();
        let cached = cache.load().unwrap().unwrap();
        assert_eq!(cached.version, 42);
        assert_eq!(cached.resources.len(), 2);
        for (read, written) in cached.resources.iter().zip(resources()) {
            assert_eq!(read.kind, written.kind);
            assert_eq!(read.name, written.name);
            assert_eq!(read.namespace, written.namespace);
            let read: serde_json::Value = serde_json::from_str(&read.json).unwrap();
            let written: serde_json::Value = serde_json::from_str(&written.json).unwrap();
            assert_eq!(read, written);
        }
    }

    #[test]
    fn storing_replaces_the_file_and_leaves_no_temporary_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PolicyCache::new(dir.path().join("policy.json"));
        cache.store(1, &resources()).unwrap();
        cache.store(2, &resources()[..1]).unwrap();
        let cached = cache.load().unwrap().unwrap();
        assert_eq!((cached.version, cached.resources.len()), (2, 1));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["policy.json"]);
    }

    #[test]
    fn a_damaged_cache_is_an_error_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(&path, "{\"version\": 3, \"resources\": [").unwrap();
        let error = PolicyCache::new(&path).load().unwrap_err().to_string();
        assert!(error.contains("policy.json is not valid"), "{error}");
    }

    #[test]
    fn an_unwritable_location_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        std::fs::write(&blocker, "").unwrap();
        let cache = PolicyCache::new(blocker.join("policy.json"));
        let error = cache.store(1, &resources()).unwrap_err().to_string();
        assert!(
            error.starts_with("cannot write the policy cache"),
            "{error}"
        );
    }
}

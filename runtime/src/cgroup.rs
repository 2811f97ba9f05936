//! One memory + pids cgroup per sandbox, so the limits hold for the sandbox as a whole (every
//! process a program forks), not only per process as rlimits do.
//!
//! cgroup v1 (separate `memory` and `pids` hierarchies) and v2 (one unified hierarchy) are both
//! handled. The group is created under the cgroup this process is in (so the limits of whoever
//! started us still apply), and removed when the sandbox is dropped.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const ROOT: &str = "/sys/fs/cgroup";

/// Memory granted to a sandbox on top of the per-action limit: the warm worker itself (Python,
/// numpy, scikit-learn) and the page cache of what it reads.
pub(crate) const WORKER_BASELINE_MB: u64 = 512;

#[derive(Debug)]
enum Layout {
    V1 { memory: PathBuf, pids: PathBuf },
    V2 { dir: PathBuf },
}

/// A cgroup (v1: a pair of groups) holding one sandbox.
#[derive(Debug)]
pub(crate) struct Cgroup {
    layout: Layout,
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Cgroup {
    /// Creates a group limited to `memory_mb` + the worker baseline and `max_pids` tasks.
    /// Fails when cgroups are not writable (not root, read-only mount).
    pub(crate) fn create(memory_mb: u64, max_pids: u64) -> io::Result<Cgroup> {
        let name = format!("etpo-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let layout = if Path::new(ROOT).join("cgroup.controllers").exists() {
            let dir = own_dir("").join(&name);
            fs::create_dir(&dir)?;
            Layout::V2 { dir }
        } else {
            let memory = own_dir("memory").join(&name);
            let pids = own_dir("pids").join(&name);
            fs::create_dir(&memory)?;
            if let Err(e) = fs::create_dir(&pids) {
                let _ = fs::remove_dir(&memory);
                return Err(e);
            }
            Layout::V1 { memory, pids }
        };
        let cg = Cgroup { layout };
        cg.set_memory_mb(memory_mb)?;
        let pids = if max_pids == 0 { "max".to_string() } else { max_pids.to_string() };
        match &cg.layout {
            Layout::V1 { pids: dir, .. } => fs::write(dir.join("pids.max"), &pids)?,
            Layout::V2 { dir } => fs::write(dir.join("pids.max"), &pids)?,
        }
        Ok(cg)
    }

    /// Sets the sandbox's memory limit for an action limit of `memory_mb`.
    pub(crate) fn set_memory_mb(&self, memory_mb: u64) -> io::Result<()> {
        let bytes = ((memory_mb + WORKER_BASELINE_MB) << 20).to_string();
        match &self.layout {
            Layout::V1 { memory, .. } => fs::write(memory.join("memory.limit_in_bytes"), bytes),
            Layout::V2 { dir } => {
                fs::write(dir.join("memory.max"), &bytes)?;
                // No swapping around the limit where swap is accounted.
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                Ok(())
            }
        }
    }

    /// Out-of-memory kills recorded in this group so far.
    pub(crate) fn oom_kills(&self) -> u64 {
        let (file, key) = match &self.layout {
            Layout::V1 { memory, .. } => (memory.join("memory.oom_control"), "oom_kill"),
            Layout::V2 { dir } => (dir.join("memory.events"), "oom_kill"),
        };
        fs::read_to_string(file)
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    let mut it = l.split_whitespace();
                    (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok())).flatten()
                })
            })
            .unwrap_or(0)
    }

    /// Sends SIGKILL to every process left in the group (the last resort when a sandbox goes).
    pub(crate) fn kill_all(&self) {
        let dirs: Vec<&PathBuf> = match &self.layout {
            Layout::V1 { memory, pids } => vec![memory, pids],
            Layout::V2 { dir } => vec![dir],
        };
        for dir in dirs {
            let Ok(list) = fs::read_to_string(dir.join("cgroup.procs")) else { continue };
            for pid in list.lines().filter_map(|l| l.trim().parse::<libc::pid_t>().ok()) {
                // SAFETY: kill(2) with a pid read from our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// The `cgroup.procs` files a process writes "0" to in order to move itself into the group
    /// (done by the sandbox launcher before it creates the namespaces).
    pub(crate) fn procs_files(&self) -> Vec<CString> {
        let dirs: Vec<&PathBuf> = match &self.layout {
            Layout::V1 { memory, pids } => vec![memory, pids],
            Layout::V2 { dir } => vec![dir],
        };
        dirs.into_iter().filter_map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok()).collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let dirs: Vec<&PathBuf> = match &self.layout {
            Layout::V1 { memory, pids } => vec![memory, pids],
            Layout::V2 { dir } => vec![dir],
        };
        for dir in dirs {
            // The last processes may take a moment to be released after the kill.
            for _ in 0..50 {
                match fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
        }
    }
}

/// Removes empty groups left by etpo processes that are gone (killed before they could clean up).
/// A group still holding processes cannot be removed, so a live sandbox is never affected.
pub(crate) fn sweep_stale() {
    let parents = if Path::new(ROOT).join("cgroup.controllers").exists() {
        vec![own_dir("")]
    } else {
        vec![own_dir("memory"), own_dir("pids")]
    };
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("etpo-")) else { continue };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
            if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
                let _ = fs::remove_dir(e.path());
            }
        }
    }
}

/// The directory of this process's own cgroup in `controller`'s hierarchy ("" for v2), or the
/// hierarchy's root when it is not visible under /sys/fs/cgroup.
fn own_dir(controller: &str) -> PathBuf {
    let base = Path::new(ROOT).join(controller);
    let own = fs::read_to_string("/proc/self/cgroup").ok().and_then(|s| {
        s.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let matches =
                if controller.is_empty() { ctrls.is_empty() } else { ctrls.split(',').any(|c| c == controller) };
            matches.then(|| path.trim_start_matches('/').to_string())
        })
    });
    match own {
        Some(p) if !p.is_empty() && base.join(&p).is_dir() => base.join(p),
        _ => base,
    }
}

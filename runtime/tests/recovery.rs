//! A worker that dies for reasons outside the program (here: killed from the host) is replaced,
//! and the evaluation that found it dead is retried, not reported as the program's failure.
//!
//! Needs the project venv and root (to see the sandbox cgroups and signal the sandbox). A test
//! binary of its own: its pool must be the only one of the process.

use runtime::{Job, Limits, Pool, PoolConfig};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The sandbox cgroups (pids hierarchy) of this test process.
fn sandbox_cgroups() -> BTreeSet<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut dirs = BTreeSet::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        let base = match ctrl {
            "" => PathBuf::from("/sys/fs/cgroup"),
            c if c.split(',').any(|c| c == "pids") => PathBuf::from("/sys/fs/cgroup/pids"),
            _ => continue,
        };
        let Ok(entries) = std::fs::read_dir(base.join(path.trim_start_matches('/'))) else { continue };
        let prefix = format!("etpo-{}-", std::process::id());
        dirs.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))),
        );
    }
    dirs
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[test]
fn a_worker_killed_from_outside_is_replaced_and_the_job_retried() {
    let python = runtime::default_python();
    assert!(python.exists(), "the project venv is missing: run scripts/setup.sh python");
    let limits = Limits { wall_s: 5.0, cpu_s: 5.0, memory_mb: 512, output_kb: 16, max_processes: 32 };
    let pool = Pool::new(PoolConfig { workers: 1, python, limits }).unwrap();
    let groups = sandbox_cgroups();
    assert_eq!(groups.len(), 1, "one sandbox cgroup expected (root needed): {groups:?}");
    let group = groups.into_iter().next().unwrap();

    let x: Vec<Vec<f64>> = (0..40).map(|i| vec![i as f64, (i * 7 % 11) as f64]).collect();
    let y: Vec<usize> = (0..40).map(|i| usize::from(i >= 20)).collect();
    let job = Job {
        program: "from sklearn.linear_model import LogisticRegression\ndef build_model(x_train, y_train):\n    return LogisticRegression().fit(x_train, y_train)\n".into(),
        x_train: x.clone(),
        y_train: y,
        x_val: x[..5].to_vec(),
        n_classes: 2,
        limits,
    };
    let first = pool.evaluate(&job).unwrap().result.unwrap();

    let victims = procs(&group);
    assert!(!victims.is_empty());
    for pid in &victims {
        // SAFETY: kill(2) on processes of our own sandbox cgroup.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let t = Instant::now();
    while !procs(&group).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }

    let again = pool.evaluate(&job).expect("the dead worker is replaced transparently");
    assert_eq!(again.result.unwrap(), first, "the retried job is evaluated normally");
    let after = sandbox_cgroups();
    assert!(!after.contains(&group), "the dead sandbox's cgroup is removed");
    assert_eq!(after.len(), 1, "one fresh sandbox: {after:?}");
    assert_eq!(pool.evaluate(&job).unwrap().result.unwrap(), first);
}

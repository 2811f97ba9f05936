//! Starting one sandboxed worker process.
//!
//! `Launcher::start` spawns the interpreter through `std::process::Command` with a `pre_exec`
//! hook that builds the sandbox between fork and exec, using only raw system calls on data
//! prepared beforehand (nothing is allocated after the fork):
//!
//! 1. The forked process ("I", in the host's namespaces) joins the sandbox's cgroups, then clones
//!    the worker ("G") into new user, PID, mount, network, IPC and UTS namespaces. I writes G's
//!    uid/gid maps, closes every descriptor and waits for G, so that the host's child process is
//!    I and killing it takes the whole sandbox down (G has `PR_SET_PDEATHSIG`, and G is PID 1 of
//!    its PID namespace, whose death kills every process in it).
//! 2. G builds a new root on a tmpfs: read-only bind mounts of /usr, the top-level library and
//!    binary directories, /etc/ld.so.cache and the Python installation (prefix and base prefix,
//!    asked from the interpreter once), a minimal /dev (null, zero, random, urandom), a fresh
//!    /proc, and private tmpfs /tmp and /job (the work directory). It pivots into that root and
//!    drops the old one: the host home, the repository and the spec files are not visible.
//! 3. G sets rlimits, drops every capability (as host root: becomes uid/gid 65534 in the
//!    namespace, i.e. `nobody` on the host), sets `PR_SET_NO_NEW_PRIVS`, installs the seccomp
//!    filter and execs Python with `harness.py`.
//!
//! The per-action limits (address space, CPU seconds) are set by the worker on each forked child.

use crate::cgroup::Cgroup;
use crate::job::Limits;
use crate::seccomp::Filter;
use crate::RuntimeError;
use std::collections::BTreeSet;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

/// The worker program (see its header comment).
const HARNESS: &str = include_str!("harness.py");
/// Bytes of a worker's stderr kept for diagnostics.
const STDERR_TAIL: usize = 4096;
/// The work directory inside the sandbox (a private tmpfs; also $HOME).
const WORK_DIR: &str = "/job";
/// Size of each private tmpfs (/tmp and the work directory); counted in the memory cgroup.
const SCRATCH_SIZE: &str = "size=64m";
/// The uid and gid the sandbox runs as when the host is root: `nobody`.
const NOBODY: u32 = 65534;
/// Descriptors the sandbox may open at once.
const MAX_FILES: u64 = 256;
/// Largest file the sandbox may write (the tmpfs size bounds the total).
const MAX_FILE_BYTES: u64 = 64 << 20;

/// Environment of every worker: BLAS and friends pinned to one thread (one worker per core),
/// joblib kept in-process, no bytecode writes.
const ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/bin:/usr/bin:/bin"),
    ("HOME", WORK_DIR),
    // Who we are without /etc/passwd (getpass and friends look here first).
    ("USER", "sandbox"),
    ("LOGNAME", "sandbox"),
    ("TMPDIR", "/tmp"),
    ("ETPO_SCRATCH", "/tmp:/job"),
    ("LANG", "C.UTF-8"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("BLIS_NUM_THREADS", "1"),
    ("VECLIB_MAXIMUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
    ("JOBLIB_MULTIPROCESSING", "0"),
    ("MALLOC_ARENA_MAX", "2"),
    ("LOKY_MAX_CPU_COUNT", "1"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    // What a program printed before a time-out is kept (nothing waits in a buffer).
    ("PYTHONUNBUFFERED", "1"),
    ("PYTHONHASHSEED", "0"),
    ("MPLBACKEND", "Agg"),
];

/// One step of building the new root, all paths already absolute under the mount point.
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// Bind `src` on `dst`; then, if `remount` is set, remount the bind with those flags.
    Bind {
        src: CString,
        dst: CString,
        remount: Option<libc::c_ulong>,
    },
    Tmpfs {
        dst: CString,
        data: CString,
    },
    Proc {
        dst: CString,
    },
}

/// Everything the sandboxed child needs, prepared before the fork.
struct Plan {
    /// The new root's mount point: an empty host directory (from `tempfile`) that the sandbox
    /// mounts a tmpfs on inside its own mount namespace; it stays empty on the host.
    root: CString,
    ops: Vec<Op>,
    work_dir: CString,
    hostname: CString,
    filter: Filter,
    rlimits: Vec<(nix::sys::resource::Resource, u64)>,
    /// uid_map / gid_map contents written by the parent for the sandbox.
    uid_map: CString,
    gid_map: CString,
    /// Whether to write "deny" to setgroups (required when the host is not root).
    deny_setgroups: bool,
    /// Become this uid/gid inside the sandbox after building it (host root only).
    drop_to: Option<u32>,
}

/// Knows how to start workers: the interpreter and the sandbox plan, prepared once.
pub(crate) struct Launcher {
    python: PathBuf,
    limits: Limits,
    /// Whether each child forked ahead rehearses a trivial action (`Tuning::rehearse`).
    rehearse: bool,
    plan: Arc<Plan>,
    root: tempfile::TempDir,
    use_cgroups: bool,
}

impl Launcher {
    /// Asks the interpreter where it lives and prepares the sandbox plan.
    pub(crate) fn new(python: &Path, limits: Limits, rehearse: bool) -> Result<Launcher, RuntimeError> {
        let python = resolve(python)?;
        let dirs = python_dirs(&python)?;
        sweep_stale_roots();
        let root = tempfile::Builder::new().prefix(&format!("{ROOT_PREFIX}{}-", std::process::id())).tempdir()?;
        let plan = Arc::new(plan(root.path(), &dirs, &limits)?);
        crate::cgroup::sweep_stale();
        let use_cgroups = match Cgroup::create(limits.memory_mb, limits.max_processes) {
            Ok(_) => true,
            Err(e) => {
                eprintln!(
                    "etpo runtime: warning: cgroups not writable ({e}); sandbox memory and process limits fall back to per-process rlimits"
                );
                false
            }
        };
        Ok(Launcher { python, limits, rehearse, plan, root, use_cgroups })
    }

    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Starts one worker (it then imports its libraries; see `Worker::ready` in pool.rs).
    pub(crate) fn start(&self) -> Result<Sandbox, RuntimeError> {
        // A cleaner of the temporary directory may have removed the (empty) mount point.
        if !self.root.path().is_dir() {
            std::fs::create_dir(self.root.path())?;
        }
        // Room for the launcher process, the worker itself and the action's processes.
        let pids = if self.limits.max_processes == 0 { 0 } else { self.limits.max_processes + 4 };
        let cgroup = if self.use_cgroups {
            Cgroup::create(self.limits.memory_mb, pids)
                .map_err(|e| RuntimeError::Sandbox(format!("creating the sandbox cgroup: {e}")))
                .map(Some)?
        } else {
            None
        };
        let procs: Vec<CString> = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        let plan = self.plan.clone();
        let mut cmd = Command::new(&self.python);
        // Not `-I`: it implies `-E`, which would ignore the environment set here (the hash seed,
        // unbuffered output, no bytecode writes). The environment is cleared first, so nothing from
        // the host reaches Python; `-s` skips the user's site directory, and the harness drops
        // the working directory from `sys.path` itself (what `-I`'s `-P` did).
        cmd.arg("-s").arg("-c").arg(HARNESS).env_clear().envs(ENV.iter().copied());
        cmd.env("ETPO_REHEARSE", if self.rehearse { "1" } else { "0" });
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the hook runs between fork and exec and only makes system calls on data
        // prepared before the fork (see `enter`).
        unsafe {
            cmd.pre_exec(move || enter(&plan, &procs));
        }
        let mut child = cmd.spawn().map_err(|e| {
            RuntimeError::Sandbox(format!("starting `{}` in the sandbox failed: {e}", self.python.display()))
        })?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(RuntimeError::Sandbox("worker pipes missing".into()));
        };
        // Writes to the worker wait with a deadline (poll), never block.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let fd = stdin.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        let tail = Arc::new(Mutex::new(Vec::new()));
        drain(stderr, tail.clone());
        Ok(Sandbox { child, stdin: Some(stdin), stdout, tail, cgroup, python: self.python.clone() })
    }
}

/// Name prefix of the (empty) host directories the sandboxes mount their root on; the creating
/// process id follows.
const ROOT_PREFIX: &str = "etpo-sandbox-root-";

/// Removes the empty root mount points left by etpo processes that are gone (a pool kept in a
/// static, or a killed process, never drops its launcher). Only empty directories are removed.
fn sweep_stale_roots() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(ROOT_PREFIX)) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// The interpreter as an absolute path (looked up in PATH if it is a bare name).
fn resolve(python: &Path) -> Result<PathBuf, RuntimeError> {
    if python.components().count() > 1 {
        // Canonical directory, but the file name kept: a venv's `python` is a symlink whose
        // location tells the interpreter which venv it is.
        if let (Some(dir), Some(name)) = (python.parent(), python.file_name()) {
            if let Ok(dir) = dir.canonicalize() {
                let abs = dir.join(name);
                if abs.exists() {
                    return Ok(abs);
                }
            }
        }
    } else if let Some(found) =
        std::env::var_os("PATH").iter().flat_map(std::env::split_paths).map(|d| d.join(python)).find(|p| p.is_file())
    {
        return Ok(found);
    }
    Err(RuntimeError::Python {
        python: python.to_path_buf(),
        reason: "no such file (set ETPO_PYTHON or run scripts/setup.sh python)".into(),
    })
}

/// Directories of the Python installation the sandbox must see, asked from the interpreter.
fn python_dirs(python: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let script = "import sys, os; print('\\0'.join([sys.prefix, sys.base_prefix, sys.exec_prefix, \
                  sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]))";
    let out = Command::new(python)
        .args(["-I", "-c", script])
        .env_clear()
        .output()
        .map_err(|e| RuntimeError::Python { python: python.to_path_buf(), reason: e.to_string() })?;
    if !out.status.success() {
        return Err(RuntimeError::Python {
            python: python.to_path_buf(),
            reason: format!("asking for its prefix failed: {}", String::from_utf8_lossy(&out.stderr)),
        });
    }
    let mut dirs: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .trim_end()
        .split('\0')
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .collect();
    // The venv's bin directory holds the symlink we exec.
    if let Some(bin) = python.parent() {
        dirs.push(bin.to_path_buf());
    }
    Ok(dirs)
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString, RuntimeError> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| RuntimeError::Sandbox("path with a NUL byte".into()))
}

/// Mount flags of the filesystem holding `path` that a bind remount inside a user namespace must
/// keep (the kernel refuses to clear locked flags).
fn locked_flags(path: &Path) -> libc::c_ulong {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statvfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    let f = st.f_flag;
    let mut m = 0;
    for (st_bit, ms_bit) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if f & st_bit != 0 {
            m |= ms_bit;
        }
    }
    m
}

fn plan(root: &Path, python_dirs: &[PathBuf], limits: &Limits) -> Result<Plan, RuntimeError> {
    let under = |p: &Path| -> Result<CString, RuntimeError> { cstr(root.join(p.strip_prefix("/").unwrap_or(p))) };
    let mut ops = Vec::new();
    let mut made: BTreeSet<PathBuf> = BTreeSet::new();
    // Creates `p` and its parents under the new root (each once).
    let mkdirs = |ops: &mut Vec<Op>, made: &mut BTreeSet<PathBuf>, p: &Path| -> Result<(), RuntimeError> {
        let mut cur = PathBuf::from("/");
        for c in p.components().skip(1) {
            cur.push(c);
            if made.insert(cur.clone()) {
                ops.push(Op::Mkdir(under(&cur)?));
            }
        }
        Ok(())
    };
    let ro_bind = |ops: &mut Vec<Op>, src: &Path| -> Result<(), RuntimeError> {
        let flags =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | locked_flags(src);
        ops.push(Op::Bind { src: cstr(src)?, dst: under(src)?, remount: Some(flags) });
        Ok(())
    };

    // System directories: the real ones bound read-only, top-level symlinks (usr merge) recreated.
    let mut dirs: Vec<PathBuf> = vec![PathBuf::from("/usr")];
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let p = Path::new(top);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(p)?;
                ops.push(Op::Symlink { target: cstr(&target)?, link: under(p)? });
                made.insert(p.to_path_buf());
            }
            Ok(m) if m.is_dir() => dirs.push(p.to_path_buf()),
            _ => {}
        }
    }
    for d in python_dirs {
        // Only real directories, and never "/" (that would expose everything).
        let Ok(canon) = d.canonicalize() else { continue };
        if canon == Path::new("/") || !canon.is_dir() {
            continue;
        }
        dirs.push(d.clone());
    }
    dirs.sort();
    dirs.dedup();
    // Keep only outermost directories (a bind of /usr already shows /usr/lib/python3).
    let outer: Vec<PathBuf> =
        dirs.iter().filter(|d| !dirs.iter().any(|o| o != *d && d.starts_with(o))).cloned().collect();
    // Private scratch space, mounted before the binds: a Python environment that lives under
    // /tmp (a checkout in /tmp) is then bound on top of the private /tmp instead of hidden by it.
    for (dir, mode) in [("/tmp", "1777"), (WORK_DIR, "0777")] {
        mkdirs(&mut ops, &mut made, Path::new(dir))?;
        ops.push(Op::Tmpfs { dst: under(Path::new(dir))?, data: cstr(format!("{SCRATCH_SIZE},mode={mode}"))? });
    }
    for d in &outer {
        mkdirs(&mut ops, &mut made, d)?;
        ro_bind(&mut ops, d)?;
    }

    // /etc: only the dynamic linker's cache.
    mkdirs(&mut ops, &mut made, Path::new("/etc"))?;
    let cache = Path::new("/etc/ld.so.cache");
    if cache.is_file() {
        ops.push(Op::Touch(under(cache)?));
        ro_bind(&mut ops, cache)?;
    }

    // /dev: a tiny tmpfs with the harmless character devices bound in.
    mkdirs(&mut ops, &mut made, Path::new("/dev"))?;
    ops.push(Op::Tmpfs { dst: under(Path::new("/dev"))?, data: cstr("size=64k,mode=0755")? });
    for dev in ["null", "zero", "random", "urandom"] {
        let p = Path::new("/dev").join(dev);
        if p.exists() {
            ops.push(Op::Touch(under(&p)?));
            ops.push(Op::Bind { src: cstr(&p)?, dst: under(&p)?, remount: None });
        }
    }
    mkdirs(&mut ops, &mut made, Path::new("/proc"))?;
    ops.push(Op::Proc { dst: under(Path::new("/proc"))? });

    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let (uid_map, gid_map, deny_setgroups, drop_to) = if euid == 0 {
        (format!("0 0 1\n{NOBODY} {NOBODY} 1\n"), format!("0 0 1\n{NOBODY} {NOBODY} 1\n"), false, Some(NOBODY))
    } else {
        (format!("0 {euid} 1\n"), format!("0 {egid} 1\n"), true, None)
    };
    use nix::sys::resource::Resource;
    let mut rlimits = vec![
        (Resource::RLIMIT_CORE, 0),
        (Resource::RLIMIT_NOFILE, MAX_FILES),
        (Resource::RLIMIT_FSIZE, MAX_FILE_BYTES),
    ];
    if limits.max_processes > 0 {
        // Per user inside this user namespace; the worker itself is one of them.
        rlimits.push((Resource::RLIMIT_NPROC, limits.max_processes + 1));
    }
    Ok(Plan {
        root: cstr(root)?,
        ops,
        work_dir: cstr(WORK_DIR)?,
        hostname: cstr("etpo-sandbox")?,
        filter: Filter::new(),
        rlimits,
        uid_map: cstr(uid_map)?,
        gid_map: cstr(gid_map)?,
        deny_setgroups,
        drop_to,
    })
}

/// Turns -1 into the errno as an `io::Error`.
fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Writes a short static note to stderr (the worker's stderr pipe) so that a failed step can be
/// told apart in the diagnostics. Async-signal-safe.
fn note(step: &[u8]) {
    // SAFETY: write(2) of a valid buffer.
    unsafe {
        libc::write(2, b"etpo sandbox: failed at ".as_ptr().cast(), 24);
        libc::write(2, step.as_ptr().cast(), step.len());
        libc::write(2, b"\n".as_ptr().cast(), 1);
    }
}

fn step<T, E: Into<io::Error>>(name: &[u8], r: Result<T, E>) -> io::Result<T> {
    r.map_err(|e| {
        note(name);
        e.into()
    })
}

/// Writes `data` to `/proc/<pid>/<file>` without allocating.
fn write_proc(pid: libc::pid_t, file: &[u8], data: &[u8]) -> io::Result<()> {
    let mut buf = [0u8; 64];
    let mut n = 0;
    for b in b"/proc/" {
        buf[n] = *b;
        n += 1;
    }
    let mut digits = [0u8; 12];
    let mut d = 0;
    let mut v = pid as u32;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        buf[n] = digits[d];
        n += 1;
    }
    buf[n] = b'/';
    n += 1;
    for b in file {
        buf[n] = *b;
        n += 1;
    }
    buf[n] = 0;
    write_file(buf.as_ptr().cast(), data)
}

fn write_file(path: *const libc::c_char, data: &[u8]) -> io::Result<()> {
    // SAFETY: path is NUL-terminated; data is a valid buffer.
    unsafe {
        let fd = check(libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC))?;
        let r = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The pre_exec hook: runs in the forked child of `Command::spawn`, in the host's namespaces.
/// Returns only in the sandboxed grandchild, which then execs the interpreter.
fn enter(plan: &Plan, cgroup_procs: &[CString]) -> io::Result<()> {
    for procs in cgroup_procs {
        step(b"joining the cgroup", write_file(procs.as_ptr(), b"0"))?;
    }
    let mut sync = [0 as libc::c_int; 2];
    // SAFETY: raw system calls on valid buffers; the child branch continues like a fork child.
    unsafe {
        check(libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC))?;
        let flags = libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS;
        let pid =
            libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize);
        if pid < 0 {
            note(b"creating the namespaces (clone)");
            return Err(io::Error::last_os_error());
        }
        if pid > 0 {
            // I: map the ids, release G, then just mirror its life.
            let pid = pid as libc::pid_t;
            libc::close(sync[0]);
            let mut ok = true;
            if plan.deny_setgroups {
                ok &= write_proc(pid, b"setgroups\0", b"deny").is_ok();
            }
            ok &= write_proc(pid, b"uid_map\0", plan.uid_map.as_bytes()).is_ok();
            ok &= write_proc(pid, b"gid_map\0", plan.gid_map.as_bytes()).is_ok();
            if ok {
                libc::write(sync[1], b"1".as_ptr().cast(), 1);
            } else {
                note(b"writing the uid/gid maps");
                libc::kill(pid, libc::SIGKILL);
            }
            // Release std's exec-error pipe and the stdio pipes: only G holds them now.
            if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
                for fd in 0..1024 {
                    libc::close(fd);
                }
            }
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid || (r < 0 && *libc::__errno_location() != libc::EINTR) {
                    break;
                }
            }
            let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
            libc::_exit(code);
        }
        // G: wait for the maps.
        libc::close(sync[1]);
        let mut b = 0u8;
        if libc::read(sync[0], (&mut b as *mut u8).cast(), 1) != 1 {
            libc::_exit(111);
        }
        libc::close(sync[0]);
    }
    build_root(plan)?;
    confine(plan)
}

/// Builds the new root and pivots into it (in G, which has every capability in its namespaces).
/// The nix wrappers used here take the `CStr`s prepared before the fork and allocate nothing.
fn build_root(plan: &Plan) -> io::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sys::stat::Mode;
    use nix::unistd::{chdir, mkdir, pivot_root, symlinkat};
    const NONE: Option<&CStr> = None;
    let tmpfs = Some(c"tmpfs");
    step(b"making mounts private", mount(NONE, c"/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE))?;
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    step(
        b"mounting the root tmpfs",
        mount(tmpfs, plan.root.as_c_str(), tmpfs, nosuid_nodev, Some(c"size=1m,mode=0755")),
    )?;
    for op in &plan.ops {
        match op {
            Op::Mkdir(p) => match mkdir(p.as_c_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return step(b"mkdir", Err::<(), _>(e)),
            },
            Op::Touch(p) => {
                let flags = nix::fcntl::OFlag::O_CREAT | nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC;
                let fd = step(
                    b"creating a mount point file",
                    nix::fcntl::open(p.as_c_str(), flags, Mode::from_bits_truncate(0o644)),
                )?;
                drop(fd); // closes it: only the file is needed, as a mount point
            }
            Op::Symlink { target, link } => {
                step(b"symlink", symlinkat(target.as_c_str(), nix::fcntl::AT_FDCWD, link.as_c_str()))?
            }
            Op::Bind { src, dst, remount } => {
                step(
                    b"bind mount",
                    mount(Some(src.as_c_str()), dst.as_c_str(), NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE),
                )?;
                if let Some(flags) = remount {
                    step(
                        b"read-only remount",
                        mount(NONE, dst.as_c_str(), NONE, MsFlags::from_bits_retain(*flags), NONE),
                    )?;
                }
            }
            Op::Tmpfs { dst, data } => {
                step(b"mounting a tmpfs", mount(tmpfs, dst.as_c_str(), tmpfs, nosuid_nodev, Some(data.as_c_str())))?
            }
            Op::Proc { dst } => step(
                b"mounting /proc",
                mount(Some(c"proc"), dst.as_c_str(), Some(c"proc"), nosuid_nodev | MsFlags::MS_NOEXEC, NONE),
            )?,
        }
    }
    // pivot_root(".", ".") stacks the old root under the new one; detaching it leaves only the
    // new root.
    step(b"chdir to the new root", chdir(plan.root.as_c_str()))?;
    step(b"pivot_root", pivot_root(c".", c"."))?;
    step(b"detaching the old root", umount2(c".", MntFlags::MNT_DETACH))?;
    step(b"chdir /", chdir(c"/"))?;
    let read_only = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid_nodev;
    step(b"remounting the root read-only", mount(NONE, c"/", NONE, read_only, NONE))?;
    step(b"chdir to the work directory", chdir(plan.work_dir.as_c_str()))
}

/// Limits, no capabilities, no new privileges, seccomp (in G, just before exec).
fn confine(plan: &Plan) -> io::Result<()> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let _ = nix::unistd::sethostname(OsStr::from_bytes(plan.hostname.as_bytes()));
    for &(res, v) in &plan.rlimits {
        step(b"setrlimit", nix::sys::resource::setrlimit(res, v, v))?;
    }
    // Empty the capability bounding set, so that exec grants nothing even to uid 0 (nix has no
    // wrapper for these prctl options).
    // SAFETY: prctl with integer arguments only.
    unsafe {
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    }
    if let Some(id) = plan.drop_to {
        step(b"setgroups", setgroups(&[]))?;
        step(b"setresgid", setresgid(Gid::from_raw(id), Gid::from_raw(id), Gid::from_raw(id)))?;
        step(b"setresuid", setresuid(Uid::from_raw(id), Uid::from_raw(id), Uid::from_raw(id)))?;
    } else {
        // SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP(_LOCKED) | SECBIT_KEEP_CAPS_LOCKED
        // SAFETY: prctl with integer arguments only.
        step(b"securebits", check(unsafe { libc::prctl(libc::PR_SET_SECUREBITS, 0x2f, 0, 0, 0) }))?;
    }
    // After the uid change (which clears it): die with the launcher process.
    step(b"parent-death signal", nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL))?;
    step(b"no_new_privs", nix::sys::prctl::set_no_new_privs())?;
    step(b"installing the seccomp filter", plan.filter.install())
}

/// Keeps the last bytes of a worker's stderr, reading until it closes (so it never blocks).
fn drain(mut from: impl Read + Send + 'static, tail: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
            t.extend_from_slice(&buf[..n]);
            if t.len() > STDERR_TAIL {
                let cut = t.len() - STDERR_TAIL;
                t.drain(..cut);
            }
        }
    });
}

/// One running worker and everything that must go when it goes.
pub(crate) struct Sandbox {
    child: Child,
    /// `None` once shutting down (the worker exits when its input closes).
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    tail: Arc<Mutex<Vec<u8>>>,
    cgroup: Option<Cgroup>,
    python: PathBuf,
}

impl Sandbox {
    /// The worker's request channel; `None` after `shut_down`.
    pub(crate) fn worker_input(&self) -> Option<&ChildStdin> {
        self.stdin.as_ref()
    }

    /// Asks the worker to exit (closes its input); `drop` then waits briefly for it. Lets a pool
    /// stop all its workers at once, and lets their CPU time be accounted to us.
    pub(crate) fn shut_down(&mut self) {
        self.stdin = None;
    }

    pub(crate) fn worker_output(&self) -> &ChildStdout {
        &self.stdout
    }

    pub(crate) fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    pub(crate) fn python(&self) -> &Path {
        &self.python
    }

    /// The end of what the worker wrote to stderr (its own failures, not the program's output).
    pub(crate) fn stderr_tail(&self) -> String {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&t).into_owned()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // An idle worker exits at once when its input closes; give it a moment to, so that it
        // and the launcher are reaped in order.
        self.stdin = None;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
        while std::time::Instant::now() < until {
            match self.child.try_wait() {
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(2)),
                _ => break,
            }
        }
        // Killing the launcher process kills the worker (parent-death signal), whose exit as
        // PID 1 kills the rest of the namespace; the cgroup sweep catches any straggler.
        let _ = self.child.kill();
        if let Some(cg) = &self.cgroup {
            cg.kill_all();
        }
        let _ = self.child.wait();
    }
}

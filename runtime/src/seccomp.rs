//! The seccomp filter of the sandbox: a hand-built classic BPF program that refuses the system
//! calls generated machine-learning code never needs (debugging other processes, mounting,
//! namespaces, the kernel keyring, bpf, perf, modules, io_uring, reboot...) and every socket
//! family except AF_UNIX. Refused calls fail with an errno (EPERM, or EACCES for sockets), so the
//! program sees an ordinary Python exception rather than dying.

use std::io;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h) and seccomp constants (linux/seccomp.h).
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_JMP_JEQ_K: u16 = 0x15; // BPF_JMP (5) | BPF_JEQ (0x10) | BPF_K (0)
const BPF_JMP_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE (0x30)
const BPF_JMP_JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET (0x40)
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_MODE_FILTER: libc::c_ulong = 2;

// Offsets in struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64).
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Namespace flags of clone(2): creating namespaces is refused.
const CLONE_NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// System calls refused with EPERM.
fn denied() -> Vec<libc::c_long> {
    #[allow(unused_mut)]
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib, libc::SYS_modify_ldt]);
    v
}

/// A compiled filter, built before the sandbox forks (installing it allocates nothing).
pub(crate) struct Filter {
    prog: Vec<libc::sock_filter>,
}

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

impl Filter {
    pub(crate) fn new() -> Filter {
        let errno = |e: i32| stmt(BPF_RET_K, SECCOMP_RET_ERRNO | e as u32);
        let mut p = vec![
            stmt(BPF_LD_W_ABS, OFF_ARCH),
            jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 1, 0),
            stmt(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
            stmt(BPF_LD_W_ABS, OFF_NR),
        ];
        // x32 system calls on x86_64 carry bit 30; none is needed.
        if cfg!(target_arch = "x86_64") {
            p.push(jump(BPF_JMP_JGE_K, 0x4000_0000, 0, 1));
            p.push(errno(libc::EPERM));
        }
        for nr in denied() {
            p.push(jump(BPF_JMP_JEQ_K, nr as u32, 0, 1));
            p.push(errno(libc::EPERM));
        }
        // clone3 passes its flags in memory the filter cannot read: make libc fall back to clone.
        p.push(jump(BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, 0, 1));
        p.push(errno(libc::ENOSYS));
        // clone: refuse namespace flags (threads and fork pass none).
        p.extend([
            jump(BPF_JMP_JEQ_K, libc::SYS_clone as u32, 0, 4),
            stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
            jump(BPF_JMP_JSET_K, CLONE_NS_FLAGS, 0, 1),
            errno(libc::EPERM),
            stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        ]);
        // socket / socketpair: AF_UNIX only.
        for nr in [libc::SYS_socket, libc::SYS_socketpair] {
            p.extend([
                jump(BPF_JMP_JEQ_K, nr as u32, 0, 4),
                stmt(BPF_LD_W_ABS, OFF_ARG0_LO),
                jump(BPF_JMP_JEQ_K, libc::AF_UNIX as u32, 1, 0),
                errno(libc::EACCES),
                stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            ]);
        }
        p.push(stmt(BPF_RET_K, SECCOMP_RET_ALLOW));
        Filter { prog: p }
    }

    /// Installs the filter on the calling thread (inherited by children and across exec).
    /// Requires `PR_SET_NO_NEW_PRIVS` first. Async-signal-safe: callable between fork and exec.
    pub(crate) fn install(&self) -> io::Result<()> {
        let fprog = libc::sock_fprog { len: self.prog.len() as u16, filter: self.prog.as_ptr() as *mut _ };
        // SAFETY: fprog points at a live, well-formed program for the duration of the call.
        let r = unsafe { libc::prctl(libc::PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog as *const libc::sock_fprog) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forks, installs the filter in the child, runs `probe` there and returns its exit code.
    fn in_filtered_child(filter: &Filter, probe: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw system calls and exits with _exit.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || filter.install().is_err() {
                    libc::_exit(100);
                }
                libc::_exit(probe());
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            assert!(libc::WIFEXITED(status), "child died: status {status}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn refuses_inet_sockets_and_allows_unix_ones() {
        let f = Filter::new();
        let inet = in_filtered_child(&f, || unsafe {
            if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(inet, libc::EACCES);
        let inet6 = in_filtered_child(&f, || unsafe {
            if libc::socket(libc::AF_INET6, libc::SOCK_DGRAM, 0) >= 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(inet6, libc::EACCES);
        let unix = in_filtered_child(&f, || unsafe {
            if libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) >= 0 {
                0
            } else {
                errno()
            }
        });
        assert_eq!(unix, 0);
    }

    #[test]
    fn refuses_namespaces_ptrace_and_mount_but_allows_fork() {
        let f = Filter::new();
        let ns = in_filtered_child(&f, || unsafe {
            if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(ns, libc::EPERM);
        let clone_ns = in_filtered_child(&f, || unsafe {
            let r = libc::syscall(libc::SYS_clone, (libc::CLONE_NEWNET | libc::SIGCHLD) as libc::c_ulong, 0, 0, 0, 0);
            if r == 0 {
                libc::_exit(0);
            }
            if r > 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(clone_ns, libc::EPERM);
        let trace = in_filtered_child(&f, || unsafe {
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) == 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(trace, libc::EPERM);
        let mount = in_filtered_child(&f, || unsafe {
            let r = libc::mount(c"none".as_ptr(), c"/".as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null());
            if r == 0 {
                1
            } else {
                errno()
            }
        });
        assert_eq!(mount, libc::EPERM);
        let fork = in_filtered_child(&f, || unsafe {
            let pid = libc::fork();
            if pid == 0 {
                libc::_exit(7);
            }
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            libc::WEXITSTATUS(st)
        });
        assert_eq!(fork, 7);
    }
}

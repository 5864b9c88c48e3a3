//! Seccomp filters that bwrap installs before running the tool
//! (`--add-seccomp-fd`), as defence in depth behind the namespaces.
//!
//! The filters are deny lists: they take away kernel interfaces a shell
//! never needs and that widen the kernel attack surface (new namespaces,
//! ptrace, keyrings, BPF, io_uring, mounts, module loading). Two programs,
//! because one seccompiler filter has one action: EPERM for refused calls,
//! ENOSYS for `clone3` and the new mount API so that libc falls back to the
//! calls the first filter can inspect. Any other architecture (32-bit
//! syscalls through `int 0x80`) kills the process.
//!
//! Networking is left to the network namespace: with network off the
//! sandbox has only its own loopback, so local servers inside one command
//! keep working and nothing outside is reachable. This module only builds
//! bytes; it must not install filters itself.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// The two compiled programs, in the byte layout bwrap reads.
#[derive(Clone, Debug)]
pub(crate) struct Programs {
    pub(crate) eperm: Vec<u8>,
    pub(crate) enosys: Vec<u8>,
}

/// Namespace flags of clone(2) that a tool must not use.
const CLONE_NS_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// Terminal ioctls that inject input (generic Linux numbers, as in
/// `asm-generic/ioctls.h`, used by x86_64 and aarch64).
const TIOCSTI: u64 = 0x5412;
const TIOCLINUX: u64 = 0x541C;

fn always() -> Vec<SeccompRule> {
    Vec::new()
}

fn eperm_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fanotify_init,
    ]
    .into_iter()
    .map(|nr| (nr, always()))
    .collect();
    #[cfg(target_arch = "x86_64")]
    for nr in [libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib, libc::SYS_modify_ldt] {
        rules.insert(nr, always());
    }

    // clone(flags, ...) with any namespace flag: one rule per flag (OR).
    let clone_rules = CLONE_NS_FLAGS
        .iter()
        .map(|flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(*flag),
                *flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);

    // ioctl(fd, TIOCSTI/TIOCLINUX): pushing input into a terminal.
    let ioctl_rules = [TIOCSTI, TIOCLINUX]
        .into_iter()
        .map(|req| SeccompRule::new(vec![SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)?]))
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    Ok(rules)
}

fn enosys_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    [
        libc::SYS_clone3,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
    ]
    .into_iter()
    .map(|nr| (nr, always()))
    .collect()
}

/// Compiles both programs for the architecture we run on.
pub(crate) fn build() -> Result<Programs, String> {
    let arch =
        TargetArch::try_from(std::env::consts::ARCH).map_err(|e| format!("seccomp: unsupported architecture: {e}"))?;
    let compile = |rules, errno: i32| -> Result<Vec<u8>, String> {
        let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch)
            .map_err(|e| format!("seccomp: {e}"))?;
        let program: BpfProgram = filter.try_into().map_err(|e| format!("seccomp: {e:?}"))?;
        Ok(to_bytes(&program))
    };
    let eperm = eperm_rules().map_err(|e| format!("seccomp: {e}"))?;
    Ok(Programs { eperm: compile(eperm, libc::EPERM)?, enosys: compile(enosys_rules(), libc::ENOSYS)? })
}

/// `struct sock_filter` array as raw bytes (native endianness).
fn to_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for ins in program {
        out.extend_from_slice(&ins.code.to_ne_bytes());
        out.push(ins.jt);
        out.push(ins.jf);
        out.extend_from_slice(&ins.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn programs_compile_to_whole_instructions() {
        let p = super::build().unwrap();
        assert!(!p.eperm.is_empty() && p.eperm.len().is_multiple_of(8));
        assert!(!p.enosys.is_empty() && p.enosys.len().is_multiple_of(8));
        // BPF programs are limited to 4096 instructions.
        assert!(p.eperm.len() / 8 < 4096);
    }
}

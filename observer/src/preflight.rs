//! Checks made before loading anything, so that a host that cannot run observer gets a sentence
//! saying why, not a verifier dump or an errno.

use std::{fs, path::Path};

use crate::kernel::{self, KernelVersion};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "observer needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (or CAP_SYS_ADMIN for all three) \
         and this process lacks {missing}: CAP_BPF loads the programs and maps, CAP_NET_ADMIN \
         attaches them to the cgroup, CAP_PERFMON lets the verifier skip the Spectre masking it \
         adds to every map access of an unprivileged program. Run it as root; in a container \
         add those capabilities (Kubernetes: securityContext.capabilities.add [BPF, PERFMON, \
         NET_ADMIN]; ECS and Docker 20.10, which do not know BPF and PERFMON: \
         SYS_ADMIN and NET_ADMIN)"
    )]
    MissingCapabilities { missing: String },
    #[error(
        "this kernel is {running} and observer needs {oldest} or newer: it attaches its \
         programs to the cgroup v2 root with bpf links, which came in Linux {oldest} (Amazon \
         Linux 2's 5.10, Amazon Linux 2023 and Bottlerocket's 6.1 and every later kernel have \
         them)"
    )]
    KernelTooOld {
        running: KernelVersion,
        oldest: KernelVersion,
    },
    #[error(
        "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): observer needs a kernel \
         built with CONFIG_DEBUG_INFO_BTF=y (Amazon Linux 2023, Bottlerocket and current distro \
         kernels have it)"
    )]
    NoBtf,
    #[error(
        "this kernel cannot load cgroup_skb programs: it needs CONFIG_BPF_SYSCALL and \
         CONFIG_CGROUP_BPF, which every distribution kernel has"
    )]
    NoCgroupBpf,
}

/// Effective capability set from the `CapEff:` line of /proc/<pid>/status.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Names of the capabilities observer needs that `caps` lacks; empty when it has enough.
pub fn missing_capabilities(caps: u64) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(has(CAP_BPF) || sys_admin) {
        missing.push("CAP_BPF");
    }
    if !(has(CAP_PERFMON) || sys_admin) {
        missing.push("CAP_PERFMON");
    }
    if !(has(CAP_NET_ADMIN) || sys_admin) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}

/// Fails for a kernel older than [`kernel::OLDEST`]; an unreadable version passes (the kernel
/// decides at load time).
pub fn check_kernel(running: Option<KernelVersion>) -> Result<(), PreflightError> {
    match running {
        Some(running) if running < kernel::OLDEST => Err(PreflightError::KernelTooOld {
            running,
            oldest: kernel::OLDEST,
        }),
        _ => Ok(()),
    }
}

/// Everything observer needs from the host before it loads its programs.
pub fn check() -> Result<(), PreflightError> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    // If /proc cannot tell, let the kernel decide at load time.
    if let Some(caps) = effective_capabilities(&status) {
        let missing = missing_capabilities(caps);
        if !missing.is_empty() {
            return Err(PreflightError::MissingCapabilities {
                missing: missing.join(" and "),
            });
        }
    }
    check_kernel(KernelVersion::running())?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(PreflightError::NoBtf);
    }
    if !aya::sys::is_program_supported(aya::programs::ProgramType::CgroupSkb).unwrap_or(true) {
        return Err(PreflightError::NoCgroupBpf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        let status = "Name:\tobserver\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
        assert_eq!(effective_capabilities("Name: x\n"), None);
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
    }

    #[test]
    fn a_kernel_older_than_5_7_is_refused_with_a_sentence() {
        let err = check_kernel(Some(KernelVersion::new(5, 4)))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("this kernel is 5.4 and observer needs 5.7 or newer"),
            "{err}"
        );
        assert!(check_kernel(Some(KernelVersion::new(4, 14))).is_err());
    }

    #[test]
    fn supported_and_unknown_kernels_pass() {
        assert!(check_kernel(Some(KernelVersion::new(5, 7))).is_ok());
        assert!(check_kernel(Some(KernelVersion::new(5, 10))).is_ok());
        assert!(check_kernel(Some(KernelVersion::new(6, 12))).is_ok());
        assert!(check_kernel(None).is_ok());
    }

    #[test]
    fn root_has_everything() {
        assert!(missing_capabilities(0x1ff_ffff_ffff).is_empty());
    }

    #[test]
    fn unprivileged_lacks_both() {
        assert_eq!(
            missing_capabilities(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
    }

    #[test]
    fn sys_admin_stands_in_for_both() {
        assert!(missing_capabilities(1 << CAP_SYS_ADMIN).is_empty());
    }

    #[test]
    fn bpf_without_net_admin_is_not_enough() {
        assert_eq!(
            missing_capabilities(1 << CAP_BPF),
            vec!["CAP_PERFMON", "CAP_NET_ADMIN"]
        );
        assert_eq!(
            missing_capabilities((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)),
            vec!["CAP_PERFMON"]
        );
        let daemonset = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN);
        assert!(missing_capabilities(daemonset).is_empty());
    }
}

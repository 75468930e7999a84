//! The running kernel's version and what observer uses that needs a newer kernel: every such
//! feature is gated here, so the oldest supported kernel and the fallbacks are read in one place.
//!
//! Versions are parsed from the release string (`uname -r`: `5.10.0-32-amd64`,
//! `6.1.176-1.amzn2023.x86_64`); distributions backport features, so the version decides only
//! what must exist, and a feature that may be missing is still probed where it is used.

use std::fmt;

/// A kernel version, major.minor (the patch level changes no feature observer uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// The leading `major.minor` of a release string; None if it does not start with one.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some(Self { major, minor })
    }

    /// The running kernel's, from uname(2); None if it cannot be read or parsed.
    pub fn running() -> Option<Self> {
        Self::parse(&release()?)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// `uname -r`.
pub fn release() -> Option<String> {
    // SAFETY: utsname is plain bytes, for which all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the struct we pass; the release field is NUL-terminated.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// bpf links for cgroup programs (BPF_LINK_CREATE for cgroup_skb): how observer attaches, and
/// what lets its pinned programs outlive it. Nothing older can run observer.
pub const CGROUP_LINKS: KernelVersion = KernelVersion::new(5, 7);
/// BPF_MAP_LOOKUP_BATCH: one syscall per few thousand cgroups; older kernels are read key by key.
pub const BATCH_LOOKUPS: KernelVersion = KernelVersion::new(5, 6);
/// `bpf_cast_to_kern_ctx`: the cache keyed by the cgroup's serial number, no helper call per
/// packet; older kernels key it by cgroup id, a few ns more per packet. Detected from the
/// kernel's BTF (cache_key.rs), not by version, since distributions backport.
pub const KERN_CTX_KFUNC: KernelVersion = KernelVersion::new(6, 3);
/// The oldest kernel observer runs on: what its required features need.
pub const OLDEST: KernelVersion = CGROUP_LINKS;
/// The oldest kernel `cargo xtask vm-test` boots on every CI run (Amazon Linux 2's).
pub const OLDEST_TESTED: KernelVersion = KernelVersion::new(5, 10);

/// What the running kernel offers of the features that need a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Read the traffic map in batches (else key by key).
    pub batch_lookups: bool,
}

impl Features {
    /// For `version`; an unknown version assumes a current kernel, and the use sites still
    /// fall back when the kernel refuses.
    pub fn of(version: Option<KernelVersion>) -> Self {
        let at_least = |v: KernelVersion| version.is_none_or(|k| k >= v);
        Self {
            batch_lookups: at_least(BATCH_LOOKUPS),
        }
    }

    pub fn running() -> Self {
        Self::of(KernelVersion::running())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_strings_of_the_kernels_operators_run() {
        let v = |s| KernelVersion::parse(s);
        assert_eq!(v("5.10.0-32-amd64"), Some(KernelVersion::new(5, 10)));
        assert_eq!(
            v("6.1.176-1.amzn2023.x86_64"),
            Some(KernelVersion::new(6, 1))
        );
        assert_eq!(v("6.12.117+deb13-amd64"), Some(KernelVersion::new(6, 12)));
        assert_eq!(
            v("4.14.355-275.582.amzn2.x86_64"),
            Some(KernelVersion::new(4, 14))
        );
        assert_eq!(v("6.18"), Some(KernelVersion::new(6, 18)));
        assert_eq!(v("linux"), None);
        assert_eq!(v("6"), None);
    }

    #[test]
    fn versions_compare_by_minor_as_a_number() {
        assert!(KernelVersion::new(5, 10) > KernelVersion::new(5, 7));
        assert!(KernelVersion::new(6, 1) > KernelVersion::new(5, 19));
        assert!(KernelVersion::new(5, 4) < OLDEST);
        assert!(OLDEST <= OLDEST_TESTED);
    }

    #[test]
    fn batch_lookups_from_5_6() {
        let of = |major, minor| Features::of(Some(KernelVersion::new(major, minor)));
        assert!(!of(5, 4).batch_lookups);
        assert!(of(5, 6).batch_lookups);
        assert!(of(6, 12).batch_lookups);
        assert!(Features::of(None).batch_lookups);
    }

    #[test]
    fn the_running_kernel_is_read() {
        let release = release().expect("uname");
        assert_eq!(KernelVersion::running(), KernelVersion::parse(&release));
        assert!(KernelVersion::running().is_some(), "{release}");
    }
}

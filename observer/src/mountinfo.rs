//! `/proc/<pid>/mountinfo`, parsed in one place for everyone who looks for a mount: the cgroup
//! v2 root the programs attach at (`cgroupfs`), and the v1 and v2 hierarchies CPU and memory are
//! read from (`resources`).
//!
//! A line is `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype>
//! <source> <super options>` (proc(5)); a line that is not is skipped.

use std::{fs, io, path::PathBuf};

/// This process's mount table.
pub const SELF: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Which directory of the file system the mount shows: "/" for all of it. A cgroup
    /// hierarchy mounted inside a cgroup namespace shows "/.." when the mounted directory lies
    /// above the namespace's root.
    pub root: String,
    pub mount_point: PathBuf,
    /// "cgroup2", "cgroup" (v1), "tmpfs", ...
    pub fstype: String,
    /// Per-superblock options, comma-separated: a v1 cgroup hierarchy's controllers are here
    /// ("rw,cpu,cpuacct", "rw,name=systemd").
    pub super_options: String,
}

impl Mount {
    /// The super options one by one.
    pub fn options(&self) -> impl Iterator<Item = &str> {
        self.super_options.split(',').filter(|o| !o.is_empty())
    }
}

/// Every mount in the text of a mountinfo file, in its order.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts of this process's mount namespace ([`SELF`]).
pub fn read_self() -> io::Result<Vec<Mount>> {
    fs::read_to_string(SELF).map(|text| parse(&text))
}

fn parse_line(line: &str) -> Option<Mount> {
    // The optional fields vary in number; " - " ends them.
    let (left, right) = line.split_once(" - ")?;
    let mut right = right.split_whitespace();
    let fstype = right.next()?.to_owned();
    let super_options = right.nth(1).unwrap_or_default().to_owned();
    let mut left = left.split_whitespace();
    let root = unescape(left.nth(3)?);
    let mount_point = PathBuf::from(unescape(left.next()?));
    Some(Mount {
        root,
        mount_point,
        fstype,
        super_options,
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\')
            .then(|| s.get(i + 1..i + 4))
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn lines_become_mounts() {
        let mounts = parse(
            "29 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n\
             34 25 0:29 /.. /host/sys/fs/cgroup/cpu,cpuacct rw shared:16 master:3 - cgroup cgroup rw,cpu,cpuacct\n",
        );
        assert_eq!(
            mounts[0],
            Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup".into(),
                fstype: "tmpfs".into(),
                super_options: "ro,mode=755".into(),
            }
        );
        let v1 = &mounts[1];
        assert_eq!(v1.root, "/..");
        assert_eq!(v1.mount_point, Path::new("/host/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(v1.options().collect::<Vec<_>>(), ["rw", "cpu", "cpuacct"]);
    }

    #[test]
    fn garbage_is_skipped() {
        assert!(parse("").is_empty());
        assert!(parse("garbage\n1 2 3\n - cgroup\n").is_empty());
        assert!(parse("garbage line without separator\n - \n").is_empty());
        // No source or super options: still a mount.
        let bare = parse("1 2 0:1 / /a rw - cgroup2\n");
        assert_eq!(bare[0].super_options, "");
    }

    #[test]
    fn escaped_fields_are_unescaped() {
        let escaped = parse("1 2 0:1 / /a\\040b rw - cgroup2 cgroup2 rw\n");
        assert_eq!(escaped[0].mount_point, Path::new("/a b"));
        let line = "30 29 0:27 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse(line)[0].mount_point, Path::new("/mnt/my cgroups"));
        assert_eq!(unescape("/a\\134b\\011c"), "/a\\b\tc");
        // Not an escape: kept as it is.
        assert_eq!(unescape("/a\\x"), "/a\\x");
        assert_eq!(unescape("/a\\"), "/a\\");
    }

    #[test]
    fn this_process_has_mounts() {
        assert!(read_self()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == Path::new("/")));
    }
}

//! A sysctl set for the life of a guard and restored when it drops (also on panic).

use std::fs;

pub struct Sysctl {
    path: String,
    previous: String,
}

impl Sysctl {
    /// Sets `name` (dotted, e.g. "kernel.bpf_stats_enabled") to `value`.
    pub fn set(name: &str, value: &str) -> anyhow::Result<Self> {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let previous = fs::read_to_string(&path)?.trim().to_owned();
        fs::write(&path, value)?;
        Ok(Self { path, previous })
    }

    /// Sets it again (to another value) while the guard lives; the drop still restores the
    /// value from before [`Sysctl::set`].
    pub fn write(&self, value: &str) -> anyhow::Result<()> {
        fs::write(&self.path, value)?;
        Ok(())
    }

    pub fn previous(&self) -> &str {
        &self.previous
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.previous) {
            eprintln!("could not restore {} to {}: {e}", self.path, self.previous);
        }
    }
}

//! Real Docker containers for the tests: a busybox image imported without a registry, and a
//! guard that removes the containers it started (and the cgroup parents it asked for) when
//! dropped, also when the test fails.
//!
//! The image is built from the static `/bin/busybox` of Debian's busybox-static: a rootfs
//! with a symlink per applet, `/etc/passwd` and `/etc/group`, piped to `docker import`.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{bail, Context};

use crate::sh;

/// The tag of the imported busybox image.
pub const BUSYBOX_IMAGE: &str = "local/busybox";

/// Why Docker tests cannot run here, or None when they can (root and `docker info` answers).
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("needs root (the Docker socket, cgroups)".into());
    }
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`docker info` failed: {} (start dockerd: cargo xtask setup)",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run docker: {e}")),
    }
}

/// Returns true (and says why) when `test` cannot use Docker here; under CI a skip fails.
pub fn skip_unless_docker(test: &str) -> bool {
    match unavailable() {
        Some(why) => crate::skip(test, &why),
        None => false,
    }
}

/// The bridge of Docker's default network: where a bridge-mode container reaches the host.
pub const DEFAULT_BRIDGE: &str = "docker0";

/// docker0's IPv4 address, read from the kernel (`ip -4 addr`). Docker's own answer is not
/// used: on a fresh engine `docker network inspect bridge` has no IPAM `Gateway` at all.
pub fn bridge_address() -> anyhow::Result<std::net::Ipv4Addr> {
    let out = sh("ip", &["-4", "-o", "addr", "show", "dev", DEFAULT_BRIDGE])?;
    first_ipv4(&out).with_context(|| {
        format!("{DEFAULT_BRIDGE} has no IPv4 address (`ip -4 -o addr show dev {DEFAULT_BRIDGE}` printed {out:?}); is dockerd running with its default bridge?")
    })
}

/// The first `inet A.B.C.D/N` address in `ip -o addr` output.
pub fn first_ipv4(ip_output: &str) -> Option<std::net::Ipv4Addr> {
    let mut words = ip_output.split_whitespace();
    while let Some(word) = words.next() {
        if word == "inet" {
            let addr = words.next()?;
            return addr.split('/').next()?.parse().ok();
        }
    }
    None
}

/// Makes sure [`BUSYBOX_IMAGE`] exists, importing it from `/bin/busybox` if not.
pub fn busybox_image() -> anyhow::Result<&'static str> {
    // One import at a time within this process; another process importing the same tag at
    // the same moment only retags an identical image.
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exists = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", BUSYBOX_IMAGE])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        import_busybox(Path::new("/bin/busybox"))?;
    }
    Ok(BUSYBOX_IMAGE)
}

fn import_busybox(busybox: &Path) -> anyhow::Result<()> {
    let ldd = Command::new("ldd").arg(busybox).output();
    let dynamic = ldd.is_ok_and(|o| o.status.success());
    if !busybox.is_file() || dynamic {
        bail!(
            "{} is missing or not static: apt-get install busybox-static",
            busybox.display()
        );
    }
    let root = std::env::temp_dir().join(crate::unique("busybox-rootfs"));
    let result = (|| {
        for dir in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        std::fs::copy(busybox, root.join("bin/busybox"))?;
        let applets = sh(&busybox.to_string_lossy(), &["--list"])?;
        for applet in applets.lines().filter(|a| !a.is_empty() && *a != "busybox") {
            let link = root.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", link)?;
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        )?;
        std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
        let tar = Command::new("tar")
            .args(["-C"])
            .arg(&root)
            .args(["-c", "."])
            .output()
            .context("tar")?;
        if !tar.status.success() {
            bail!("tar: {}", String::from_utf8_lossy(&tar.stderr));
        }
        let mut import = Command::new("docker")
            .args(["import", "-c", r#"CMD ["/bin/sh"]"#, "-", BUSYBOX_IMAGE])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("docker import")?;
        import.stdin.take().expect("piped").write_all(&tar.stdout)?;
        let out = import.wait_with_output()?;
        if !out.status.success() {
            bail!("docker import: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// The labels the ECS agent puts on every container of a task.
#[derive(Debug, Clone)]
pub struct EcsLabels<'a> {
    pub task_arn: &'a str,
    pub container_name: &'a str,
    pub cluster: &'a str,
    pub family: &'a str,
    pub version: &'a str,
}

/// Options of one `docker run -d`.
#[derive(Debug, Clone, Default)]
pub struct Run {
    args: Vec<String>,
    cmd: Vec<String>,
}

impl Run {
    /// A container that sleeps for an hour (removed by the guard long before).
    pub fn new() -> Self {
        Self::default()
    }

    pub fn name(self, name: &str) -> Self {
        self.arg("--name").arg(name)
    }

    pub fn label(self, key: &str, value: &str) -> Self {
        self.arg("--label").arg(&format!("{key}={value}"))
    }

    /// The five `com.amazonaws.ecs.*` labels.
    pub fn ecs(self, labels: &EcsLabels<'_>) -> Self {
        self.label("com.amazonaws.ecs.task-arn", labels.task_arn)
            .label("com.amazonaws.ecs.container-name", labels.container_name)
            .label("com.amazonaws.ecs.cluster", labels.cluster)
            .label("com.amazonaws.ecs.task-definition-family", labels.family)
            .label("com.amazonaws.ecs.task-definition-version", labels.version)
    }

    /// `--cgroup-parent`, e.g. `/ecs/<task id>`.
    pub fn cgroup_parent(self, parent: &str) -> Self {
        self.arg("--cgroup-parent").arg(parent)
    }

    /// `--network`: `bridge`, `host`, `none`, `container:<id>`.
    pub fn network(self, mode: &str) -> Self {
        self.arg("--network").arg(mode)
    }

    /// Any other `docker run` option.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }

    /// The command to run instead of `sleep 3600`.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// Containers started by a test; removed with `docker rm -f` on drop, and their cgroup parents
/// removed from every hierarchy (Docker's cgroupfs driver leaves them behind).
#[derive(Debug, Default)]
pub struct Containers {
    ids: Vec<String>,
    cgroup_parents: Vec<String>,
}

impl Containers {
    pub fn new() -> Self {
        Self::default()
    }

    /// `docker run -d` with `run`'s options on the busybox image; returns the full id.
    pub fn start(&mut self, run: Run) -> anyhow::Result<String> {
        let image = busybox_image()?;
        self.note_cgroup_parent(&run);
        let id = docker_run(image, &run)?;
        self.ids.push(id.clone());
        Ok(id)
    }

    /// Remembers `run`'s `--cgroup-parent`, to remove it on drop.
    fn note_cgroup_parent(&mut self, run: &Run) {
        if let Some(i) = run.args.iter().position(|a| a == "--cgroup-parent") {
            if let Some(parent) = run.args.get(i + 1) {
                self.cgroup_parents.push(parent.clone());
            }
        }
    }

    /// Starts every one of `runs` at once (a `docker run` thread each); returns their ids in
    /// the order of `runs`. Those that started are removed with the rest even if one failed.
    pub fn start_many(&mut self, runs: Vec<Run>) -> anyhow::Result<Vec<String>> {
        let image = busybox_image()?;
        for run in &runs {
            self.note_cgroup_parent(run);
        }
        let results: Vec<anyhow::Result<String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = runs
                .iter()
                .map(|run| scope.spawn(move || docker_run(image, run)))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("a docker run thread panicked"))
                .collect()
        });
        self.ids.extend(results.iter().flatten().cloned());
        results.into_iter().collect()
    }

    /// Stops and removes every container of this guard now, with one `docker rm -f`.
    pub fn remove_all(&mut self) -> anyhow::Result<()> {
        if self.ids.is_empty() {
            return Ok(());
        }
        let mut args = vec!["rm", "-f"];
        args.extend(self.ids.iter().map(String::as_str));
        sh("docker", &args)?;
        self.ids.clear();
        Ok(())
    }

    /// Stops and removes one container now (a task that stopped).
    pub fn remove(&mut self, id: &str) -> anyhow::Result<()> {
        sh("docker", &["rm", "-f", id])?;
        self.ids.retain(|i| i != id);
        Ok(())
    }

    pub fn ids(&self) -> &[String] {
        &self.ids
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(self.ids.iter().map(String::as_str));
            if let Err(e) = sh("docker", &args) {
                eprintln!("cleanup: {e}");
            }
        }
        for parent in &self.cgroup_parents {
            remove_cgroup_dirs(parent);
        }
    }
}

/// `docker run -d` of `run` on `image`; the full id of the container.
fn docker_run(image: &str, run: &Run) -> anyhow::Result<String> {
    let mut args: Vec<&str> = vec!["run", "-d"];
    args.extend(run.args.iter().map(String::as_str));
    args.push(image);
    if run.cmd.is_empty() {
        args.extend(["sleep", "3600"]);
    } else {
        args.extend(run.cmd.iter().map(String::as_str));
    }
    let id = sh("docker", &args)?.trim().to_owned();
    if id.len() != 64 {
        bail!("docker run printed {id:?}, not a container id");
    }
    Ok(id)
}

/// rmdir `parent` (relative to a hierarchy root) in every cgroup hierarchy, deepest first;
/// failures (still in use, not there) are left alone.
fn remove_cgroup_dirs(parent: &str) {
    let relative = parent.trim_matches('/');
    if relative.is_empty() || relative.contains("..") {
        return;
    }
    let mut roots = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()));
    }
    for root in roots {
        // /ecs/<task> then /ecs (only if empty: other tests may use it).
        let mut path = Path::new(relative);
        loop {
            let _ = std::fs::remove_dir(root.join(path));
            match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => path = p,
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_of_a_bridge_comes_from_ip_addr() {
        let out = "5: docker0    inet 172.17.0.1/16 brd 172.17.255.255 scope global docker0\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(first_ipv4(out), Some("172.17.0.1".parse().unwrap()));
        assert_eq!(first_ipv4(""), None);
        assert_eq!(first_ipv4("5: docker0 inet garbage"), None);
    }
}

//! A real Prometheus server for the tests (Debian package `prometheus`, which also ships
//! `promtool`): started on loopback in a temporary directory, scraping one target every
//! second, queried through its HTTP API; killed, and its directory removed, when dropped.
//! Plus the small tools around it: a scrape of /metrics, `promtool check metrics`, a free
//! port.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// The scrape job's name: queries select `up{job="observer"}`.
pub const JOB: &str = "observer";

/// How long Prometheus may take to listen on its port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One sample of an instant query: its labels (a JSON object) and value.
pub type Sample = (Value, f64);

/// The `prometheus` and `promtool` binaries.
#[derive(Debug, Clone)]
pub struct Tools {
    pub prometheus: PathBuf,
    pub promtool: PathBuf,
}

/// Both binaries, or None when either is missing.
pub fn tools() -> Option<Tools> {
    Some(Tools {
        prometheus: find("prometheus")?,
        promtool: find("promtool")?,
    })
}

/// The binaries; None (and says so) when `test` cannot run because they are not installed.
pub fn skip_unless_prometheus(test: &str) -> Option<Tools> {
    let found = tools();
    if found.is_none() {
        crate::skip(
            test,
            "prometheus/promtool not installed (apt-get install prometheus, or cargo xtask setup --for-tests)",
        );
    }
    found
}

/// `name` on PATH or in /usr/bin.
pub fn find(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A loopback port nobody listened on a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Prometheus server in a temporary directory, scraping one target every second; killed,
/// and the directory removed, on drop.
pub struct PrometheusServer {
    child: Mutex<Child>,
    dir: PathBuf,
    base: String,
    http: reqwest::Client,
}

impl PrometheusServer {
    /// Starts `binary` scraping `target` (job [`JOB`]) every second, and waits until it
    /// listens. A port taken between choosing it and binding it is chosen again.
    pub fn start(binary: &Path, target: SocketAddr) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("observer-prometheus"));
        // From here on the directory goes with the guard, or with this closure's error.
        let started = (|| {
            std::fs::create_dir_all(dir.join("data"))?;
            let config = dir.join("prometheus.yml");
            std::fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  \
                     evaluation_interval: 1s\n\
                     scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
                     - targets: ['{target}']\n"
                ),
            )?;
            let mut last_error = None;
            for _ in 0..3 {
                match Self::spawn(binary, &dir, &config)? {
                    Ok(started) => return Ok(started),
                    Err(e) => last_error = Some(e),
                }
            }
            Err(last_error.expect("three attempts"))
        })();
        match started {
            Ok((child, port)) => Ok(Self {
                child: Mutex::new(child),
                dir,
                base: format!("http://127.0.0.1:{port}"),
                http: reqwest::Client::new(),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// One attempt: Ok(Ok) once it listens, Ok(Err) when it lost its port to someone else
    /// (try again), Err when it failed otherwise.
    fn spawn(
        binary: &Path,
        dir: &Path,
        config: &Path,
    ) -> anyhow::Result<anyhow::Result<(Child, u16)>> {
        let port = free_port()?;
        let log_path = dir.join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let mut child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let why = anyhow::anyhow!(
                    "prometheus exited ({status}) before listening:\n{}",
                    tail(&log)
                );
                return if log.contains("address already in use") {
                    Ok(Err(why))
                } else {
                    Err(why)
                };
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Ok((child, port)));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "prometheus did not listen on 127.0.0.1:{port} within {START_TIMEOUT:?}:\n{}",
                    tail(&std::fs::read_to_string(&log_path).unwrap_or_default())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its HTTP API, `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The end of Prometheus' log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default())
    }

    /// An error with the log's end if the server has exited.
    fn ensure_running(&self) -> anyhow::Result<()> {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(status) = child.try_wait()? {
            bail!("prometheus exited ({status}):\n{}", self.log_tail());
        }
        Ok(())
    }

    /// The samples of an instant query.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Sample>> {
        let url = format!(
            "{}/api/v1/query?query={}",
            self.base,
            percent_encode(promql)
        );
        let body: Value = serde_json::from_str(&self.http.get(url).send().await?.text().await?)?;
        if body["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        let result = body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        result
            .into_iter()
            .map(|r| {
                let value = r["value"][1].as_str().context("a value")?.parse::<f64>()?;
                Ok((r["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits until `ok` holds for the query's samples; fails with the last samples and the
    /// log otherwise, or at once if Prometheus has exited.
    pub async fn wait_for(
        &self,
        promql: &str,
        within: Duration,
        ok: impl Fn(&[Sample]) -> bool,
    ) -> anyhow::Result<Vec<Sample>> {
        let deadline = Instant::now() + within;
        loop {
            self.ensure_running()?;
            let samples = self.query(promql).await.unwrap_or_default();
            if ok(&samples) {
                return Ok(samples);
            }
            if Instant::now() > deadline {
                bail!(
                    "{promql} never matched within {within:?}; last answer {samples:?}\n\
                     prometheus log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until Prometheus has scraped the target successfully (`up` is 1).
    pub async fn wait_until_up(&self, within: Duration) -> anyhow::Result<()> {
        self.wait_for(&format!(r#"up{{job="{JOB}"}}"#), within, |s| {
            s.first().is_some_and(|(_, v)| *v == 1.0)
        })
        .await
        .map(|_| ())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last 20 lines of `log`.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Percent-encoding of a query parameter: unreserved characters stay, every other byte goes.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET `url`: the status and the body.
pub async fn get(url: &str) -> anyhow::Result<(u16, String)> {
    let response = reqwest::get(url)
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

/// One scrape of `http://<addr>/metrics`, in the Prometheus text format (no Accept header).
pub async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = get(&format!("http://{addr}/metrics")).await?;
    if status != 200 {
        bail!("/metrics answered {status}: {body}");
    }
    Ok(body)
}

/// The value of the sample named exactly `series` (name and labels as written) in `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// `promtool check metrics` on `text`: an error with its complaints, if any.
pub fn promtool_check(promtool: &Path, text: &str) -> anyhow::Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting promtool")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "promtool check metrics failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `actual` is within 2 % of `expected`.
pub fn close(actual: f64, expected: f64) -> bool {
    (actual - expected).abs() <= expected.abs() * 0.02
}

/// A label value as the text formats write it: backslash, double quote and newline escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '"' => out.push_str(r#"\""#),
            '\n' => out.push_str(r"\n"),
            c => out.push(c),
        }
    }
    out
}

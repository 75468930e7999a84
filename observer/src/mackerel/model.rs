//! What the Mackerel reporter is given each interval: one [`HostReport`] per live ECS task or
//! Kubernetes pod, as plain data. The inventory fills these in; nothing here talks to the API.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::appmetrics::scrape::TargetList;

/// All live tasks/pods of one interval. A task missing from a complete report counts as gone
/// (see [`super::hosts`]), so every report must list every live task, not only the changed
/// ones.
#[derive(Debug, Clone, PartialEq)]
pub struct IntervalReport {
    /// When the interval ended.
    pub time: SystemTime,
    /// Its measured length: rates were taken over it.
    pub interval: Duration,
    /// False while the platform's answer is stale: the hosts are the last good inventory's,
    /// their values are real, but absence proves nothing, so nothing is retired.
    pub complete: bool,
    pub hosts: Vec<HostReport>,
}

/// One task or pod: which Mackerel host it is, what to register, and its containers' values.
#[derive(Debug, Clone, PartialEq)]
pub struct HostReport {
    pub identity: HostIdentity,
    pub meta: HostMeta,
    /// Raw value of the task's `mackerel.io/roles` Docker label or pod annotation, if any;
    /// merged with the configured `MACKEREL_ROLES` by the reporter.
    pub roles_label: Option<String>,
    /// From the `mackerel.io/display-name` label or annotation, capped in length.
    pub display_name: Option<String>,
    /// From the `mackerel.io/memo` label or annotation, capped in length.
    pub memo: Option<String>,
    pub containers: Vec<ContainerMetrics>,
    /// Where its containers' own metrics are scraped (`--app-metrics`), and the declarations
    /// refused.
    pub app: TargetList,
}

/// A Mackerel host status, as POST /api/v0/hosts/<id>/status takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HostStatus {
    Working,
    Standby,
    Maintenance,
    Poweroff,
}

impl HostStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Working => "working",
            HostStatus::Standby => "standby",
            HostStatus::Maintenance => "maintenance",
            HostStatus::Poweroff => "poweroff",
        }
    }
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host's name and its customIdentifier, the key observer finds it by after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostIdentity {
    pub name: String,
    pub custom_identifier: String,
}

/// Why a host identity could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} is not an ECS task ARN (arn:aws:ecs:<region>:<account>:task/...)")]
    NotATaskArn(String),
    #[error("a Kubernetes pod needs a name and a uid (got name {name:?}, uid {uid:?})")]
    IncompletePod { name: String, uid: String },
}

impl HostIdentity {
    /// ECS: name = task id (last part of the ARN), customIdentifier = the task ARN.
    pub fn ecs(task_arn: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::NotATaskArn(task_arn.to_string());
        let (prefix, resource) = task_arn.split_once(":task/").ok_or_else(bad)?;
        // Both ARN forms end in the id: task/<id> (old) and task/<cluster>/<id>.
        let id = resource.rsplit('/').next().unwrap_or_default();
        if !prefix.starts_with("arn:") || id.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            name: id.to_string(),
            custom_identifier: task_arn.to_string(),
        })
    }

    /// Kubernetes: name = pod name, customIdentifier = `<pod uid>.kubernetes`, as the container
    /// agent registers pods, so hosts and dashboards made by it keep working.
    pub fn kubernetes(pod_name: &str, pod_uid: &str) -> Result<Self, IdentityError> {
        if pod_name.is_empty() || pod_uid.is_empty() {
            return Err(IdentityError::IncompletePod {
                name: pod_name.to_string(),
                uid: pod_uid.to_string(),
            });
        }
        Ok(Self {
            name: pod_name.to_string(),
            custom_identifier: format!("{pod_uid}.kubernetes"),
        })
    }
}

/// The host's `meta` object as registered (create and update).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostMeta {
    #[serde(rename = "agent-name")]
    pub agent_name: String,
    #[serde(rename = "agent-version")]
    pub agent_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud: Option<CloudMeta>,
}

impl HostMeta {
    /// observer's own agent name and version, with the task's or pod's cloud metadata.
    pub fn observer(cloud: Option<CloudMeta>) -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            agent_name: format!("observer/{version}"),
            agent_version: version.to_string(),
            cloud,
        }
    }
}

impl HostMeta {
    /// Records which node's observer made the host, and in which cluster, as
    /// `meta.cloud.metadata.observer`: `{"node": ..., "cluster": ...}`. The cluster is the
    /// configured one, else the ECS task's own. Peers use it to find the hosts of a node that
    /// went away.
    /// The cluster [`Self::set_origin`] recorded.
    pub fn cluster(&self) -> Option<&str> {
        self.cloud
            .as_ref()?
            .metadata
            .get("observer")?
            .get("cluster")?
            .as_str()
    }

    pub fn set_origin(&mut self, node: Option<&str>, cluster: Option<&str>) {
        let Some(cloud) = &mut self.cloud else { return };
        let serde_json::Value::Object(metadata) = &mut cloud.metadata else {
            return;
        };
        let cluster = cluster.map(str::to_owned).or_else(|| {
            metadata
                .get("cluster")
                .and_then(|c| c.as_str())
                .map(str::to_owned)
        });
        metadata.insert(
            "observer".to_string(),
            serde_json::json!({ "node": node, "cluster": cluster }),
        );
    }
}

/// `meta.cloud`: the provider and the task or pod as the platform describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CloudMeta {
    pub provider: String,
    pub metadata: serde_json::Value,
}

impl CloudMeta {
    pub fn ecs(metadata: serde_json::Value) -> Self {
        Self {
            provider: "ecs".to_string(),
            metadata,
        }
    }

    pub fn kubernetes(metadata: serde_json::Value) -> Self {
        Self {
            provider: "kubernetes".to_string(),
            metadata,
        }
    }
}

/// One container's values over the interval. None = not known this interval (the value is
/// then not posted, rather than posted as 0).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ContainerMetrics {
    /// The container's name as the platform shows it (sanitised for metric names later).
    pub name: String,
    /// CPU used, in % of one core (100 = one core busy).
    pub cpu_percent: Option<f64>,
    /// CPU limit in % of one core.
    pub cpu_limit_percent: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// Bytes per second received and sent, loopback excluded.
    pub rx_bytes_per_sec: f64,
    pub tx_bytes_per_sec: f64,
    /// Loopback bytes per second.
    pub lo_rx_bytes_per_sec: f64,
    pub lo_tx_bytes_per_sec: f64,
    /// Packets per second received and sent, loopback excluded.
    pub rx_packets_per_sec: f64,
    pub tx_packets_per_sec: f64,
}

/// Role full names (`service:role`), validated, without duplicates, in the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles(Vec<String>);

/// A `service:role` entry that Mackerel would refuse, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRole {
    pub entry: String,
    pub reason: &'static str,
}

/// Entries of a roles list that are not `service:role` with Mackerel's characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad role entries (expected service:role,service2:role2 with names of 2 or more of A-Z a-z 0-9 _ -, starting with a letter or digit): {}", list(.0))]
pub struct RolesError(pub Vec<BadRole>);

/// Most role entries read from one list: far more than a host needs, and it keeps a hostile
/// label from costing a quadratic de-duplication every interval.
pub const MAX_ROLE_ENTRIES: usize = 100;
/// Most bad entries named in one message; the rest are counted.
const MAX_BAD_NAMED: usize = 10;

fn list(bad: &[BadRole]) -> String {
    let mut out: Vec<String> = bad
        .iter()
        .take(MAX_BAD_NAMED)
        .map(|b| format!("{:?} ({})", truncated(&b.entry), b.reason))
        .collect();
    if bad.len() > MAX_BAD_NAMED {
        out.push(format!("and {} more", bad.len() - MAX_BAD_NAMED));
    }
    out.join(", ")
}

/// An entry as quoted in a log line: at most 100 characters of it.
fn truncated(entry: &str) -> String {
    match entry.char_indices().nth(100) {
        Some((cut, _)) => format!("{}...", &entry[..cut]),
        None => entry.to_string(),
    }
}

impl Roles {
    /// Parses `service:role,service2:role2` strictly: any bad entry is an error naming each
    /// of them. Blank entries (a trailing comma) are ignored.
    pub fn parse(s: &str) -> Result<Self, RolesError> {
        let (roles, bad) = Self::parse_lenient(s);
        if bad.is_empty() {
            Ok(roles)
        } else {
            Err(RolesError(bad))
        }
    }

    /// Parses what it can: the good entries, and the bad ones for the caller to report.
    pub fn parse_lenient(s: &str) -> (Self, Vec<BadRole>) {
        let mut roles = Self::default();
        let mut bad = Vec::new();
        let mut entries = s.split(',').map(str::trim).filter(|e| !e.is_empty());
        for entry in entries.by_ref().take(MAX_ROLE_ENTRIES) {
            match check_role(entry) {
                Ok(()) => roles.push(entry),
                Err(reason) => bad.push(BadRole {
                    entry: entry.to_string(),
                    reason,
                }),
            }
        }
        let rest = entries.count();
        if rest > 0 {
            bad.push(BadRole {
                entry: format!("{rest} entries after the first {MAX_ROLE_ENTRIES}"),
                reason: "too many entries",
            });
        }
        (roles, bad)
    }

    /// These roles followed by those of `other` that are not already here.
    pub fn merged(&self, other: &Roles) -> Roles {
        let mut out = self.clone();
        for r in &other.0 {
            out.push(r);
        }
        out
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn push(&mut self, role: &str) {
        if !self.0.iter().any(|r| r == role) {
            self.0.push(role.to_string());
        }
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

/// Mackerel's rule for service and role names: `^[A-Za-z0-9][A-Za-z0-9_-]+$`.
fn check_role(entry: &str) -> Result<(), &'static str> {
    let Some((service, role)) = entry.split_once(':') else {
        return Err("no ':' between service and role");
    };
    if !valid_name(service) {
        return Err("bad service name");
    }
    if !valid_name(role) {
        return Err("bad role name");
    }
    Ok(())
}

pub(crate) fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok && s.len() >= 2 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecs_identity_is_task_id_and_arn() {
        let arn =
            "arn:aws:ecs:ap-northeast-1:999999999999:task/prod/0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d";
        let id = HostIdentity::ecs(arn).unwrap();
        assert_eq!(id.name, "0a1b2c3d4e5f4a5b8c9d0e1f2a3b4c5d");
        assert_eq!(id.custom_identifier, arn);
        // The old ARN format has no cluster part.
        let old = "arn:aws:ecs:us-east-1:012345678910:task/c5cba4eb-5dad-405e-96db-71ef8eefe6a8";
        assert_eq!(
            HostIdentity::ecs(old).unwrap().name,
            "c5cba4eb-5dad-405e-96db-71ef8eefe6a8"
        );
    }

    #[test]
    fn not_a_task_arn() {
        for bad in [
            "",
            "0a1b2c3d",
            "arn:aws:ecs:us-east-1:1:cluster/prod",
            "arn:aws:ecs:us-east-1:1:task/prod/",
            "task/prod/abc",
        ] {
            assert!(HostIdentity::ecs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kubernetes_identity_matches_the_container_agent() {
        let id = HostIdentity::kubernetes("web-7d9c6b5f4-abcde", "8f1c-42").unwrap();
        assert_eq!(id.name, "web-7d9c6b5f4-abcde");
        assert_eq!(id.custom_identifier, "8f1c-42.kubernetes");
        assert!(HostIdentity::kubernetes("", "uid").is_err());
        assert!(HostIdentity::kubernetes("pod", "").is_err());
    }

    #[test]
    fn meta_serialises_with_mackerel_keys() {
        let meta = HostMeta::observer(Some(CloudMeta::ecs(serde_json::json!({"task": "t"}))));
        let v = serde_json::to_value(&meta).unwrap();
        assert_eq!(
            v["agent-name"],
            format!("observer/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(v["agent-version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(v["cloud"]["provider"], "ecs");
        assert_eq!(v["cloud"]["metadata"]["task"], "t");
        let bare = serde_json::to_value(HostMeta::observer(None)).unwrap();
        assert!(bare.get("cloud").is_none());
    }

    #[test]
    fn roles_parse() {
        let roles = Roles::parse(" My-Service:app , svc_2:db-1,My-Service:app,").unwrap();
        assert_eq!(roles.as_slice(), ["My-Service:app", "svc_2:db-1"]);
        assert!(Roles::parse("").unwrap().is_empty());
        assert_eq!(roles.to_string(), "My-Service:app,svc_2:db-1");
    }

    #[test]
    fn bad_roles_are_all_named() {
        let err = Roles::parse("ok:fine,noseparator,-svc:role,svc:r,svc:ro le").unwrap_err();
        let entries: Vec<_> = err.0.iter().map(|b| b.entry.as_str()).collect();
        assert_eq!(entries, ["noseparator", "-svc:role", "svc:r", "svc:ro le"]);
        let msg = err.to_string();
        assert!(
            msg.contains("\"noseparator\" (no ':' between service and role)"),
            "{msg}"
        );
        assert!(msg.contains("\"-svc:role\" (bad service name)"), "{msg}");
        assert!(msg.contains("\"svc:r\" (bad role name)"), "{msg}");
    }

    /// A label of a million entries costs one pass, keeps 100, and says so in one short line.
    #[test]
    fn huge_role_lists_are_cut() {
        let label: String = (0..1_000_000).map(|i| format!("s{i}:r{i},")).collect();
        let (roles, bad) = Roles::parse_lenient(&label);
        assert_eq!(roles.as_slice().len(), MAX_ROLE_ENTRIES);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].entry, "999900 entries after the first 100");
        let junk: String = (0..5000).map(|_| "$(re\nboot),").collect();
        let message = RolesError(Roles::parse_lenient(&junk).1).to_string();
        assert!(message.len() < 2000, "{} bytes", message.len());
        assert!(message.contains(r#""$(re\nboot)" (no ':'"#), "{message}");
        assert!(message.ends_with("and 91 more"), "{message}");
        assert!(
            !message.contains('\n'),
            "a newline never starts a fake log line"
        );
    }

    #[test]
    fn lenient_keeps_the_good_ones_and_merge_dedups() {
        let (label, bad) = Roles::parse_lenient("web:app,bad,base:common");
        assert_eq!(label.as_slice(), ["web:app", "base:common"]);
        assert_eq!(bad.len(), 1);
        let global = Roles::parse("base:common,base:node").unwrap();
        assert_eq!(
            global.merged(&label).as_slice(),
            ["base:common", "base:node", "web:app"]
        );
    }

    /// Fuzzing: any roles value gives only roles Mackerel takes, each once, at most
    /// [`MAX_ROLE_ENTRIES`]; identities and metric names never panic.
    mod fuzz {
        use proptest::prelude::*;

        use super::*;
        use crate::{fuzz, mackerel::names::sanitize};

        const PARTS: &[&str] = &[
            "svc", "web", "a", "-", "_", ":", ",", " ", "$(", ")", "`", "\n", "é", "ab:cd",
        ];

        fn check(s: &str) -> Result<(), TestCaseError> {
            let (roles, bad) = Roles::parse_lenient(s);
            prop_assert!(roles.as_slice().len() <= MAX_ROLE_ENTRIES);
            for role in roles.as_slice() {
                prop_assert!(check_role(role).is_ok(), "{:?}", role);
            }
            let mut unique = roles.as_slice().to_vec();
            unique.sort();
            unique.dedup();
            prop_assert_eq!(unique.len(), roles.as_slice().len());
            // Printed and read back, the good ones are the same list.
            prop_assert_eq!(Roles::parse(&roles.to_string()), Ok(roles));
            prop_assert!(RolesError(bad).to_string().len() < 20_000);
            Ok(())
        }

        proptest! {
            #![proptest_config(fuzz::config(700))]

            #[test]
            fn any_text(s in ".{0,80}") {
                check(&s)?;
            }

            #[test]
            fn mutated_roles(s in fuzz::mutated_text(fuzz::line_seeds("roles"), 6)) {
                check(&s)?;
            }

            #[test]
            fn roles_from_their_parts(s in fuzz::words(PARTS, 30)) {
                check(&s)?;
            }

            #[test]
            fn identities_and_names(s in ".{0,60}") {
                if let Ok(id) = HostIdentity::ecs(&s) {
                    prop_assert!(!id.name.is_empty() && s.ends_with(&id.name));
                }
                let _ = HostIdentity::kubernetes(&s, &s);
                let name = sanitize(&s);
                prop_assert!(!name.is_empty());
                prop_assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            }
        }
    }
}

//! Which tasks and pods become Mackerel hosts, and how much of a host a workload's own labels
//! may decide. The node's operator sets the rules (flags); each workload may opt out (or in)
//! with `mackerel.io/host`, and may name roles with `mackerel.io/roles` within what the
//! operator allows. Only the Mackerel output applies them: every other output shows every
//! workload.
//!
//! A workload is a host when all of these hold:
//! - its `mackerel.io/host` is not `"false"` (any container's label counts for a task, and
//!   `"false"` wins), and in `opt-in` mode it is `"true"`; any other value is ignored, with
//!   one warning per workload;
//! - a pod's namespace is in `--mackerel-include-namespaces` (when given) and not in
//!   `--mackerel-exclude-namespaces`;
//! - its name (a pod's name, an ECS task's family) matches `--mackerel-include-workloads`
//!   (when given) and not `--mackerel-exclude-workloads`.
//!
//! Containers whose name matches `--mackerel-ignore-containers` give their host no values
//! (mackerel-container-agent's `MACKEREL_IGNORE_CONTAINER`).

use std::{collections::HashSet, fmt};

use regex::Regex;

use crate::{
    inventory::{host_label_value, HOST_LABEL, ROLES_LABEL},
    snapshot::{WorkloadKind, WorkloadReport},
};

/// `--mackerel-hosts`: which workloads become hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HostsMode {
    /// Every task and pod, unless marked `mackerel.io/host=false` or filtered out.
    #[default]
    All,
    /// Only tasks and pods marked `mackerel.io/host=true` (and not filtered out).
    OptIn,
}

/// The operator's rules. The default makes a host of every task and pod and lets their labels
/// name any role, as observer did before these rules existed.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub mode: HostsMode,
    /// Pods of these namespaces only (empty: every namespace).
    pub include_namespaces: Vec<String>,
    /// Never pods of these namespaces.
    pub exclude_namespaces: Vec<String>,
    /// Only workloads whose name (pod name, ECS task family) matches.
    pub include_workloads: Option<Regex>,
    /// Never workloads whose name matches.
    pub exclude_workloads: Option<Regex>,
    /// Containers whose name matches give their host no values.
    pub ignore_containers: Option<Regex>,
    /// Roles a workload's `mackerel.io/roles` may name; None: any.
    pub allowed_roles: Option<AllowedRoles>,
}

/// Why a workload is not a host, for the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAHost {
    /// `mackerel.io/host=false`.
    LabelledFalse,
    /// `opt-in` mode and no `mackerel.io/host=true`.
    NotOptedIn,
    Namespace,
    Name,
}

impl fmt::Display for NotAHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotAHost::LabelledFalse => "labelled mackerel.io/host=false",
            NotAHost::NotOptedIn => {
                "--mackerel-hosts opt-in and not labelled mackerel.io/host=true"
            }
            NotAHost::Namespace => "its namespace is filtered out",
            NotAHost::Name => "its name is filtered out",
        })
    }
}

/// `service:role` patterns, each part a name or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedRoles(Vec<(Part, Part)>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Any,
    Name(String),
}

impl Part {
    fn matches(&self, s: &str) -> bool {
        match self {
            Part::Any => true,
            Part::Name(n) => n == s,
        }
    }
}

/// A `--mackerel-allowed-roles` entry that is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not service:role, service:* or *:* (names of 2 or more of A-Z a-z 0-9 _ -), nor `none`")]
pub struct AllowedRolesError(pub String);

impl AllowedRoles {
    /// `shop:*,web:api`; `*` or `*:*` allow every role, `none` none.
    pub fn parse(s: &str) -> Result<Self, AllowedRolesError> {
        if s.trim() == "none" {
            return Ok(Self(Vec::new()));
        }
        let mut out = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || AllowedRolesError(entry.to_string());
            let (service, role) = match entry.split_once(':') {
                Some(parts) => parts,
                None if entry == "*" => ("*", "*"),
                None => return Err(bad()),
            };
            let part = |p: &str| match p {
                "*" => Some(Part::Any),
                p if super::model::valid_name(p) => Some(Part::Name(p.to_string())),
                _ => None,
            };
            out.push((part(service).ok_or_else(bad)?, part(role).ok_or_else(bad)?));
        }
        if out.is_empty() {
            return Err(AllowedRolesError(s.to_string()));
        }
        Ok(Self(out))
    }

    pub fn allows(&self, role: &str) -> bool {
        let Some((service, role)) = role.split_once(':') else {
            return false;
        };
        self.0
            .iter()
            .any(|(s, r)| s.matches(service) && r.matches(role))
    }
}

/// Most (workload, label) pairs remembered to warn once; past it the set starts again, which
/// costs a repeated line, never memory (labels are the workloads' to choose).
pub const MAX_WARNED: usize = 1024;
/// Longest display name sent; longer ones are cut (observer's cap, not the API's).
pub const MAX_DISPLAY_NAME_CHARS: usize = 250;
/// Longest memo sent; longer ones are cut.
pub const MAX_MEMO_CHARS: usize = 1000;

/// The rules and what was already warned about.
#[derive(Debug, Default)]
pub struct Selector {
    selection: Selection,
    warned: HashSet<u64>,
}

impl Selector {
    pub fn new(selection: Selection) -> Self {
        Self {
            selection,
            warned: HashSet::new(),
        }
    }

    /// Whether `w` becomes a host; a `mackerel.io/host` that is neither true nor false is
    /// warned about once per workload and value.
    pub fn verdict(&mut self, w: &WorkloadReport) -> Result<(), NotAHost> {
        let label = w.labels.get(HOST_LABEL);
        let marked = label.and_then(|v| host_label_value(v));
        if let (Some(value), None) = (label, marked) {
            if self.first_time(&w.id, HOST_LABEL, value) {
                log::warn!(
                    "Mackerel: {HOST_LABEL} of {} is {:?}, neither \"true\" nor \"false\"; ignored",
                    describe(w),
                    clip(value, 100)
                );
            }
        }
        let s = &self.selection;
        match (marked, s.mode) {
            (Some(false), _) => return Err(NotAHost::LabelledFalse),
            (None, HostsMode::OptIn) => return Err(NotAHost::NotOptedIn),
            _ => {}
        }
        if w.kind == WorkloadKind::KubernetesPod {
            let ns = w.namespace.as_deref().unwrap_or_default();
            let included =
                s.include_namespaces.is_empty() || s.include_namespaces.iter().any(|n| n == ns);
            if !included || s.exclude_namespaces.iter().any(|n| n == ns) {
                return Err(NotAHost::Namespace);
            }
        }
        let name = filter_name(w);
        let included = s
            .include_workloads
            .as_ref()
            .is_none_or(|r| r.is_match(name));
        if !included
            || s.exclude_workloads
                .as_ref()
                .is_some_and(|r| r.is_match(name))
        {
            return Err(NotAHost::Name);
        }
        Ok(())
    }

    /// False for a container `--mackerel-ignore-containers` matches.
    pub fn keeps_container(&self, name: &str) -> bool {
        !self
            .selection
            .ignore_containers
            .as_ref()
            .is_some_and(|r| r.is_match(name))
    }

    /// `w`'s `mackerel.io/roles` without the entries `--mackerel-allowed-roles` refuses; each
    /// refusal is logged once per workload and label value. Entries that are not roles at all
    /// are left in, for the reporter to warn about.
    pub fn roles_label(&mut self, w: &WorkloadReport) -> Option<String> {
        let label = w.labels.get(ROLES_LABEL)?;
        let Some(allowed) = &self.selection.allowed_roles else {
            return Some(label.clone());
        };
        let (kept, refused): (Vec<&str>, Vec<&str>) = label
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .partition(|e| !e.contains(':') || allowed.allows(e));
        if !refused.is_empty() && self.first_time(&w.id, ROLES_LABEL, label) {
            let shown: Vec<String> = refused.iter().take(10).map(|e| clip(e, 100)).collect();
            log::warn!(
                "Mackerel: {ROLES_LABEL} of {}: refused {:?}{}: not in --mackerel-allowed-roles",
                describe(w),
                shown,
                match refused.len() {
                    n if n > 10 => format!(" and {} more", n - 10),
                    _ => String::new(),
                }
            );
        }
        Some(kept.join(","))
    }

    fn first_time(&mut self, id: &str, key: &str, value: &str) -> bool {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        (id, key, value).hash(&mut hasher);
        if self.warned.len() >= MAX_WARNED {
            self.warned.clear();
        }
        self.warned.insert(hasher.finish())
    }
}

/// A display name or memo as sent: trimmed, cut to `max` characters, None when empty.
pub fn capped(value: Option<&String>, max: usize) -> Option<String> {
    let value = value?.trim();
    if value.is_empty() {
        return None;
    }
    Some(match value.char_indices().nth(max) {
        Some((cut, _)) => value[..cut].to_string(),
        None => value.to_string(),
    })
}

/// What the name filters match: a pod's name, an ECS task's family.
fn filter_name(w: &WorkloadReport) -> &str {
    match w.kind {
        WorkloadKind::KubernetesPod => w.name.rsplit('/').next().unwrap_or(&w.name),
        WorkloadKind::EcsTask => w.name.split(':').next().unwrap_or(&w.name),
        WorkloadKind::ComposeProject | WorkloadKind::Container => &w.name,
    }
}

/// The workload in a log line: kind, name and, for a task, its id (names are shared).
fn describe(w: &WorkloadReport) -> String {
    match w.kind {
        WorkloadKind::EcsTask => format!("task {} ({})", clip(&w.name, 100), clip(&w.id, 64)),
        WorkloadKind::KubernetesPod => format!("pod {}", clip(&w.name, 200)),
        _ => clip(&w.name, 100),
    }
}

/// At most `max` characters of a value a workload chose, for a log line.
fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// `--mackerel-*-workloads`, `--mackerel-ignore-containers`: a regular expression (Rust
/// `regex` syntax, unanchored like Go's MatchString), at most 1 MiB compiled.
pub fn parse_regex(s: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(s)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("not a regular expression: {e}"))
}

/// A comma-separated list of names, blanks dropped.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::snapshot::NetworkMode;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> WorkloadReport {
        workload(
            WorkloadKind::KubernetesPod,
            &format!("{ns}/{name}"),
            Some(ns),
            labels,
        )
    }

    fn task(family: &str, labels: &[(&str, &str)]) -> WorkloadReport {
        workload(
            WorkloadKind::EcsTask,
            &format!("{family}:3"),
            Some("prod"),
            labels,
        )
    }

    fn workload(
        kind: WorkloadKind,
        name: &str,
        ns: Option<&str>,
        labels: &[(&str, &str)],
    ) -> WorkloadReport {
        WorkloadReport {
            kind,
            id: format!("id-{name}"),
            name: name.into(),
            namespace: ns.map(str::to_string),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            controller: None,
            network_mode: NetworkMode::Host,
            cgroup_ids: Vec::new(),
            traffic: Default::default(),
            usage: Default::default(),
            containers: Vec::new(),
        }
    }

    fn re(s: &str) -> Option<Regex> {
        Some(parse_regex(s).unwrap())
    }

    #[test]
    fn the_host_label_and_the_mode() {
        use NotAHost::*;
        let opt_in = Selection {
            mode: HostsMode::OptIn,
            ..Selection::default()
        };
        for (label, all, opt) in [
            (None, Ok(()), Err(NotOptedIn)),
            (Some("true"), Ok(()), Ok(())),
            (Some(" True "), Ok(()), Ok(())),
            (Some("false"), Err(LabelledFalse), Err(LabelledFalse)),
            (Some("FALSE"), Err(LabelledFalse), Err(LabelledFalse)),
            (Some("yes"), Ok(()), Err(NotOptedIn)),
            (Some(""), Ok(()), Err(NotOptedIn)),
        ] {
            let labels: Vec<(&str, &str)> = label.map(|v| (HOST_LABEL, v)).into_iter().collect();
            for w in [pod("shop", "web-1", &labels), task("web", &labels)] {
                let mut default = Selector::default();
                assert_eq!(default.verdict(&w), all, "all, {label:?}, {}", w.name);
                let mut s = Selector::new(opt_in.clone());
                assert_eq!(s.verdict(&w), opt, "opt-in, {label:?}, {}", w.name);
            }
        }
    }

    #[test]
    fn a_garbage_host_label_is_remembered_once_per_workload() {
        let mut s = Selector::default();
        let a = pod("shop", "a", &[(HOST_LABEL, "maybe")]);
        let b = pod("shop", "b", &[(HOST_LABEL, "maybe")]);
        assert!(s.first_time(&a.id, HOST_LABEL, "maybe"));
        assert!(!s.first_time(&a.id, HOST_LABEL, "maybe"));
        s.verdict(&b).unwrap();
        assert!(
            !s.first_time(&b.id, HOST_LABEL, "maybe"),
            "b was warned about"
        );
        for i in 0..3 * MAX_WARNED {
            let w = pod("shop", &format!("p{i}"), &[(HOST_LABEL, "x")]);
            s.verdict(&w).unwrap();
            assert!(s.warned.len() <= MAX_WARNED);
        }
    }

    #[test]
    fn namespace_filters_apply_to_pods_only() {
        use NotAHost::Namespace;
        let rules = Selection {
            include_namespaces: parse_list("shop, prod"),
            exclude_namespaces: parse_list("prod"),
            ..Selection::default()
        };
        let mut s = Selector::new(rules);
        assert_eq!(s.verdict(&pod("shop", "a", &[])), Ok(()));
        assert_eq!(
            s.verdict(&pod("prod", "a", &[])),
            Err(Namespace),
            "exclude wins"
        );
        assert_eq!(s.verdict(&pod("kube-system", "a", &[])), Err(Namespace));
        // A task's namespace is its cluster: not filtered by these.
        assert_eq!(s.verdict(&task("web", &[])), Ok(()));
        let mut only_exclude = Selector::new(Selection {
            exclude_namespaces: vec!["kube-system".into()],
            ..Selection::default()
        });
        assert_eq!(only_exclude.verdict(&pod("shop", "a", &[])), Ok(()));
        assert_eq!(
            only_exclude.verdict(&pod("kube-system", "a", &[])),
            Err(Namespace)
        );
    }

    #[test]
    fn name_filters_match_the_pod_name_and_the_task_family() {
        use NotAHost::Name;
        let mut s = Selector::new(Selection {
            include_workloads: re("^(web|api)"),
            exclude_workloads: re("-canary"),
            ..Selection::default()
        });
        assert_eq!(s.verdict(&pod("shop", "web-7d9c-abcde", &[])), Ok(()));
        assert_eq!(s.verdict(&pod("shop", "web-canary-1", &[])), Err(Name));
        assert_eq!(
            s.verdict(&pod("web", "batch-1", &[])),
            Err(Name),
            "not the namespace"
        );
        assert_eq!(s.verdict(&task("api", &[])), Ok(()));
        assert_eq!(s.verdict(&task("batch", &[])), Err(Name));
        // "false" is decided before any filter, whatever they say.
        let w = task("api", &[(HOST_LABEL, "false")]);
        assert_eq!(s.verdict(&w), Err(NotAHost::LabelledFalse));
    }

    #[test]
    fn ignored_containers() {
        let s = Selector::new(Selection {
            ignore_containers: re("^(istio-proxy|log-router)$"),
            ..Selection::default()
        });
        assert!(!s.keeps_container("istio-proxy"));
        assert!(s.keeps_container("istio-proxy-2"));
        assert!(s.keeps_container("app"));
        assert!(Selector::default().keeps_container("istio-proxy"));
    }

    #[test]
    fn allowed_roles_parse() {
        let a = AllowedRoles::parse("shop:*, web:api").unwrap();
        for (role, ok) in [
            ("shop:web", true),
            ("shop:db", true),
            ("web:api", true),
            ("web:db", false),
            ("billing:api", false),
            ("shop", false),
        ] {
            assert_eq!(a.allows(role), ok, "{role}");
        }
        assert!(AllowedRoles::parse("*").unwrap().allows("any:thing"));
        assert!(AllowedRoles::parse("*:api").unwrap().allows("x1:api"));
        assert!(!AllowedRoles::parse("none").unwrap().allows("shop:web"));
        for bad in ["shop", "shop:w", "sh op:*", "", " , ", "**:x"] {
            assert!(AllowedRoles::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forbidden_roles_are_taken_out_of_the_label() {
        let mut s = Selector::new(Selection {
            allowed_roles: Some(AllowedRoles::parse("shop:*,web:api").unwrap()),
            ..Selection::default()
        });
        let label = "shop:web, billing:db,web:api,not a role,web:admin";
        let w = pod("shop", "a", &[(ROLES_LABEL, label)]);
        assert_eq!(
            s.roles_label(&w).as_deref(),
            Some("shop:web,web:api,not a role")
        );
        assert!(!s.first_time(&w.id, ROLES_LABEL, label), "logged once");
        assert_eq!(s.roles_label(&pod("shop", "b", &[])), None);
        // Without the flag every role stays, as before.
        let mut any = Selector::default();
        assert_eq!(any.roles_label(&w).as_deref(), Some(label));
        let mut none = Selector::new(Selection {
            allowed_roles: Some(AllowedRoles::parse("none").unwrap()),
            ..Selection::default()
        });
        assert_eq!(none.roles_label(&w).as_deref(), Some("not a role"));
    }

    #[test]
    fn display_names_and_memos_are_capped() {
        assert_eq!(
            capped(Some(&" web ".to_string()), 10).as_deref(),
            Some("web")
        );
        assert_eq!(capped(Some(&"  ".to_string()), 10), None);
        assert_eq!(capped(None, 10), None);
        let long = "é".repeat(MAX_DISPLAY_NAME_CHARS + 5);
        let cut = capped(Some(&long), MAX_DISPLAY_NAME_CHARS).unwrap();
        assert_eq!(cut.chars().count(), MAX_DISPLAY_NAME_CHARS);
    }

    #[test]
    fn bad_regexes_are_errors() {
        assert!(parse_regex("(")
            .unwrap_err()
            .starts_with("not a regular expression"));
        assert!(parse_regex("a{100000}{100000}").is_err(), "too large");
        assert!(parse_regex("^app$").unwrap().is_match("app"));
    }
}

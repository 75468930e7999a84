//! Loading observer's kernel programs and attaching them at the cgroup v2 root.
//!
//! The links live in the loaded [`aya::Ebpf`]; dropping [`Programs`] detaches and unloads
//! everything, which is how SIGINT/SIGTERM leave the host clean.

use std::{fs::File, path::Path};

use aya::{
    programs::{cgroup_skb::CgroupSkbLinkId, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
    Ebpf, EbpfLoader,
};
use observer_common::TRAFFIC_MAP;

/// observer's programs, built by build.rs from observer-ebpf.
pub static OBSERVER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));
/// The empty program pair the benchmark compares against.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-floor"));

/// observer's program pair: (name, direction).
pub const OBSERVER_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("count_ingress", CgroupSkbAttachType::Ingress),
    ("count_egress", CgroupSkbAttachType::Egress),
];
/// The floor's program pair.
pub const FLOOR_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("floor_ingress", CgroupSkbAttachType::Ingress),
    ("floor_egress", CgroupSkbAttachType::Egress),
];

#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "attaching {name} to {cgroup}: permission denied: observer needs CAP_BPF and \
         CAP_NET_ADMIN (run as root or as a privileged container)"
    )]
    AttachDenied { name: &'static str, cgroup: String },
    #[error("opening cgroup {cgroup}: {source}")]
    OpenCgroup {
        cgroup: String,
        source: std::io::Error,
    },
}

/// A loaded eBPF object with its cgroup_skb pair attached (or not yet).
pub struct Programs {
    ebpf: Ebpf,
    names: [(&'static str, CgroupSkbAttachType); 2],
    links: Vec<(&'static str, CgroupSkbLinkId)>,
}

/// A program's cumulative run statistics (kept by the kernel while kernel.bpf_stats_enabled=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl Programs {
    /// observer's counting programs with a traffic map of `map_entries` entries.
    pub fn load_observer(map_entries: u32) -> Result<Self, ProgramsError> {
        let ebpf = EbpfLoader::new()
            .map_max_entries(TRAFFIC_MAP, map_entries)
            .load(OBSERVER_OBJECT)?;
        Self::with(ebpf, OBSERVER_PROGRAMS)
    }

    /// The empty pair, for the benchmark's floor.
    pub fn load_floor() -> Result<Self, ProgramsError> {
        Self::with(Ebpf::load(FLOOR_OBJECT)?, FLOOR_PROGRAMS)
    }

    fn with(
        ebpf: Ebpf,
        names: [(&'static str, CgroupSkbAttachType); 2],
    ) -> Result<Self, ProgramsError> {
        let mut programs = Self {
            ebpf,
            names,
            links: Vec::new(),
        };
        for (name, _) in names {
            programs
                .program_mut(name)?
                .load()
                .map_err(|source| ProgramsError::Program { name, source })?;
        }
        Ok(programs)
    }

    /// Attaches both programs to `cgroup` (normally the v2 root, where they see every socket).
    /// Links stack with other programs already attached there.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), ProgramsError> {
        let cgroup_name = cgroup.display().to_string();
        let dir = File::open(cgroup).map_err(|source| ProgramsError::OpenCgroup {
            cgroup: cgroup_name.clone(),
            source,
        })?;
        for (name, attach_type) in self.names {
            let program = self.program_mut(name)?;
            let link = program
                .attach(&dir, attach_type, CgroupAttachMode::Single)
                .map_err(|source| match &source {
                    aya::programs::ProgramError::SyscallError(e)
                        if e.io_error.raw_os_error() == Some(libc::EPERM) =>
                    {
                        ProgramsError::AttachDenied {
                            name,
                            cgroup: cgroup_name.clone(),
                        }
                    }
                    _ => ProgramsError::Program { name, source },
                })?;
            self.links.push((name, link));
        }
        Ok(())
    }

    /// Detaches what [`Programs::attach`] attached; the programs stay loaded. (Dropping
    /// [`Programs`] also detaches.)
    pub fn detach(&mut self) -> Result<(), ProgramsError> {
        while let Some((name, link)) = self.links.pop() {
            self.program_mut(name)?
                .detach(link)
                .map_err(|source| ProgramsError::Program { name, source })?;
        }
        Ok(())
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut CgroupSkb, ProgramsError> {
        self.ebpf
            .program_mut(name)
            .ok_or(ProgramsError::Missing(name))?
            .try_into()
            .map_err(|source| ProgramsError::Program { name, source })
    }

    /// Run statistics of both programs, as the kernel keeps them.
    pub fn run_stats(&self) -> Result<Vec<RunStats>, ProgramsError> {
        self.names
            .iter()
            .map(|(name, _)| {
                let program: &CgroupSkb = self
                    .ebpf
                    .program(name)
                    .ok_or(ProgramsError::Missing(name))?
                    .try_into()
                    .map_err(|source| ProgramsError::Program { name, source })?;
                let info = program
                    .info()
                    .map_err(|source| ProgramsError::Program { name, source })?;
                Ok(RunStats {
                    name,
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
    /// Kernel ids of the loaded programs, for their run statistics.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        self.names
            .iter()
            .filter_map(|(name, _)| {
                let program: &CgroupSkb = self.ebpf.program(name)?.try_into().ok()?;
                Some((*name, program.info().ok()?.id()))
            })
            .collect()
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

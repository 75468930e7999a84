//! Loading observer's kernel programs and attaching them at the cgroup v2 root.
//!
//! Unpinned, the links live in the loaded [`aya::Ebpf`] and dropping [`Programs`] detaches
//! everything. Pinned ([`crate::pin`]), the maps and links outlive the process: a restart
//! re-opens the maps and swaps its programs in behind the links, and the programs keep
//! counting while no observer runs; `observer detach` removes them.

use std::{fs::File, path::Path};

use std::os::fd::AsFd as _;

use aya::{
    maps::MapType,
    programs::{
        cgroup_skb::CgroupSkbLinkId, links::FdLink, CgroupAttachMode, CgroupSkb,
        CgroupSkbAttachType,
    },
    Ebpf, EbpfLoader,
};
use observer_common::{
    CacheSlot, CacheSlots, TrafficKey, TrafficValue, CACHE_MAP, REPORTED_MAP, STATS_MAP,
    STAT_COUNT, TRAFFIC_MAP,
};

use crate::{
    cache_key::KernelKey,
    pin::{self, Found, PinDir, Shape},
};

/// observer's programs, built by build.rs from observer-ebpf.
pub static OBSERVER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));
/// The empty program pair the benchmark compares against.
pub static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer-floor"));

/// observer's program pair on x86-64 kernels with `bpf_cast_to_kern_ctx` (6.3+): the per-CPU
/// cache in front of the hash, keyed by the cgroup's serial number (cache_key.rs). Elsewhere
/// [`BY_ID_PROGRAMS`] or, off x86-64, [`HASHED_PROGRAMS`]: the cache's readers rely on x86's
/// store order to tell a torn copy of a slot (observer-ebpf's traffic.rs).
pub const SERIAL_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("count_ingress", CgroupSkbAttachType::Ingress),
    ("count_egress", CgroupSkbAttachType::Egress),
];
/// The cached pair keyed by `bpf_skb_cgroup_id`: x86-64 kernels before 6.3.
pub const BY_ID_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("count_ingress_by_id", CgroupSkbAttachType::Ingress),
    ("count_egress_by_id", CgroupSkbAttachType::Egress),
];
/// The hash-only pair, whichever pair this build counts with: what the bench compares the
/// cache against.
pub const HASHED_PROGRAMS: [(&str, CgroupSkbAttachType); 2] = [
    ("count_ingress_hashed", CgroupSkbAttachType::Ingress),
    ("count_egress_hashed", CgroupSkbAttachType::Egress),
];
/// Whether this build's programs count through the per-CPU cache ([`CACHE_MAP`]).
pub const CACHED: bool = cfg!(target_arch = "x86_64");
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
    #[error(transparent)]
    Pin(#[from] pin::PinError),
    #[error("pinning the link of {name} at {path}: {source}")]
    PinLink {
        name: &'static str,
        path: String,
        source: aya::pin::PinError,
    },
}

/// A loaded eBPF object with its cgroup_skb pair attached (or not yet).
pub struct Programs {
    ebpf: Ebpf,
    names: [(&'static str, CgroupSkbAttachType); 2],
    links: Vec<(&'static str, CgroupSkbLinkId)>,
    pins: Option<PinDir>,
    /// Pinned maps of another shape, set aside to be carried over once the new programs run.
    set_aside: Vec<SetAside>,
}

/// A pinned map of an earlier build that is not this build's shape, held open.
#[derive(Debug)]
pub struct SetAside {
    pub name: &'static str,
    pub map: aya::maps::MapData,
    pub found: Shape,
    pub want: Shape,
    /// Keys and values laid out as this build's: its entries can be read.
    pub readable: bool,
}

/// How attaching went, per program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new link (not pinned, or no pin to take over).
    New,
    /// The pinned link of an earlier run now runs this build's program: it never stopped.
    TakenOver,
}

/// The shapes this build gives its maps.
pub fn map_shapes(map_entries: u32) -> [(&'static str, Shape); 4] {
    let traffic = Shape {
        map_type: MapType::PerCpuHash,
        key_size: size_of::<TrafficKey>() as u32,
        value_size: size_of::<TrafficValue>() as u32,
        max_entries: map_entries,
        // BPF_F_NO_PREALLOC, as observer-ebpf declares them.
        map_flags: 1,
    };
    [
        (TRAFFIC_MAP, traffic),
        (
            STATS_MAP,
            Shape {
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: 8,
                max_entries: STAT_COUNT,
                map_flags: 0,
            },
        ),
        (
            REPORTED_MAP,
            Shape {
                map_type: MapType::Hash,
                ..traffic
            },
        ),
        (
            CACHE_MAP,
            Shape {
                map_type: MapType::PerCpuArray,
                key_size: 4,
                value_size: size_of::<CacheSlots>() as u32,
                max_entries: 2,
                map_flags: 0,
            },
        ),
    ]
}

/// The cache of builds before the one-element-per-direction layout: a per-CPU array of one
/// [`CacheSlot`] per element, ingress then egress, indexed as [`cache_index`] still counts.
/// Its values are not laid out as this build's, but it can be read (resume.rs).
///
/// [`cache_index`]: observer_common::cache_index
pub fn is_legacy_cache(found: &Shape) -> bool {
    found.map_type == MapType::PerCpuArray
        && found.key_size == 4
        && found.value_size as usize == size_of::<CacheSlot>()
}

/// What the serial-keyed pair needs from this kernel, or None (logged) where it has not got it.
fn kernel_key() -> Option<KernelKey> {
    KernelKey::find()
        .inspect_err(|e| {
            log::info!(
                "counting by cgroup id, which costs a few ns more per packet and counts the \
                 same: the kernel's BTF lacks what keying by cgroup serial number needs \
                 (bpf_cast_to_kern_ctx is 6.3+): {e}"
            )
        })
        .ok()
}

/// Loads (verifies) both programs of `names` in `ebpf`.
fn load_pair(
    ebpf: &mut Ebpf,
    names: [(&'static str, CgroupSkbAttachType); 2],
) -> Result<(), ProgramsError> {
    for (name, _) in names {
        cgroup_skb(ebpf, name)?
            .load()
            .map_err(|source| ProgramsError::Program { name, source })?;
    }
    Ok(())
}

fn cgroup_skb<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSkb, ProgramsError> {
    ebpf.program_mut(name)
        .ok_or(ProgramsError::Missing(name))?
        .try_into()
        .map_err(|source| ProgramsError::Program { name, source })
}

/// The name a direction's link is pinned under, whichever program pair serves it, so that a
/// restart takes the link over instead of attaching a second one beside it.
fn link_name(attach_type: CgroupSkbAttachType) -> &'static str {
    match attach_type {
        CgroupSkbAttachType::Ingress => "count_ingress",
        CgroupSkbAttachType::Egress => "count_egress",
    }
}

/// A program's cumulative run statistics (kept by the kernel while kernel.bpf_stats_enabled=1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunStats {
    pub name: &'static str,
    pub run_time_ns: u64,
    pub run_count: u64,
}

impl Programs {
    /// observer's counting programs with a traffic map of `map_entries` entries, not pinned.
    pub fn load_observer(map_entries: u32) -> Result<Self, ProgramsError> {
        Self::load_observer_pinned(map_entries, None)
    }

    /// The same with the maps pinned in `pins`: pins of this build's shape are re-opened with
    /// their counts; others are set aside ([`Programs::set_aside`]) and new ones made.
    pub fn load_observer_pinned(
        map_entries: u32,
        pins: Option<&PinDir>,
    ) -> Result<Self, ProgramsError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(TRAFFIC_MAP, map_entries)
            .map_max_entries(REPORTED_MAP, map_entries);
        let mut set_aside = Vec::new();
        if let Some(pins) = pins {
            for (name, want) in map_shapes(map_entries) {
                match pins.check_map(name, want)? {
                    Found::Absent | Found::Same => {}
                    Found::Other {
                        found,
                        map,
                        readable,
                    } => set_aside.push(SetAside {
                        name,
                        map,
                        found,
                        want,
                        readable: readable || (name == CACHE_MAP && is_legacy_cache(&found)),
                    }),
                }
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let key = if CACHED { kernel_key() } else { None };
        let mut programs = match key {
            Some(key) => {
                let globals = key.globals();
                for (name, offset) in &globals {
                    loader.override_global(name, offset, true);
                }
                let (object, _) = key.patch(OBSERVER_OBJECT);
                let mut ebpf = loader.load(&object)?;
                // The by-id pair is in the same object, unpatched, with the same maps.
                match load_pair(&mut ebpf, SERIAL_PROGRAMS) {
                    Ok(()) => Self::loaded(ebpf, SERIAL_PROGRAMS),
                    Err(e) => {
                        log::warn!(
                            "counting by cgroup id, which costs a few ns more per packet and \
                             counts the same: the programs keyed by cgroup serial number did \
                             not load on this kernel: {e}"
                        );
                        Self::with(ebpf, BY_ID_PROGRAMS)?
                    }
                }
            }
            None => Self::with(
                loader.load(OBSERVER_OBJECT)?,
                if CACHED {
                    BY_ID_PROGRAMS
                } else {
                    HASHED_PROGRAMS
                },
            )?,
        };
        programs.pins = pins.cloned();
        programs.set_aside = set_aside;
        Ok(programs)
    }

    /// The cached pair keyed by cgroup id (what kernels before 6.3 run) with maps of its own,
    /// not pinned: the benchmark's comparison.
    pub fn load_by_id(map_entries: u32) -> Result<Self, ProgramsError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(TRAFFIC_MAP, map_entries);
        Self::with(loader.load(OBSERVER_OBJECT)?, BY_ID_PROGRAMS)
    }

    /// Pinned maps of earlier builds that this one could not use as they were: taken, to be
    /// read once and closed.
    pub fn take_set_aside(&mut self) -> Vec<SetAside> {
        std::mem::take(&mut self.set_aside)
    }

    /// Where the state is pinned, if it is.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// The hash-only pair with maps of its own, not pinned: the benchmark's comparison.
    pub fn load_hashed(map_entries: u32) -> Result<Self, ProgramsError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(TRAFFIC_MAP, map_entries);
        Self::with(loader.load(OBSERVER_OBJECT)?, HASHED_PROGRAMS)
    }

    /// The empty pair, for the benchmark's floor.
    pub fn load_floor() -> Result<Self, ProgramsError> {
        Self::with(Ebpf::load(FLOOR_OBJECT)?, FLOOR_PROGRAMS)
    }

    fn with(
        mut ebpf: Ebpf,
        names: [(&'static str, CgroupSkbAttachType); 2],
    ) -> Result<Self, ProgramsError> {
        load_pair(&mut ebpf, names)?;
        Ok(Self::loaded(ebpf, names))
    }

    fn loaded(ebpf: Ebpf, names: [(&'static str, CgroupSkbAttachType); 2]) -> Self {
        Self {
            ebpf,
            names,
            links: Vec::new(),
            pins: None,
            set_aside: Vec::new(),
        }
    }

    /// Attaches both programs to `cgroup` (normally the v2 root, where they see every socket).
    /// Links stack with other programs already attached there. Pinned, a link an earlier run
    /// pinned is taken over (its program swapped for this one) instead, and a new link is
    /// pinned.
    pub fn attach(
        &mut self,
        cgroup: &Path,
    ) -> Result<Vec<(&'static str, Attached)>, ProgramsError> {
        let cgroup_name = cgroup.display().to_string();
        let dir = File::open(cgroup).map_err(|source| ProgramsError::OpenCgroup {
            cgroup: cgroup_name.clone(),
            source,
        })?;
        let mut outcome = Vec::with_capacity(self.names.len());
        for (name, attach_type) in self.names {
            let pins = self.pins.clone();
            if let Some(pins) = &pins {
                let path = pins.link(link_name(attach_type));
                if path.exists() {
                    let program = self.program_mut(name)?;
                    let fd = program
                        .fd()
                        .map_err(|source| ProgramsError::Program { name, source })?;
                    match pin::update_link(&path, fd.as_fd()) {
                        Ok(()) => {
                            outcome.push((name, Attached::TakenOver));
                            continue;
                        }
                        // A defunct link (its cgroup gone) or one of another kind: replace it.
                        Err(e) => {
                            log::warn!("{e}; attaching anew");
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
            }
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
            match &pins {
                None => self.links.push((name, link)),
                Some(pins) => {
                    let path = pins.link(link_name(attach_type));
                    let owned = program
                        .take_link(link)
                        .map_err(|source| ProgramsError::Program { name, source })?;
                    let fd_link = FdLink::try_from(owned).map_err(|e| ProgramsError::Program {
                        name,
                        source: aya::programs::ProgramError::IOError(std::io::Error::other(
                            e.to_string(),
                        )),
                    })?;
                    // The pin holds the link; dropping our fd leaves it attached.
                    fd_link
                        .pin(&path)
                        .map_err(|source| ProgramsError::PinLink {
                            name,
                            path: path.display().to_string(),
                            source,
                        })?;
                }
            }
            outcome.push((name, Attached::New));
        }
        Ok(outcome)
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

    /// The pair loaded: (name, direction).
    pub fn names(&self) -> [(&'static str, CgroupSkbAttachType); 2] {
        self.names
    }

    fn program_mut(&mut self, name: &'static str) -> Result<&mut CgroupSkb, ProgramsError> {
        cgroup_skb(&mut self.ebpf, name)
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

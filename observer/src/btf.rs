//! Offsets of kernel struct members, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! The programs are Rust, which emits no CO-RE relocations, so the few kernel fields they read
//! directly are located here and handed to them as read-only globals before loading. Only what
//! that needs is parsed: the type section's structs, unions, pointers, integers and the
//! modifiers between them.

use std::path::Path;

/// Where the kernel publishes its own BTF.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF, or not this machine's byte order (magic {0:#06x})")]
    Magic(u16),
    #[error("BTF truncated: {0}")]
    Truncated(&'static str),
    #[error("BTF type kind {0} is not known to this reader")]
    UnknownKind(u32),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("no function {0} in the kernel's BTF")]
    NoFunction(String),
    #[error("struct {strukt} has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("{0} is a bitfield or not byte-aligned")]
    Bitfield(String),
    #[error("{path} is not {want}")]
    Kind { path: String, want: &'static str },
}

/// What a member must be for a program to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Pointer,
    /// An integer of this many bytes.
    Int(u32),
}

/// One type record, read from the section when needed.
#[derive(Debug, Clone, Copy)]
struct Type {
    kind: u32,
    name_off: u32,
    /// Size (structs, unions, ints) or the type referred to (pointers, typedefs, modifiers).
    size_or_type: u32,
    kind_flag: bool,
    vlen: usize,
    /// Where the record's members (structs, unions) start in the type section.
    members_at: usize,
}

/// A type section with its strings, kept as read: one buffer and an index of where each type
/// starts, freed whole when dropped. Parsing every type into its own allocations left about
/// 20 MiB of a long-running process's heap resident after the parse, for four offsets.
pub struct Btf {
    data: Vec<u8>,
    types_at: usize,
    types_len: usize,
    strings_at: usize,
    strings_len: usize,
    /// Start of each type's record in the type section; index = type id - 1.
    index: Vec<u32>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self, BtfError> {
        Self::read(Path::new(VMLINUX))
    }

    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = data
            .get(0..2)
            .map(|b| u16::from_ne_bytes([b[0], b[1]]))
            .ok_or(BtfError::Truncated("header"))?;
        if magic != MAGIC {
            return Err(BtfError::Magic(magic));
        }
        let header = Reader::new(&data, 4);
        let hdr_len = header.u32(0)? as usize;
        let types_at = hdr_len + header.u32(4)? as usize;
        let types_len = header.u32(8)? as usize;
        let strings_at = hdr_len + header.u32(12)? as usize;
        let strings_len = header.u32(16)? as usize;
        if data.len() < types_at + types_len {
            return Err(BtfError::Truncated("type section"));
        }
        if data.len() < strings_at + strings_len {
            return Err(BtfError::Truncated("string section"));
        }
        let r = Reader::new(&data[types_at..types_at + types_len], 0);
        let mut index = Vec::new();
        let mut at = 0;
        while at < types_len {
            index.push(u32::try_from(at).map_err(|_| BtfError::Truncated("type section"))?);
            let info = r.u32(at + 4)?;
            r.u32(at + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_PTR | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | 16 | KIND_TYPE_TAG => 0,
                other => return Err(BtfError::UnknownKind(other)),
            };
            at += 12 + extra;
            if at > types_len {
                return Err(BtfError::Truncated("type"));
            }
        }
        Ok(Self {
            data,
            types_at,
            types_len,
            strings_at,
            strings_len,
            index,
        })
    }

    fn section(&self) -> Reader<'_> {
        Reader::new(&self.data[self.types_at..self.types_at + self.types_len], 0)
    }

    /// Type `id` (0 is void, which has no record).
    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.index.get((id as usize).checked_sub(1)?)? as usize;
        let r = self.section();
        let info = r.u32(at + 4).ok()?;
        Some(Type {
            kind: (info >> 24) & 0x1f,
            name_off: r.u32(at).ok()?,
            size_or_type: r.u32(at + 8).ok()?,
            kind_flag: info >> 31 == 1,
            vlen: (info & 0xffff) as usize,
            members_at: at + 12,
        })
    }

    /// Every type with its id.
    fn types(&self) -> impl Iterator<Item = (u32, Type)> + '_ {
        (1..=self.index.len() as u32).filter_map(|id| self.ty(id).map(|t| (id, t)))
    }

    fn name(&self, off: u32) -> &[u8] {
        let strings = &self.data[self.strings_at..self.strings_at + self.strings_len];
        let rest = strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and modifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<Type> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The byte offset of `path` (members joined by dots, "sk_cgrp_data.cgroup") in struct
    /// `strukt`, checked to be what a program reads there. Members inside anonymous structs and
    /// unions are found as the C compiler would find them.
    pub fn offset(&self, strukt: &str, path: &str, want: Want) -> Result<u32, BtfError> {
        let (_, start) = self
            .types()
            .find(|(_, t)| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let mut current = start;
        let mut offset = 0;
        let mut last = None;
        for member in path.split('.') {
            let (bits, type_id, bitfield) =
                self.member(&current, member)
                    .ok_or_else(|| BtfError::NoMember {
                        strukt: strukt.into(),
                        member: path.into(),
                    })?;
            if bitfield || bits % 8 != 0 {
                return Err(BtfError::Bitfield(format!("{strukt}.{path}")));
            }
            offset += bits / 8;
            let t = self
                .resolve(type_id)
                .ok_or(BtfError::Truncated("type id"))?;
            last = Some(t);
            current = t;
        }
        let ok = match (want, last) {
            (Want::Pointer, Some(t)) => t.kind == KIND_PTR,
            (Want::Int(bytes), Some(t)) => t.kind == KIND_INT && t.size_or_type == bytes,
            (_, None) => false,
        };
        if !ok {
            return Err(BtfError::Kind {
                path: format!("{strukt}.{path}"),
                want: match want {
                    Want::Pointer => "a pointer",
                    Want::Int(_) => "an integer of the expected size",
                },
            });
        }
        Ok(offset)
    }

    /// The type id of kernel function `name`: what a program's call of it (a kfunc) names.
    pub fn function(&self, name: &str) -> Result<u32, BtfError> {
        self.types()
            .find(|(_, t)| t.kind == KIND_FUNC && self.name(t.name_off) == name.as_bytes())
            .map(|(id, _)| id)
            .ok_or_else(|| BtfError::NoFunction(name.into()))
    }

    /// (bit offset, type id, is a bitfield) of `name` in struct or union `t`, looking into
    /// anonymous members.
    fn member(&self, t: &Type, name: &str) -> Option<(u32, u32, bool)> {
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        let r = self.section();
        for m in 0..t.vlen {
            let m_at = t.members_at + m * 12;
            let (name_off, type_id, word) = (
                r.u32(m_at).ok()?,
                r.u32(m_at + 4).ok()?,
                r.u32(m_at + 8).ok()?,
            );
            // With kind_flag, the top 8 bits are a bitfield's size.
            let (bits, bitfield) = if t.kind_flag {
                (word & 0x00ff_ffff, word >> 24 != 0)
            } else {
                (word, false)
            };
            let member_name = self.name(name_off);
            if member_name == name.as_bytes() {
                return Some((bits, type_id, bitfield));
            }
            if member_name.is_empty() {
                if let Some(inner) = self.resolve(type_id) {
                    if let Some((inner_bits, id, bitfield)) = self.member(&inner, name) {
                        return Some((bits + inner_bits, id, bitfield));
                    }
                }
            }
        }
        None
    }
}

struct Reader<'a> {
    data: &'a [u8],
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], base: usize) -> Self {
        Self { data, base }
    }

    fn u32(&self, at: usize) -> Result<u32, BtfError> {
        let at = self.base + at;
        self.data
            .get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(BtfError::Truncated("type"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built the way the kernel lays it out: header, types, strings.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn head(&mut self, name: &str, kind: u32, vlen: u32, flag: bool, size_or_type: u32) -> u32 {
            let name = self.string(name);
            let info = (kind << 24) | vlen | (u32::from(flag) << 31);
            for v in [name, info, size_or_type] {
                self.types.extend_from_slice(&v.to_ne_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, bytes: u32) -> u32 {
            let id = self.head(name, KIND_INT, 0, false, bytes);
            self.types.extend_from_slice(&(bytes * 8).to_ne_bytes());
            id
        }

        fn strukt(
            &mut self,
            name: &str,
            kind: u32,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.head(name, kind, members.len() as u32, false, size);
            for &(m, ty, bits) in members {
                let m = self.string(m);
                for v in [m, ty, bits] {
                    self.types.extend_from_slice(&v.to_ne_bytes());
                }
            }
            id
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            let hdr_len = 24u32;
            let fields = [
                hdr_len,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ];
            for v in fields {
                out.extend_from_slice(&v.to_ne_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    fn sample() -> Btf {
        let mut b = Builder::new();
        let u64_t = b.int("long long unsigned int", 8);
        let u64_td = b.head("u64", KIND_TYPEDEF, 0, false, u64_t);
        let inner = b.strukt(
            "cgroup",
            KIND_STRUCT,
            64,
            &[("pad", u64_td, 0), ("serial", u64_td, 64)],
        );
        let ptr = b.head("", KIND_PTR, 0, false, inner);
        let data = b.strukt(
            "data",
            KIND_STRUCT,
            16,
            &[("flags", u64_t, 0), ("cgroup", ptr, 64)],
        );
        let proto = b.head("", KIND_FUNC_PROTO, 0, false, u64_t);
        let _func = b.head("bpf_cast_to_kern_ctx", KIND_FUNC, 0, false, proto);
        let anon = b.strukt("", KIND_UNION, 8, &[("hidden", u64_td, 0)]);
        let _outer = b.strukt(
            "sock",
            KIND_STRUCT,
            64,
            &[("a", u64_t, 0), ("d", data, 128), ("", anon, 384)],
        );
        Btf::parse(b.bytes()).unwrap()
    }

    #[test]
    fn offsets_follow_the_path_through_members_and_anonymous_unions() {
        let btf = sample();
        assert_eq!(btf.offset("sock", "d.cgroup", Want::Pointer).unwrap(), 24);
        assert_eq!(btf.offset("cgroup", "serial", Want::Int(8)).unwrap(), 8);
        assert_eq!(btf.offset("sock", "hidden", Want::Int(8)).unwrap(), 48);
    }

    #[test]
    fn a_function_is_found_by_name_as_its_type_id() {
        let btf = sample();
        // ids from 1 in the order made: int, typedef, cgroup, ptr, data, proto, func.
        assert_eq!(btf.function("bpf_cast_to_kern_ctx").unwrap(), 7);
        assert!(matches!(
            btf.function("cgroup"),
            Err(BtfError::NoFunction(_))
        ));
        assert!(matches!(btf.function("nope"), Err(BtfError::NoFunction(_))));
    }

    #[test]
    fn a_wrong_kind_a_missing_member_or_struct_is_an_error() {
        let btf = sample();
        assert!(matches!(
            btf.offset("sock", "d.flags", Want::Pointer),
            Err(BtfError::Kind { .. })
        ));
        assert!(matches!(
            btf.offset("cgroup", "serial", Want::Int(4)),
            Err(BtfError::Kind { .. })
        ));
        assert!(matches!(
            btf.offset("sock", "d.nope", Want::Pointer),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.offset("nope", "a", Want::Int(8)),
            Err(BtfError::NoStruct(_))
        ));
        assert!(matches!(Btf::parse(vec![0u8; 24]), Err(BtfError::Magic(0))));
        let mut cut = Builder::new();
        cut.int("int", 4);
        let bytes = cut.bytes();
        assert!(Btf::parse(bytes[..bytes.len() - 8].to_vec()).is_err());
    }

    /// The running kernel's BTF, against bpftool's reading of the same file.
    #[test]
    fn the_kernels_offsets_are_bpftools() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: no {VMLINUX}");
            return;
        }
        let Ok(out) = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX, "format", "raw"])
            .output()
        else {
            eprintln!("skipped: no bpftool");
            return;
        };
        let dump = String::from_utf8_lossy(&out.stdout);
        let bits = |strukt: &str, member: &str| -> u32 {
            let head = format!("STRUCT '{strukt}' size=");
            let start = dump.find(&head).unwrap();
            let line = dump[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with('\t'))
                .find(|l| l.trim_start().starts_with(&format!("'{member}' ")))
                .unwrap();
            line.rsplit("bits_offset=").next().unwrap().parse().unwrap()
        };
        let btf = Btf::kernel().unwrap();
        assert!(matches!(
            btf.offset("sock", "sk_cgrp_data", Want::Pointer),
            Err(BtfError::Kind { .. })
        ));
        assert_eq!(
            btf.offset("sock", "sk_cgrp_data.cgroup", Want::Pointer)
                .unwrap(),
            (bits("sock", "sk_cgrp_data") + bits("sock_cgroup_data", "cgroup")) / 8
        );
        assert_eq!(
            btf.offset("cgroup", "self.serial_nr", Want::Int(8))
                .unwrap(),
            (bits("cgroup", "self") + bits("cgroup_subsys_state", "serial_nr")) / 8
        );
        assert_eq!(
            btf.offset("sock", "__sk_common.skc_state", Want::Int(1))
                .unwrap(),
            (bits("sock", "__sk_common") + bits("sock_common", "skc_state")) / 8
        );
    }
}

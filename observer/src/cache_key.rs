//! How the cached programs find a packet's slot on this kernel.
//!
//! Where the kernel has the `bpf_cast_to_kern_ctx` kfunc (6.3+), the programs key the cache by
//! the socket's cgroup's serial number, read from the kernel's own structures: a helper call
//! and two cache lines fewer per packet than `bpf_skb_cgroup_id` (docs/benchmarks.md). That
//! needs two things aya does not do: the offsets of the fields read (Rust emits no CO-RE
//! relocations), taken here from the kernel's BTF and handed over as read-only globals, and a
//! kfunc call, which the programs write as a call of a placeholder helper number that
//! [`KernelKey::patch`] rewrites. Older kernels run the pair keyed by the cgroup id.

use observer_common::{
    CAST_TO_KERN_CTX_PLACEHOLDER, CGROUP_SERIAL_OFFSET, SKB_SK_OFFSET, SOCK_CGROUP_OFFSET,
    SOCK_STATE_OFFSET,
};

use crate::btf::{Btf, BtfError, Want};

/// The kfunc the placeholder stands for.
const KFUNC: &str = "bpf_cast_to_kern_ctx";

/// BPF_JMP | BPF_CALL: the opcode of every call instruction.
const CALL: u8 = 0x85;
/// `src_reg` of a call of a kernel function named by its BTF id (BPF_PSEUDO_KFUNC_CALL), in
/// the register byte's high nibble.
const KFUNC_CALL_REGS: u8 = 2 << 4;

/// What the serial-keyed programs need from this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelKey {
    /// BTF id of `bpf_cast_to_kern_ctx`.
    kfunc: u32,
    /// `sk_buff.sk`, `sock.__sk_common.skc_state`, `sock.sk_cgrp_data.cgroup`,
    /// `cgroup.self.serial_nr`, in bytes.
    offsets: [u64; 4],
}

impl KernelKey {
    /// From the running kernel's BTF; an error says why the programs key by cgroup id instead.
    pub fn find() -> Result<Self, BtfError> {
        Self::from_btf(&Btf::kernel()?)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self, BtfError> {
        let offset = |strukt, path, want| btf.offset(strukt, path, want).map(u64::from);
        Ok(Self {
            kfunc: btf.function(KFUNC)?,
            offsets: [
                offset("sk_buff", "sk", Want::Pointer)?,
                offset("sock", "__sk_common.skc_state", Want::Int(1))?,
                offset("sock", "sk_cgrp_data.cgroup", Want::Pointer)?,
                offset("cgroup", "self.serial_nr", Want::Int(8))?,
            ],
        })
    }

    /// The globals to set before loading: (name, offset).
    pub fn globals(&self) -> [(&'static str, u64); 4] {
        let [sk, state, cgroup, serial] = self.offsets;
        [
            (SKB_SK_OFFSET, sk),
            (SOCK_STATE_OFFSET, state),
            (SOCK_CGROUP_OFFSET, cgroup),
            (CGROUP_SERIAL_OFFSET, serial),
        ]
    }

    /// `object` with every call of the placeholder turned into a call of the kfunc; returns
    /// how many were rewritten. Instructions are 8 bytes at 8-byte aligned offsets of the
    /// file (ELF code sections are aligned so), and the match is the whole instruction: the
    /// call opcode, no registers, no offset, the placeholder number.
    pub fn patch(&self, object: &[u8]) -> (Vec<u8>, usize) {
        let mut placeholder = [CALL, 0, 0, 0, 0, 0, 0, 0];
        placeholder[4..].copy_from_slice(&CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes());
        let mut call = [CALL, KFUNC_CALL_REGS, 0, 0, 0, 0, 0, 0];
        call[4..].copy_from_slice(&self.kfunc.to_le_bytes());
        let mut out = object.to_vec();
        let mut rewritten = 0;
        for insn in out.chunks_exact_mut(8) {
            if *insn == placeholder {
                insn.copy_from_slice(&call);
                rewritten += 1;
            }
        }
        (out, rewritten)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::programs::{OBSERVER_OBJECT, SERIAL_PROGRAMS};

    fn key() -> KernelKey {
        KernelKey {
            kfunc: 0x0102_0304,
            offsets: [24, 18, 672, 80],
        }
    }

    #[test]
    fn each_serial_program_calls_the_placeholder_once_and_is_rewritten() {
        let (patched, rewritten) = key().patch(OBSERVER_OBJECT);
        // One call per program: kernel_key is inlined into each.
        assert_eq!(rewritten, SERIAL_PROGRAMS.len());
        assert_eq!(patched.len(), OBSERVER_OBJECT.len());
        assert_eq!(key().patch(&patched).1, 0, "no placeholder is left");
        let changed: Vec<usize> = (0..patched.len())
            .filter(|&i| patched[i] != OBSERVER_OBJECT[i])
            .collect();
        // Only the register byte and the immediate of each call.
        assert!(changed.len() <= rewritten * 5, "{changed:?}");
        for &i in &changed {
            assert!(matches!(i % 8, 1 | 4..=7), "byte {i} changed");
        }
    }

    #[test]
    fn a_placeholder_off_the_instruction_grid_or_with_registers_is_left() {
        let mut object = vec![0u8; 4];
        object.extend_from_slice(&[CALL, 0, 0, 0]);
        object.extend_from_slice(&CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes());
        object.extend_from_slice(&[CALL, 0x01, 0, 0]);
        object.extend_from_slice(&CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes());
        object.extend_from_slice(&[CALL, 0, 0, 0]);
        object.extend_from_slice(&CAST_TO_KERN_CTX_PLACEHOLDER.to_le_bytes());
        object.extend_from_slice(&[0; 4]);
        let (patched, rewritten) = key().patch(&object);
        assert_eq!(rewritten, 0);
        assert_eq!(patched, object);
        // On the grid: the two without registers are rewritten, the one with is left.
        let (patched, rewritten) = key().patch(&object[4..]);
        assert_eq!(rewritten, 2);
        let call = [CALL, 0x20, 0, 0, 4, 3, 2, 1];
        assert_eq!(patched[0..8], call);
        assert_eq!(patched[8..16], object[12..20]);
        assert_eq!(patched[16..24], call);
    }

    /// The running kernel, where it has the kfunc: the offsets are where bpftool's reading of
    /// the same BTF puts them (btf.rs checks the reader against bpftool).
    #[test]
    fn this_kernel_has_what_the_serial_programs_read() {
        let Ok(btf) = Btf::kernel() else {
            eprintln!("skipped: no kernel BTF");
            return;
        };
        match KernelKey::from_btf(&btf) {
            Ok(found) => {
                let [sk, state, cgroup, serial] = found.offsets;
                assert!(sk > 0 && cgroup > state && serial > 0, "{found:?}");
                assert!(found.kfunc > 0);
            }
            Err(BtfError::NoFunction(_)) => eprintln!("kernel before 6.3: keyed by cgroup id"),
            Err(e) => panic!("{e}"),
        }
    }
}

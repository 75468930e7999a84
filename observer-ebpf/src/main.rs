//! observer's kernel programs: one cgroup_skb pair at the cgroup v2 root that counts every
//! packet under the cgroup of the socket that owns it.
#![no_std]
#![no_main]

mod state;
mod traffic;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

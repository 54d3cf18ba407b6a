//! What every eBPF object of this crate needs: a panic handler (no panic path survives the
//! verifier; this only satisfies `no_std`) and a GPL-compatible license for the kernel.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

//! What every object of this crate carries: the panic handler a `no_std` binary needs (the
//! verifier rejects any program that could reach it) and the license section the kernel reads.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

//! Links the proxy's binaries with packed relative relocations (DT_RELR).
//!
//! A position-independent binary carries one 24-byte relocation for every
//! pointer in its tables (vtables, string slices in statics), and the
//! loader reads them all at start: about 700 KB of `.rela.dyn`, which then
//! stays resident in every sidecar. Packed, the same relocations take a few
//! kilobytes, and address-space layout randomisation is kept. Needs GNU ld
//! 2.38 or lld at link time and glibc 2.36 at run time (Debian 12, the
//! images we ship).

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo::rerun-if-changed=build.rs");
}

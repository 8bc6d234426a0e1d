//! Link options for the proxy's binaries, both about what stays resident in
//! every sidecar.
//!
//! Packed relative relocations (DT_RELR): a position-independent binary
//! carries one 24-byte relocation for every pointer in its tables (vtables,
//! string slices in statics), and the loader reads them all at start: about
//! 700 KB of `.rela.dyn`, which then stays resident. Packed, the same
//! relocations take a few kilobytes, and address-space layout randomisation
//! is kept. Needs GNU ld 2.38 or lld at link time and glibc 2.36 at run time
//! (Debian 12, the images we ship).
//!
//! Link order: `link-order.txt` names the functions a sidecar runs (written
//! by `scripts/link-order.sh` from a profile), and lld places them first in
//! `.text`. Scattered over 13 MB of code, those 2 MB filled 6 MB of
//! resident pages, because the kernel maps 64 KB around every page a
//! process touches; grouped, they fill little more than their size. Only
//! lld (and mold) read a symbol ordering file, so it is passed where the
//! compiler links with its own lld by default (x86_64 Linux from Rust 1.90)
//! and no other linker was chosen; `INFERMESH_LINK_ORDER=off` leaves it out.

use std::path::Path;
use std::process::Command;

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
        if links_with_rust_lld() {
            let order = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
                .join("link-order.txt");
            if order.is_file() {
                println!(
                    "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
                    order.display()
                );
                // Names of functions this build does not have (another
                // compiler, other dependency versions, a debug build) are
                // skipped without a warning each.
                println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
            }
        }
    }
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=link-order.txt");
    println!("cargo::rerun-if-env-changed=INFERMESH_LINK_ORDER");
    println!("cargo::rerun-if-env-changed=RUSTC_LINKER");
}

/// Whether rustc links the binaries with its own lld: its default on
/// x86_64 Linux since 1.90, unless a linker or linker features were chosen
/// (`-C linker`, `-C linker-features`, `-C link-self-contained`, or a
/// `linker` in cargo's configuration).
fn links_with_rust_lld() -> bool {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("INFERMESH_LINK_ORDER") == "off"
        || var("CARGO_CFG_TARGET_ARCH") != "x86_64"
        || std::env::var_os("RUSTC_LINKER").is_some()
        || var("CARGO_ENCODED_RUSTFLAGS").contains("link")
    {
        return false;
    }
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(output) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let version = String::from_utf8_lossy(&output.stdout);
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}

//! Sets `cfg(kvm_vmm)` where the workspace's test VMM, `crates/kvm-vmm` (not published),
//! sits next to this manifest, on Linux: the density demo's `--kvm` runs its guests
//! through it (a path-only dev-dependency, which `cargo package` strips, so the packaged
//! crate builds its examples without it and `--kvm` says why it cannot run).

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvm_vmm)");
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let vmm = Path::new(&manifest).join("crates/kvm-vmm/Cargo.toml");
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if vmm.is_file() {
        println!("cargo:rerun-if-changed=crates/kvm-vmm/Cargo.toml");
        if linux {
            println!("cargo:rustc-cfg=kvm_vmm");
        }
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
}

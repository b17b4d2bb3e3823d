//! Sets `cfg(pageoned)` where the cross-process service, `crates/pageoned` (not published
//! yet), sits next to this manifest, on Linux (the `cross_process` example needs it), and
//! `cfg(kvm_vmm)` where the workspace's test VMM, `crates/kvm-vmm` (not published),
//! sits next to this manifest, on Linux: the density demo's `--kvm` runs its guests
//! through it (a path-only dev-dependency, which `cargo package` strips, so the packaged
//! crate builds its examples without it and `--kvm` says why it cannot run).

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvm_vmm)");
    println!("cargo::rustc-check-cfg=cfg(pageoned)");
    // The same for the cross-process service (`crates/pageoned`, not published yet): the
    // `cross_process` example runs it.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    if Path::new(&manifest_dir)
        .join("crates/pageoned/Cargo.toml")
        .is_file()
    {
        println!("cargo:rerun-if-changed=crates/pageoned/Cargo.toml");
        if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
            println!("cargo:rustc-cfg=pageoned");
        }
    }
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

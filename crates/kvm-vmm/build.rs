//! Builds the bare-metal guest (`guest/`, target `x86_64-unknown-none`) with a nested
//! `cargo build --release`, in its own target directory under `OUT_DIR` (so it never
//! waits for the outer build's lock), and hands its ELF to the crate
//! (`cfg(kvm_vmm_guest)`, `KVM_VMM_GUEST_ELF`). Where the target is not installed it
//! builds nothing and says so (`cargo:warning`, and `KVM_VMM_GUEST_MISSING` for
//! `guest_image()`'s error): install it with `rustup target add x86_64-unknown-none`.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-none";

fn missing(reason: &str) {
    println!("cargo:warning=kvm-vmm: the bare-metal guest is not built: {reason}");
    println!("cargo:rustc-env=KVM_VMM_GUEST_MISSING={reason}");
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kvm_vmm_guest)");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let guest = manifest.join("guest");
    for p in [
        "guest/src",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/build.rs",
        "guest/link.ld",
        "guest/.cargo/config.toml",
        "src/abi.rs",
        "../ppr-guest/src",
        "../ppr-guest/Cargo.toml",
        "../pip/src",
        "../pip/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={p}");
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return missing("the VMM runs on Linux only");
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        return missing("`rustc --print sysroot` failed");
    };
    if !sysroot
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
    {
        return missing(&format!(
            "the {TARGET} target is not installed (run `rustup target add {TARGET}`)"
        ));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--target", TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTC", &rustc);
    // The outer build's flags and wrappers are for the host crates, not the guest
    // (clippy's driver, `--cfg` flags of a loom run, ...).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_TARGET_DIR",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
    if !output.status.success() {
        panic!(
            "building the kvm-vmm guest failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf: &Path = &target_dir
        .join(TARGET)
        .join("release")
        .join("kvm-vmm-guest");
    assert!(elf.is_file(), "no guest ELF at {}", elf.display());
    println!("cargo:rustc-cfg=kvm_vmm_guest");
    println!("cargo:rustc-env=KVM_VMM_GUEST_ELF={}", elf.display());
}

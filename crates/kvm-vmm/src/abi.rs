//! The contract between the VMM and the guest: the guest-physical memory layout, the I/O
//! ports and the parameter block. This file is compiled into both the VMM (`kvm_vmm::abi`)
//! and the bare-metal guest (`guest/src/main.rs` includes it by path), so the two cannot
//! disagree. It holds constants and `#[repr(C)]` types only (`no_std`).
//!
//! # Guest-physical layout (identity-mapped: virtual = physical)
//! | range | what |
//! | --- | --- |
//! | `0x1000` | the GDT (null, 64-bit code `0x08`, data `0x10`, TSS `0x18`, null, user code `0x2B`, user data `0x33`) |
//! | `0x2000` | the PML4 |
//! | `0x3000` | the PDPT |
//! | `0x4000..0x8000` | four page directories: the first 4 GiB in 2 MiB pages |
//! | [`PARAMS_ADDR`] | the [`Params`] block the VMM fills before the guest starts |
//! | [`STACKS_BASE`].. | one [`STACK_SIZE`] stack per vCPU ([`MAX_VCPUS`] at most) |
//! | [`IMAGE_BASE`]..[`IMAGE_LIMIT`] | the guest image (code, data, bss) |
//! | [`DATA_BASE`]..RAM size | free memory: the workloads' pages |
//!
//! # Entry
//! Every vCPU starts at the image's entry point in 64-bit long mode, interrupts off, at
//! CPL 3 with IOPL 3 (or CPL 0: `kvm_vmm::Privilege`), no IDT (an exception is a triple
//! fault: the VMM reports a shutdown exit), with
//! `rdi` = [`PARAMS_ADDR`], `rsi` = the vCPU's index and `rsp` = the top of its stack
//! minus 8 (as after a `call`, so the System V ABI's stack alignment holds).
//!
//! # Ports
//! All accesses are 32-bit except [`PORT_CONSOLE`] (8-bit).
//! - [`PORT_CONSOLE`]: `out` one byte of console output.
//! - [`PORT_ARG_LO`], [`PORT_ARG_HI`]: push a 64-bit argument (low half first; the
//!   write of the high half pushes it) onto the vCPU's argument list.
//! - [`PORT_CALL`]: `out` a call code ([`CALL_REPORT`], ...): the host handles the call
//!   with the arguments pushed since the last call, then clears them. The host's 64-bit
//!   answer is read back with `in` from [`PORT_RESULT_LO`] and [`PORT_RESULT_HI`].
//! - [`PORT_DONE`]: `out` the vCPU's exit status (0: success); the vCPU stops.

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// The GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// The PML4 (CR3).
pub const PML4_ADDR: u64 = 0x2000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x3000;
/// The first of four page directories (2 MiB pages, 4 GiB identity-mapped).
pub const PD_ADDR: u64 = 0x4000;
/// The parameter block ([`Params`]).
pub const PARAMS_ADDR: u64 = 0x8000;
/// The lowest stack.
pub const STACKS_BASE: u64 = 0x10_0000;
/// Bytes of stack per vCPU.
pub const STACK_SIZE: u64 = 0x1_0000;
/// The most vCPUs a VM may have (their stacks fill `STACKS_BASE..IMAGE_BASE`).
pub const MAX_VCPUS: u32 = 16;
/// Where the guest image is loaded (and linked).
pub const IMAGE_BASE: u64 = 0x20_0000;
/// The end of the image area: code, data and bss must end below it.
pub const IMAGE_LIMIT: u64 = 0x40_0000;
/// The first byte of the free memory handed to the workloads.
pub const DATA_BASE: u64 = 0x40_0000;

/// Console output, one byte per `out` (8-bit).
pub const PORT_CONSOLE: u16 = 0xE9;
/// The low half of the next argument (32-bit `out`).
pub const PORT_ARG_LO: u16 = 0x510;
/// The high half of the next argument; pushes it (32-bit `out`).
pub const PORT_ARG_HI: u16 = 0x514;
/// Make a call (32-bit `out` of the call code).
pub const PORT_CALL: u16 = 0x518;
/// The low half of the last call's result (32-bit `in`).
pub const PORT_RESULT_LO: u16 = 0x51C;
/// The high half of the last call's result (32-bit `in`).
pub const PORT_RESULT_HI: u16 = 0x520;
/// The vCPU is done; the value is its exit status (32-bit `out`).
pub const PORT_DONE: u16 = 0x524;

/// Call: a report. Arguments: a report tag ([`REPORT_CHECKER`], ...), then its values.
pub const CALL_REPORT: u32 = 1;
/// Call: the guest finished a round of its workload. Arguments: the round number. The
/// host may hold the vCPU here (for example until an engine has run a pass).
pub const CALL_ROUND: u32 = 2;
/// Call: register guest memory with the host. Arguments: what ([`REGISTER_PIP_POOL`]),
/// the guest-physical address, the length in bytes.
pub const CALL_REGISTER: u32 = 3;

/// [`CALL_REGISTER`]: the guest's PIP pool (the PPR protocol's shared area).
pub const REGISTER_PIP_POOL: u64 = 1;

/// Report tag of the memory checker. Values, in order: pages checked, pages rewritten,
/// pages mismatched, words mismatched, TSC cycles spent writing (fill and rewrites), TSC
/// cycles in total, rounds, pages this vCPU owns, TSC cycles of the fill alone.
pub const REPORT_CHECKER: u64 = 0xC4EC;
/// Number of values in a [`REPORT_CHECKER`] report.
pub const CHECKER_VALUES: usize = 9;

/// The `magic` of a valid [`Params`] block.
pub const PARAMS_MAGIC: u64 = 0x6B76_6D2D_766D_6D31; // "kvm-vmm1"

/// Workload: print a greeting and stop (a smoke test).
pub const WORKLOAD_HELLO: u64 = 0;
/// Workload: the memory checker (see [`Params::args`]).
pub const WORKLOAD_CHECKER: u64 = 1;

/// Workload: the Per Page Recycler's guest side ([`PPR_POOL_BYTES`], ...): a page
/// allocator whose free and alloc paths call `ppr-guest`'s hooks, over a PIP pool at the
/// start of the data area registered with [`CALL_REGISTER`]. Every cycle allocates all
/// its pages (each must read zeros, or exactly what the guest last wrote, minus the mark
/// words), writes them, checks them and frees them again, with a [`CALL_ROUND`] barrier
/// after the allocation (round `2c - 1`) and after the frees (round `2c`).
pub const WORKLOAD_PPR: u64 = 2;
/// Index in [`Params::args`] of the PIP pool's size in bytes (from [`DATA_BASE`]).
pub const PPR_POOL_BYTES: usize = 0;
/// Index in [`Params::args`] of the allocator's pages (all vCPUs together), after the pool.
pub const PPR_PAGES: usize = 1;
/// Index in [`Params::args`] of the number of allocate-write-free cycles.
pub const PPR_CYCLES: usize = 2;
/// PIP frame numbers are guest-physical page numbers plus this (frame 0 means "empty" to
/// PIP): page `i` of the VM's single RAM region is frame `i + 1`.
pub const PPR_FRAME_OFFSET: u64 = 1;
/// The seed of the PPR workload's page patterns ([`pattern_word`]).
pub const PPR_SEED: u64 = 0x0999_7000;
/// Report tag of the PPR workload. Values, in order: pages allocated, of which read
/// zeros (recycled, or never written), of which read intact (offer withdrawn before the
/// host took it), pages found corrupt (neither, or changed while allocated), pages
/// offered on free, frees not offered (pool full or refused), `on_alloc` answers
/// `Busy` (retried), pages this vCPU owns.
pub const REPORT_PPR: u64 = 0x0999;
/// Number of values in a [`REPORT_PPR`] report.
pub const PPR_VALUES: usize = 8;

/// Workload: a hostile PPR guest (vCPU 0 only; others stop at once). It registers a
/// PIP pool like [`WORKLOAD_PPR`], keeps every page in use (patterned), and writes
/// garbage: marks with the pool's indicator naming empty slots, another pool, slots out
/// of range, or slots it filled with garbage frame numbers, and random marks; then
/// (round 2) garbage in the pool header. After each [`CALL_ROUND`] barrier it checks
/// that no page changed. Arguments as for [`WORKLOAD_PPR`] ([`PPR_POOL_BYTES`],
/// [`PPR_PAGES`]).
pub const WORKLOAD_PPR_HOSTILE: u64 = 3;
/// Report tag of [`WORKLOAD_PPR_HOSTILE`]. Values: pages, pages found changed.
pub const REPORT_PPR_HOSTILE: u64 = 0x0666;

/// Workload: the density workload of the repository's `examples/density`, in the guest.
/// In the data area, in order: a PIP pool ([`DENSITY_POOL_BYTES`], registered with
/// [`CALL_REGISTER`]; a host that answers 0 leaves the hooks disabled), an "OS image"
/// ([`DENSITY_IMAGE`] pages whose contents depend only on [`DENSITY_IMAGE_SEED`]: the
/// same bytes in every VM given the same seed), OS pages private to the VM
/// ([`DENSITY_PRIVATE`], from [`DENSITY_SEED`]), pages the guest zeroed
/// ([`DENSITY_ZEROED`]: written with zeros), the page allocator's metadata (three `u32`
/// per page: free stack, held stack, generation), then the allocator's pages
/// ([`DENSITY_FREE`]), all freed through `on_free` at boot. The application then runs
/// [`DENSITY_CYCLES`] cycles of `period = 2 * steps + idle` steps ([`DENSITY_STEPS`],
/// [`DENSITY_IDLE`]): at step `t` it holds `peak * tri((t + phase) % period) / steps`
/// pages ([`DENSITY_APP_PEAK`], [`DENSITY_PHASE`]; `tri(x) = min(x, 2 * steps - x)` for
/// `x < 2 * steps`, else 0: a spike, then `idle` steps holding nothing), allocating
/// (through `on_alloc`; each page must read zeros or exactly its last contents, then
/// gets fresh unique contents) or freeing (each page first checked unchanged since it was written, then
/// `on_free`) to get there, last allocated first freed. Each vCPU runs its share of
/// every count over its own pages. After boot and after every step it calls
/// [`CALL_ROUND`] (round 0, then the step number `t`), and after the last step it frees
/// every page still held (round `cycles * period + 1`). Every `period` steps and
/// at the end it re-reads the image, private and zeroed pages (each must hold what was
/// written). Then it reports [`REPORT_DENSITY`].
pub const WORKLOAD_DENSITY: u64 = 4;
/// Index in [`Params::args`]: the density workload's PIP pool size in bytes, at
/// [`DATA_BASE`] (rounded up to whole pages; at least one page).
pub const DENSITY_POOL_BYTES: usize = 0;
/// Index in [`Params::args`]: OS image pages (identical in every VM with the same
/// [`DENSITY_IMAGE_SEED`]).
pub const DENSITY_IMAGE: usize = 1;
/// Index in [`Params::args`]: OS pages private to the VM (unique contents).
pub const DENSITY_PRIVATE: usize = 2;
/// Index in [`Params::args`]: pages the guest zeroed (written with zeros at boot).
pub const DENSITY_ZEROED: usize = 3;
/// Index in [`Params::args`]: the application's peak, pages (all vCPUs together).
pub const DENSITY_APP_PEAK: usize = 4;
/// Index in [`Params::args`]: steps up (and as many down) per application cycle.
pub const DENSITY_STEPS: usize = 5;
/// Index in [`Params::args`]: application cycles.
pub const DENSITY_CYCLES: usize = 6;
/// Index in [`Params::args`]: the VM's phase, in steps into the cycle.
pub const DENSITY_PHASE: usize = 7;
/// Index in [`Params::args`]: the VM's own seed (private and application contents).
pub const DENSITY_SEED: usize = 8;
/// Index in [`Params::args`]: the OS image's seed (give every VM the same).
pub const DENSITY_IMAGE_SEED: usize = 9;
/// Index in [`Params::args`]: the allocator's pages, all vCPUs together (0: the rest of
/// the data area). At least the peak.
pub const DENSITY_FREE: usize = 10;
/// Index in [`Params::args`]: steps per cycle after the spike in which the application
/// holds nothing (0: the cycle is the spike alone).
pub const DENSITY_IDLE: usize = 11;
/// Report tag of [`WORKLOAD_DENSITY`] (one per vCPU). Values, in order: pages
/// allocated by the application, pages it freed (boot-time frees not counted), of the
/// allocations those that read zeros, those that read their last contents intact, pages
/// found corrupt (an allocation reading neither, a held page changed before its free,
/// an OS page not holding what was written), frees offered to the host (boot-time frees
/// included), frees not offered (pool full or refused), `on_alloc` answers `Busy`
/// (retried), OS page reads checked, steps, TSC cycles of the steps' work (allocating,
/// writing, checking, freeing; not the barriers), TSC cycles of the boot (OS pages and
/// boot-time frees), the allocator's pages on this vCPU, 1 if the host registered the
/// pool (the hooks are enabled).
pub const REPORT_DENSITY: u64 = 0xDE25;
/// Number of values in a [`REPORT_DENSITY`] report.
pub const DENSITY_VALUES: usize = 14;

/// Index in [`Params::args`] of the checker's page count (all vCPUs together; 0: every
/// page of the data area).
pub const CHECKER_PAGES: usize = 0;
/// Index in [`Params::args`] of the checker's number of rounds.
pub const CHECKER_ROUNDS: usize = 1;
/// Index in [`Params::args`] of the checker's rewrite stride `k`: round `r` rewrites the
/// pages `p` with `p % k == r % k` (a moving `1/k` of them). 0 is taken as 1.
pub const CHECKER_STRIDE: usize = 2;
/// Index in [`Params::args`] of the period of generation 0: page `p` first holds the
/// pattern of page `p % period` (so pages `period` apart are identical, in every VM with
/// the same period). 0: no repetition (the pattern of page `p` itself).
pub const CHECKER_DUP_PERIOD: usize = 3;
/// Index in [`Params::args`] of the per-VM seed mixed into generations 1 and later.
pub const CHECKER_SEED: usize = 4;
/// Index in [`Params::args`]: nonzero makes the checker call [`CALL_ROUND`] after the
/// fill and after every round.
pub const CHECKER_CALL_ROUNDS: usize = 5;

/// The block at [`PARAMS_ADDR`], written by the VMM before the guest starts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Params {
    /// [`PARAMS_MAGIC`].
    pub magic: u64,
    /// The number of vCPUs.
    pub vcpus: u64,
    /// Bytes of guest RAM (from guest-physical 0).
    pub mem_size: u64,
    /// The first byte of the data area ([`DATA_BASE`]).
    pub data_base: u64,
    /// Bytes in the data area (a multiple of [`PAGE_SIZE`]).
    pub data_len: u64,
    /// Which workload to run ([`WORKLOAD_CHECKER`], ...).
    pub workload: u64,
    /// The workload's arguments (for the checker: [`CHECKER_PAGES`], ...).
    pub args: [u64; 16],
}

/// The content of word `word` of a checker page whose pattern is (`page`, `generation`)
/// (`seed` is mixed in from generation 1 on). A splitmix64 step: every word differs.
pub const fn pattern_word(page: u64, generation: u64, seed: u64, word: u64) -> u64 {
    let s = if generation == 0 {
        page
    } else {
        page ^ (generation << 40) ^ seed.rotate_left(17)
    };
    let mut z = s
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(word.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(1);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generation page `p` holds after `round` rounds with rewrite stride `stride`: the
/// number of rounds `r` in `1..=round` with `r % stride == p % stride`.
pub const fn checker_generation(page: u64, round: u64, stride: u64) -> u64 {
    let k = if stride == 0 { 1 } else { stride };
    let m = page % k;
    if m == 0 {
        round / k
    } else if round >= m {
        (round - m) / k + 1
    } else {
        0
    }
}

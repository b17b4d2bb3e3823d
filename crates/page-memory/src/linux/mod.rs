//! [`LinuxMemory`]: the [`PageMemory`] contract over real anonymous memory of this
//! process (a VMM's guest RAM), with userfaultfd write-protect and a memfd canonical
//! store. No kernel patch: everything here is stock Linux, 5.19 or later (6.7 for all of
//! it; see *Kernel floor*).
//!
//! # Regions
//! Guest RAM is a set of private anonymous mappings: allocated by the backend
//! ([`LinuxMemory::add_region`]) or adopted from an embedder by address and length
//! ([`LinuxMemory::adopt_region`]). Each is registered with the backend's userfaultfd in
//! write-protect mode. [`LinuxMemory::region_ptr`] gives the base address: vCPUs and
//! device models read and write guest memory there directly, never through the backend.
//! Allocated regions get `MADV_NOHUGEPAGE`: a recycled or merged 4 KiB piece of a
//! transparent huge page is not freed until the kernel splits the huge page.
//!
//! # Write protection: synchronous userfaultfd write-protect
//! [`PageMemory::protect`] write-protects pages with `UFFDIO_WRITEPROTECT` (one call per
//! run of consecutive pages). A guest write to a protected page stops in the kernel and
//! is sent to the backend's **fault thread**, which takes the page's lock (so it waits for
//! at most the one merge that may hold it), removes the protection, records the write (the
//! page's generation moves on, so every token of it is stale) and wakes the writer, whose
//! write then lands in the page it sees. Nothing is lost and nothing waits for more than
//! one operation on that page. (The fault thread never blocks on that lock itself: it
//! tries it, and keeps a fault whose page is locked for a few microseconds later, reading
//! further messages meanwhile; see *Unmaps, discards and moves*.) Writes made by the kernel on the guest's behalf (KVM
//! faulting in guest pages, `read(2)` into guest memory) are handled the same way, so the
//! userfaultfd is created without `UFFD_USER_MODE_ONLY` where this process may: through
//! `/dev/userfaultfd` (Linux 6.1) if it has read-write access to it, else through
//! `userfaultfd(2)`, which allows kernel faults to root (`CAP_SYS_PTRACE`) or, with
//! `vm.unprivileged_userfaultfd = 1`, to anyone. A process without that privilege fails
//! with [`LinuxError::KernelFaultsDenied`], whose message says what will work: a VMM whose
//! vCPUs run under KVM needs kernel faults, and a silent fallback would turn KVM's first
//! write to every protected page into a failed `KVM_RUN`. An embedder that writes guest
//! memory from user space only turns [`LinuxConfig::kernel_faults`] off and gets a
//! user-mode-only userfaultfd, which any process may create (Linux 5.11): user-space
//! writes are handled as above, a write the kernel makes to a protected page fails with
//! `EFAULT`. [`LinuxConfig::require_kernel_faults`] off makes that fallback automatic;
//! [`LinuxCaps::kernel_faults`] says which the memory got.
//!
//! # Dirty tracking: what "written since the token" means here
//! Because every first write to a protected page goes through the fault thread,
//! [`PageMemory::written_since`] is exact and costs no system call: it compares the
//! token with the page's generation ([`DirtyTracking::UffdWriteProtect`]).
//! Checksums (KSM's way) only tell a merge candidate, not a safe merge, so they are no
//! fallback: without userfaultfd write-protect nothing is merged (see *Failures*).
//! `PAGEMAP_SCAN` does serve the backend, in the remap windows below and in accounting.
//!
//! # Asynchronous write-protect: why not (yet)
//! The synchronous round trip is what a guest pays on its first write after each
//! protection: 8–16 µs here against 2.5–6 µs for Linux KSM's copy-on-write break, and
//! no handler can do it much faster (*Costs*). Asynchronous write-protect
//! (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7: the kernel resolves the fault itself, only
//! clearing the page's write-protect bit, which `PAGEMAP_SCAN` reads back as "written")
//! costs a first write about 1–2.5 µs, 0.3–0.6× KSM's break. It cannot simply replace the
//! synchronous mode: a write could then land between a merge's comparison and its remap,
//! in the page the remap discards, and be lost. Nor can a mapping be asynchronous while
//! watched and synchronous only while a merge is in flight by switching userfaultfds:
//! asynchrony is a feature of the whole userfaultfd (fixed by `UFFDIO_API`), a mapping is
//! registered with at most one userfaultfd (`UFFDIO_REGISTER` fails with `EBUSY` on a
//! range another one holds), and unregistering a range clears the write protection of
//! every page in it (`userfaultfd_unregister`, `fs/userfaultfd.c`), so a switch would
//! lose what was watched and split mappings.
//!
//! It can be done on Linux 6.8 another way, with one asynchronous userfaultfd whose
//! ranges are registered in `MISSING` and write-protect mode: a merge moves the guest
//! page out to a scratch page with `UFFDIO_MOVE` (atomic, under the page-table lock),
//! which leaves the guest address empty, so a write there now waits as a `MISSING`
//! fault, which an asynchronous userfaultfd still delivers synchronously; the merge
//! compares the moved page (which nothing can change any more), then maps the store
//! page over the empty address (equal) or moves the page back (different), and wakes the
//! waiters. The `first_write` example prototypes this on a raw userfaultfd: watched first
//! writes took 1–2.5 µs, the window (move out, compare, move back) about 3 µs, and a
//! thread writing one page without pause while 14,000–22,000 windows per run opened and
//! closed on it lost no write (`docs/benchmarks.md`, "What the guest pays"). What the backend would have
//! to change, all of it outside the fault thread: every empty entry's first access,
//! reads too, becomes a round trip (`MISSING`), so dropped, recycled and never-touched
//! pages must map the zero page (`MADV_POPULATE_READ`) or be resolved with
//! `UFFDIO_ZEROPAGE`; `written_since` becomes a `PAGEMAP_SCAN` (a system call per batch
//! instead of 18 ns), and so does the dirty hook (no event per write); a write to a
//! merged page is broken by the kernel unseen, so slots are found free by scanning;
//! `UFFDIO_MOVE` moves only exclusive anonymous pages between anonymous mappings, so a
//! private copy inside a store mapping, or a pinned or shared page, cannot be moved out
//! and must be re-homed first or left unmerged; and the floor becomes Linux 6.8.
//!
//! A smaller step works on this kernel for merged pages alone: registered but not
//! write-protected, a merged page's first write would be the kernel's own copy-on-write
//! of a file page, as fast as KSM's break (measured by the same example), at the price
//! of learning of the break only by a `PAGEMAP_SCAN` (the page no longer maps the store):
//! its tokens, the dirty hook and the freeing of its slot would wait for that scan.
//!
//! # Merging: the canonical store
//! Canonical contents live once each in a memfd, the canonical store (layout and slot
//! lifetime: *The canonical store* below).
//! - [`PageMemory::canonicalize`] copies the protected page into a free store slot and
//!   maps that slot over the page with `MAP_PRIVATE | MAP_FIXED`: the page reads the same
//!   bytes, its own anonymous memory is freed, and the frame the engine keeps is the store
//!   page (read through a read-only view of the memfd).
//! - [`PageMemory::merge`] takes the duplicate's lock, checks its token (a write since
//!   then means [`MergeOutcome::Changed`]), compares the duplicate with the frame in full
//!   while the page is write-protected (a writer now waits in the fault thread), and maps
//!   the store page over it. A later write to a merged page is first seen by the fault
//!   thread, which breaks the sharing itself with `MADV_POPULATE_WRITE` (the kernel copies
//!   the page, as any copy-on-write) before waking the writer: the backend then knows for
//!   certain that the page no longer maps the store page, which may then be freed.
//! - A fresh mapping is not yet registered with userfaultfd: the backend registers it and
//!   write-protects it right after the remap. A write in that window of a few system calls
//!   is not lost (it lands in a private copy, as any copy-on-write), and the backend
//!   catches it afterwards by asking `PAGEMAP_SCAN` whether the page still maps the store
//!   (or, for the zero page, still maps the kernel's zero page); without `PAGEMAP_SCAN`
//!   (Linux before 6.7) it compares the page's contents instead. Such a write is counted
//!   in [`LinuxStats::window_writes`] and makes the page's tokens stale.
//! - Zero pages: merging with [`PageMemory::zero_frame`] drops the page with
//!   `MADV_DONTNEED` (the next read maps the kernel's zero page) and write-protects the
//!   empty entry (`UFFD_FEATURE_WP_UNPOPULATED`, 6.4; before, the zero page is faulted in
//!   first). A page that maps the store gets fresh anonymous memory mapped over it instead
//!   (`MADV_DONTNEED` on a private file mapping would bring the file's page back).
//!
//! # The canonical store
//! The memfd is sparse: a page of it uses memory only once written, so offsets are free.
//! Each region gets a *home*, a run of store slots as long as the region: page `i`, when
//! it becomes canonical, goes to home slot `home + i` if that slot is free (else to the
//! overflow area, in order). Consecutive canonical pages of a region so sit at consecutive
//! offsets, and so do the pages merged with them when duplicates are laid out in the same
//! order (VMs booted from one image): their mappings are contiguous in address and in
//! file offset, and the kernel joins them into one VMA. A slot is held by the engine's
//! frames ([`LinuxFrame`]) and by every page whose entry may still map it; when the last
//! holder lets go, the slot is punched out of the memfd (`fallocate(PUNCH_HOLE)`, the
//! memory goes back to the system) and is free again. A page lets go only when it is
//! certain not to map the slot any more (the fault thread completes copy-on-write breaks
//! itself for that reason): punching a page still mapped would change what it reads.
//! Frames are read through one read-only shared view of the whole memfd.
//!
//! A store can also be shared by several processes ([`shared`]): a service owns it
//! ([`shared::SharedStore`]) and the VMMs' memories are linked to it
//! ([`LinuxMemory::with_linked_store`]); the service then chooses the slots
//! ([`LinuxMemory::canonicalize_at`], [`LinuxMemory::frame_at`]), each VMM reports the
//! holds its pages take and let go, and only the service punches. Everything else above
//! holds unchanged in each VMM.
//!
//! # Recycling and unmerging
//! [`PageMemory::recycle`] is `MADV_DONTNEED` (runs of pages in one call), or a fresh
//! anonymous mapping over a page that maps the store. [`PageMemory::unmerge`] breaks the
//! sharing with `MADV_POPULATE_WRITE`, which gives the page a private copy (a zero-merged
//! page gets a private zero page). The page stays inside a mapping of the store, which is
//! harmless while the backend manages it (it never drops such a page with
//! `MADV_DONTNEED`); when an adopted region is given back ([`LinuxMemory::remove_region`],
//! drop), every run of such pages is copied into fresh anonymous memory and moved over the
//! run with `mremap`, atomically, so the embedder gets plain anonymous memory back.
//!
//! # The map-count limit
//! Every store mapping that does not coalesce with its neighbours is a VMA, and a
//! process may have at most `vm.max_map_count` of them (65,530 by default); past it,
//! `mmap` fails and so would the VMM's own allocations. Canonical pages are laid out so
//! that runs of duplicates map consecutive store offsets and coalesce into one VMA (see
//! *The canonical store*), but random sharing still costs up to two VMAs per
//! merged page. The backend keeps an upper bound of the mappings it may have added,
//! recounts `/proc/self/maps` when the bound nears the limit, and stops merging
//! [`LinuxConfig::map_count_reserve`] mappings short of it: such a merge returns
//! [`PageError::MapCountLimit`] and is counted in [`LinuxStats::map_limit_refusals`].
//! Raise the limit with `sysctl -w vm.max_map_count=1048576` (or a file in
//! `/etc/sysctl.d/`); the backend rereads it at every recount, so it takes effect at
//! once. Each VMA costs the kernel about 200 bytes.
//!
//! Zero pages interleaved with merged runs cost mappings too: a zero-merged page keeps its
//! anonymous mapping, between two store mappings.
//!
//! # Costs (measured on the project's 2-core Linux 6.18 VM, release build)
//! `written_since` 18 ns; `protect` 0.2–0.5 µs per page (one call per run); `read_page`
//! 3.7–4.7 µs (`process_vm_readv`, and the two checks that the page is still the
//! region's, about 1 µs each: *Unmaps, discards and moves*; `read_pages` does a run with
//! one read and two checks); `canonicalize` and `merge` 22–29 µs per page one call at a
//! time with [`LinuxConfig::own_event_spin`] on (about 10 µs more by default, off), most
//! of it the kernel's `mmap(MAP_FIXED)`
//! (splitting and joining mappings, freeing the old page with a TLB flush), the round
//! trip to the fault thread that its unmap event costs, and the userfaultfd
//! register/protect calls that follow; `recycle` of one private page 22–25 µs (the drop's
//! event round trip, and the pin check); `unmerge` 4–6 µs; the pin check of each
//! protect, recycle or discard call about 5–7 µs (*Pins*). Before the unmap events, the
//! per-operation checks and the pin checks, a single-page merge took 10–16 µs, a
//! single-page recycle 2–4 µs and `read_page` 1.5–2.3 µs (measured side by side on the
//! same machine, under the load of other builds, so roughly; [`LinuxConfig::events`]
//! and [`LinuxConfig::pin_check`] turn the dearer parts off, at the price they say). A
//! guest's first write to a protected page waits 8–10 µs (median) for the fault thread
//! when writes come back to back, 11–16 µs when they come one at a time (the thread was
//! asleep), 12–27 µs on a merged page (the copy included; *Side channels*); Linux KSM's
//! copy-on-write break takes 2.5–3.5 µs and 3.4–6 µs, so ours is 2.4–4× KSM's. That is the
//! synchronous round trip itself, not the fault thread's work: a raw userfaultfd whose
//! handler only polls, reads and removes the protection takes 8–9 and 13–17 µs on the same
//! machine, in the same runs (the `first_write` example, `docs/benchmarks.md`, "What the
//! guest pays"). On this VM most of it is waking threads whose vCPU halted; a fault
//! thread that keeps polling ([`LinuxConfig::fault_spin`]) did not help (the writer's
//! vCPU halts too). Under load the tail is the scheduler's: the fault thread waits for a
//! CPU (99th percentile in milliseconds when other processes kept both cores busy),
//! where KSM's break runs in the writer's own context. The fault thread spends 5–18 µs
//! of CPU per fault. With one fault thread, a write may also wait for the faults queued
//! before it ([`LinuxConfig::fault_threads`]). Only asynchronous write-protect would
//! bring a first write below KSM's (see *Asynchronous write-protect*).
//!
//! # Batches: runs of pages with one system call each
//! Those per-page costs are mostly fixed costs of the calls, so
//! [`PageMemory::canonicalize_batch`] and [`PageMemory::merge_batch`] work on runs: a run
//! of consecutive pages of one region (at most [`LinuxConfig::max_run_pages`], default 64)
//! is locked together and read with one `process_vm_readv` to compare it; pages going to
//! consecutive store slots (canonical pages go to their home slots, so the duplicates of a
//! run of canonical pages laid out in the same order do too) are copied into the store
//! with one `pwrite` and mapped with one `mmap`, then registered, write-protected and
//! checked for window writes (`PAGEMAP_SCAN`) with one call each. Pages of a run that
//! are stale, differ or already merged only split it. PageONE calls them per chunk: its
//! merge passes then cost about 6–7 µs of CPU per page on this machine, against about
//! 15 µs page by page (`docs/benchmarks.md`, "PageONE vs Linux KSM on real memory").
//! A writer to a page of a run waits for that run, at most `max_run_pages` pages.
//!
//! # Accounting
//! [`LinuxMemory::usage`] reads the real figures: `Rss`, `Pss`, `Anonymous` and `Swap`
//! of the regions' mappings from `/proc/self/smaps`, the memory the store holds from the
//! memfd's allocated blocks, and (with `PAGEMAP_SCAN`) a page-by-page census of what each
//! guest page maps. The memory guest RAM really uses is the regions' anonymous memory
//! plus the store ([`LinuxUsage::total_bytes`]); `Rss` counts a store page once per
//! mapping, as it does for KSM pages.
//!
//! # Kernel floor
//! [`LinuxMemory::new`] probes every kernel feature the backend relies on, on probe pages
//! of its own, and reports each in [`LinuxCaps`]:
//!
//! | feature ([`KernelFeature`]) | Linux | needed for | without it |
//! | --- | --- | --- | --- |
//! | userfaultfd | 4.3 | the fault thread | error |
//! | `UFFD_USER_MODE_ONLY` | 5.11 | a userfaultfd without privilege for kernel faults | error (unprivileged only) |
//! | write-protect on anonymous memory | 5.7 | protecting guest pages | error |
//! | `MADV_POPULATE_WRITE` | 5.14 | breaking a merged page's sharing (fault thread, `unmerge`) | error |
//! | write-protect on shmem (a private mapping of a memfd) | 5.19 | protecting merged pages, which map the store, so that their copy-on-write breaks are seen | error |
//! | `UFFD_FEATURE_WP_UNPOPULATED` | 6.4 | protecting empty entries | the zero page is faulted in first |
//! | `PAGEMAP_SCAN` | 6.7 | remap-window checks, the page census | the page is read back and compared; no census |
//!
//! The floor is therefore **Linux 5.19** (with `CONFIG_USERFAULTFD` and, for shmem
//! write-protect, `CONFIG_PTE_MARKER_UFFD_WP`), on an architecture with userfaultfd
//! write-protect (x86-64 among others); 6.7 has everything. The `/dev/userfaultfd` device
//! is 6.1.
//!
//! # Failures
//! Nothing panics. A kernel that lacks a required feature (or a seccomp filter that
//! denies userfaultfd): [`LinuxMemory::new`] fails with a [`LinuxError`] that names the
//! feature, the Linux version that has it and what to do (a `LinuxError` converts into a
//! [`PageError::Unsupported`]), unless
//! [`LinuxConfig::require_userfaultfd`] is off, in which case the memory works without
//! protection: `protect` fails with `Unsupported` for every page (an engine then merges
//! nothing and keeps running), `recycle` and the accounting still work
//! ([`DirtyTracking::Unavailable`]). A failed system call is [`PageError::Os`] with the
//! call and errno (`ENOMEM` included), for the page it concerns alone: a remapped page
//! that cannot be registered or write-protected gets no token (it is unprotected, its
//! tokens stale; [`LinuxStats::settle_failures`]) and is protected again by the next
//! `protect` that succeeds on it. A region is taken for unmapped only on proof: the fault
//! thread's unmap events (*Unmaps, discards and moves*), or `/proc/self/maps` showing a
//! hole or a foreign mapping in its range after a call failed with an error that means
//! "not mapped" (`ENOENT`, `EFAULT`); every later operation on it then fails with
//! [`PageError::Unmapped`]. Guest memory is only ever read through `process_vm_readv`
//! and `pwrite`, which fail with `EFAULT` instead of faulting the process.
//!
//! # Unmaps, discards and moves: userfaultfd's non-cooperative events
//! The userfaultfd is opened with `UFFD_FEATURE_EVENT_UNMAP`, `UFFD_FEATURE_EVENT_REMOVE`
//! and `UFFD_FEATURE_EVENT_REMAP` ([`LinuxCaps::events`]; [`LinuxConfig::events`] says
//! what turning them off costs and saves), so the fault thread hears of
//! every `munmap` of guest memory (and every `mmap(MAP_FIXED)` or `mremap` that replaces
//! some), every `MADV_DONTNEED` / `MADV_REMOVE` of it, and every `mremap` that moves it.
//! What the kernel does (read in its source, `fs/userfaultfd.c`, `mm/madvise.c`,
//! `mm/mmap.c`, `mm/mremap.c`; the holding of `munmap` and `MADV_DONTNEED` callers is
//! also checked on the running kernel by
//! `the_kernel_holds_unmappers_and_droppers_until_their_event_is_read`):
//! - **The caller waits for the read.** Each event is queued and the thread that caused
//!   it sleeps (`userfaultfd_event_wait_completion`) until a reader has `read(2)` the
//!   message: for `UNMAP` (`munmap`, and `mmap(MAP_FIXED)` or `mremap` over registered
//!   memory) *after* the range is gone and the mmap lock dropped; for `REMOVE` *before*
//!   the pages are dropped (the lock is dropped for the wait and taken again to drop
//!   them); for `REMAP` after the move. So when the owner's `munmap` returns, the fault
//!   thread has read the event; but another thread of the process may already have
//!   mapped something at the freed address (it is free as soon as the mmap lock is
//!   dropped, before the event is even queued).
//! - **`EAGAIN` while an event is unread.** `UFFDIO_WRITEPROTECT` fails with `EAGAIN`
//!   from the moment such a change starts until its event is read (`mmap_changing`).
//!   Operations try again (for at most 2 s); the fault thread, which is the reader, never
//!   does: it keeps such work for later.
//! - **The backend's own remaps raise events too.** Every `mmap(MAP_FIXED)` of a merge,
//!   every `MADV_DONTNEED` of a recycle and the `mremap` that gives a region back raise
//!   `UNMAP` or `REMOVE` events, and their callers hold page locks while the kernel holds
//!   them until the event is read. (That round trip is what the events cost: measured
//!   here, a single-page merge takes 22–29 µs instead of 10–16 µs, a single-page recycle
//!   21–25 µs instead of 2–4 µs, of which about 5 µs is the pin check, when the fault
//!   threads poll without sleeping while such a call is under way; 31–43 µs and 31–35 µs
//!   when they sleep, as they do by default, since polling costs about as much CPU as
//!   the call lasts ([`LinuxConfig::own_event_spin`]); batches pay it once per run.) The fault thread therefore never waits for a page lock
//!   (it keeps a fault or an event whose page is locked, in order, and tries again within
//!   20 µs or after its next read), and each own remap is counted on its pages
//!   beforehand, so that the fault thread takes its event off the count instead of taking
//!   it for the owner's.
//!
//! What the fault thread does with the owner's events:
//! - `UNMAP`: the pages are **gone** (their slots let go); a region whose pages are all
//!   gone is unmapped ([`LinuxStats::foreign_unmaps`]). Every operation on a gone page
//!   fails with [`PageError::Unmapped`] without a system call.
//! - `REMAP`: the pages are gone at their old address, and the range at its new address
//!   is unregistered (it keeps the registration across the move, and a write there would
//!   otherwise wait for a fault thread that no longer knows it). Its store pages keep
//!   their slots for the life of the process (never freed: the moved memory may still
//!   map them, and must keep reading the same; [`LinuxStats::foreign_remaps`]).
//! - `REMOVE`: the pages' contents are being dropped without a write fault, and dropped
//!   anonymous memory loses its write protection: the pages are unprotected and their
//!   tokens stale ([`LinuxStats::foreign_removes`]); see *Discards*.
//!
//! **Every operation proves that the page is still the region's before it touches it.**
//! The events alone cannot keep the backend off a new occupant (they are applied a few
//! microseconds after the change, and a new mapping can take the address before that),
//! so under the page's lock, right before it reads (`process_vm_readv`, `pwrite` into
//! the store), drops (`MADV_DONTNEED`) or remaps (`mmap(MAP_FIXED)`, `mremap`) guest
//! memory, an operation checks that the page is not known gone and that the kernel still
//! has its range registered with this userfaultfd: a `UFFDIO_WRITEPROTECT` that leaves
//! the page's protection as it is, and fails with `ENOENT` where the mapping is not
//! registered. A mapping that took the address is never registered (only the backend
//! registers, under the page's lock). `protect` re-protects pages that are already
//! protected for the same reason. Reads are checked before and after the copy, and the
//! bytes are returned only if both checks pass.
//!
//! What is guaranteed, and what is not:
//! - Guaranteed: once the owner's `munmap`, `mremap` or `mmap(MAP_FIXED)` over guest
//!   memory has returned, no later operation reads, drops or remaps the new occupant of
//!   the address: each fails ([`PageError::Unmapped`], or [`PageError::Os`] with `ENOENT`
//!   until the event is applied; a merge whose token a failed `protect` made stale
//!   reports `Changed`). Bytes returned by `read_page` and `read_words` were the
//!   region's. Tested with a new mapping taking the address at once
//!   (`a_new_mapping_at_an_unmapped_regions_address_is_never_read_nor_zeroed`), one page
//!   unmapped (`one_page_unmapped_by_its_owner_is_gone_alone`), a region moved
//!   (`a_region_moved_by_its_owner_is_gone_and_the_moved_memory_works`).
//! - Not guaranteed: an unmap that *races* an operation on the same page. Between the
//!   check and the system call that follows it (about a microsecond) the owner may unmap
//!   the range and another thread map something at the address; a drop or remap then
//!   hits the newcomer (reads cannot leak: their second check fails). No system call lets
//!   user space check and remap atomically; the cure is the contract: remove a region
//!   ([`LinuxMemory::remove_region`]) before unmapping it.
//! - An `mremap` of *other* registered guest memory onto a region's address would pass
//!   the check (it is registered): not supported.
//! - A page whose fresh mapping could not be registered (a settle failure) is checked
//!   against `/proc/self/maps` instead (it must be anonymous or store memory), which
//!   cannot tell an embedder's anonymous mapping from the backend's.
//!
//! # Discards
//! [`LinuxMemory::discard`] is the way for a balloon device or free-page reporting to
//! give guest pages back: afterwards every page reads zeros, whatever it was (its own
//! memory is dropped; a page that maps the store gets fresh anonymous memory and lets go
//! of its slot), its tokens are stale, and the dirty hook hears of it. A pinned page is
//! refused.
//!
//! An embedder may still drop guest pages itself (`MADV_DONTNEED`, as Firecracker's and
//! Cloud Hypervisor's balloons do). A page of its own anonymous memory then reads zeros.
//! A page that lies in a private mapping of the store (merged, canonical, or with a
//! private copy made by a write since) reads the store at its offset again. The rule that
//! keeps that safe: **a store offset is never handed out again while any guest page lies
//! in a mapping of it** (the page holds the offset, its *tomb*, until it is remapped to
//! anonymous memory, given back or unmapped), and the store's contents at an offset
//! never change while they are held. So the page reads either the contents it was merged
//! with (its own, older contents) or, once those are let go (punched out), zeros; never
//! another page's contents, never another trust domain's
//! (`an_embedders_dontneed_never_shows_another_domains_bytes`, which fails without the
//! rule). Its tokens are stale once the `REMOVE` event is applied. Offsets held this way
//! cost address space in the sparse store, not memory. (One store serves all trust
//! domains: with this rule a store per domain would protect nothing more.)
//!
//! Not guaranteed: the owner's `MADV_DONTNEED` drops the pages *after* the `REMOVE`
//! event was read (microseconds later). If `protect` re-protects the page in between,
//! the drop then takes that protection away without a fault, and `written_since` does
//! not report the drop (the page reads zeros, or its merged contents, under a token that
//! says "unchanged"). No write is lost to that: every merge and canonicalization
//! re-protects the page (the check above) right before it reads and remaps it, and
//! compares or copies what the page holds then. What remains is the drop landing in the
//! microsecond between that check and the remap, with a guest write right after it: the
//! write would land in the dropped page's replacement and be remapped away. Use
//! [`LinuxMemory::discard`].
//!
//! # Pins
//! A page something pins by its physical page (VFIO DMA maps, io_uring fixed buffers,
//! vhost, RDMA: `FOLL_LONGTERM` pins) must never be merged or recycled: a write through
//! the pin lands in the physical page whatever the page tables say, so after a remap it
//! lands in a page the guest no longer maps and is lost, and on a protected page it
//! bypasses the protection (the token stays valid). KSM skips pages with extra
//! references; user space cannot see reference counts. The backend therefore:
//! - excludes the ranges the embedder declares ([`LinuxMemory::declare_pinned`]; by guest
//!   address through [`VmMemoryAdapter`](crate::vmm::VmMemoryAdapter)): never protected,
//!   merged, canonicalized, recycled or discarded ([`PageError::Pinned`], counted in
//!   [`LinuxStats::pin_refusals`]); declaring removes the pages' protection and stales
//!   their tokens;
//! - watches what the kernel does count, `VmPin` (io_uring, RDMA, vhost-vdpa) and
//!   `VmLck` (VFIO type 1, `mlock`) of `/proc/self/status`, once per `protect`,
//!   `recycle` and `discard` call (and after each declaration): when they exceed their
//!   values when the memory was made plus the declared pages, **every** such call, and
//!   every `merge` and `canonicalize` (single or batch, which go by the last check), is
//!   refused ([`PageError::Pinned`]) until the embedder declares the ranges or
//!   acknowledges that the memory is not guest memory ([`LinuxMemory::acknowledge_pins`]);
//!   reported in [`LinuxStats::undeclared_pinned_bytes`], [`LinuxStats::pin_alarms`],
//!   [`LinuxUsage::process_pinned`] and [`LinuxUsage::process_locked`]. The check is one
//!   `pread` of `/proc/self/status` per call (about 7 µs, measured as above);
//!   [`LinuxConfig::pin_check`] turns it off.
//! - A pin taken for writing on a protected or merged page is also a write fault
//!   (`FOLL_WRITE` goes through the page tables once), which the fault thread resolves:
//!   the page's token dies, so a merge of it sees `Changed`. That is why merges need not
//!   read `/proc/self/status` themselves: a page whose token is still valid was not
//!   pinned for writing since its `protect`, which checked.
//!
//! Not covered: memory pinned before the `LinuxMemory` was made (it is in the baseline:
//! declare it); a pin taken between a call's check and its remap (microseconds); a
//! read-only pin (no write fault) taken after the page was protected and before the next
//! check; pins no counter shows. Tested with an io_uring fixed buffer over a guest page
//! (`tests/linux_pins.rs`: merges refused while the pin is undeclared, only that page
//! once declared, and a `READ_FIXED` write through the pin lands in the guest page).
//!
//! # Side channels
//! A guest's first write to a page is slower when the page is protected (a round trip to
//! the fault thread) and slower still when it is merged (the fault thread makes the
//! copy-on-write break): a guest that times its writes can tell whether a page of its own
//! was merged, hence that some VM **of the same trust domain** held the same contents
//! (pages of different domains are never merged, so nothing crosses domains). Measured
//! on this project's 2-core Linux 6.18 VM, release build, one fault thread
//! (`tests/linux_timing.rs`, medians over 400 pages, three runs):
//!
//! | first write to | median | 90th percentile |
//! | --- | --- | --- |
//! | an unprotected page | 0.03 µs | 0.03–0.15 µs |
//! | a protected page | 7.7–10.2 µs | 8.4–11.5 µs |
//! | a merged page | 13.4–16.5 µs | 14.4–18.6 µs |
//!
//! (Under a heavy load of other processes on the same 2 cores a run gave 48 and 58 µs:
//! the fault thread waits for a CPU. The issue that asked for this measured 15 and
//! 24 µs.) The merged-minus-protected gap, about 6 µs, is what tells a merged page from
//! a page that is only protected; protected-minus-unprotected, about 8 µs, tells that
//! the page was protected at all (a scan is under way).
//!
//! Knobs that narrow it: trust domains ([`DomainId`](crate::DomainId) per VM or per
//! tenant) remove it between VMs that must not learn of each other; merging only pages
//! that stayed unwritten for long (PageONE's stable periods) makes timed first writes to
//! merged pages rare; merging zero pages only reveals nothing (every guest has them);
//! more fault threads ([`LinuxConfig::fault_threads`]) cut the queueing part of the
//! delay, not the copy. The difference itself cannot be hidden without slowing every
//! write.
//!
//! # The embedder's contract
//! Everything an embedder must keep, and what happens when it does not:
//! - **Regions stay mapped until removed.** Unmap, move or replace guest memory only
//!   after [`LinuxMemory::remove_region`] (or the memory's drop) returned. Otherwise the
//!   backend learns of it (events and checks above) and fails every operation on those
//!   pages ([`PageError::Unmapped`]); an unmap racing an operation on the same page can
//!   still have a new mapping at the address dropped or remapped.
//! - **No other page-table changes.** Do not `mprotect`, `madvise` (`MADV_DONTNEED`
//!   aside: *Discards*), `mremap` guest memory, nor register it with another
//!   userfaultfd. Otherwise: an `mprotect` makes operations on those pages fail; another
//!   userfaultfd's registration makes the checks pass for memory the backend does not
//!   own.
//! - **Discard through [`LinuxMemory::discard`].** A raw `MADV_DONTNEED` is safe (zeros
//!   or the page's own older contents, never another's) but leaves a merged page reading
//!   old contents, may go unreported by `written_since`, and one landing within the
//!   microsecond before a merge's remap of the same page can lose a guest write made
//!   right after it (above).
//! - **Declare pins** ([`LinuxMemory::declare_pinned`]) before pinning guest memory.
//!   Otherwise the backend stops protecting, merging and recycling altogether while it
//!   sees undeclared pins; a pin it cannot see (taken before the memory was made, or
//!   read-only between checks) can lose DMA writes, or serve a device stale contents,
//!   after a merge.
//! - **Kernel faults for KVM.** vCPUs under KVM, and every kernel write into guest memory
//!   (`read(2)`, vhost), need [`LinuxConfig::kernel_faults`]. Otherwise such a write to a
//!   protected page fails with `EFAULT`.
//! - **No `fork` while guest memory is in use.** A child gets copies of the mappings:
//!   its merged pages map the store privately and see it change as the parent's store
//!   does (an offset is reused once the parent lets go of it, so a child's
//!   `MADV_DONTNEED` can read another domain's later contents), and its writes are not
//!   tracked (registrations are not inherited). `posix_spawn` or `vfork` + `exec` are
//!   fine.
//! - **Not supported:** hugetlbfs or shared guest memory (only private anonymous memory
//!   is adopted), more than one `LinuxMemory` over the same memory, guest memory of
//!   another process.
//!
//! # Source layout
//! `config` ([`LinuxConfig`]), `caps` ([`LinuxCaps`]), `stats` ([`LinuxStats`],
//! [`LinuxUsage`]), `error` ([`LinuxError`], [`KernelFeature`]), `probe` (the kernel
//! floor), `region` (regions and their life cycle), `remap` (remapping pages and settling
//! fresh mappings), `runs` (batches), `fault` (the fault threads), `map_guard` (the
//! map-count limit), `pins` (declared and detected pins), `store` (the canonical store,
//! slots and tombs), `contract` (the [`PageMemory`] implementation), and `sys`, which holds every raw system call (`sys::uffd`: the
//! userfaultfd definitions, without bindgen).

mod caps;
mod config;
mod contract;
mod error;
mod fault;
mod follow;
mod linked;
mod map_guard;
mod pins;
mod probe;
mod region;
mod remap;
mod runs;
pub mod shared;
mod stats;
mod store;
mod sys;
#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod test_util;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::{DirtyHook, PageError, PageId, RegionId};
#[cfg(doc)]
use crate::{MergeOutcome, PageMemory};

pub use caps::{DirtyTracking, LinuxCaps, WindowCheck};
pub use config::LinuxConfig;
pub use error::{KernelFeature, LinuxError};
pub use region::Backing;
pub use stats::{LinuxStats, LinuxUsage, PageCensus};
pub use store::LinuxFrame;
pub use sys::uffd::UffdSource;

use fault::FaultThreads;
use map_guard::MapGuard;
use pins::PinWatch;
use region::{Kind, Region};
use stats::{census, Counters};
use store::Store;
use sys::uffd::Uffd;

/// The state the fault threads share with the memory.
struct Inner {
    uffd: Option<Uffd>,
    caps: LinuxCaps,
    config: LinuxConfig,
    pid: i32,
    regions: RwLock<Vec<Arc<Region>>>,
    /// The canonical store (replaced only by [`LinuxMemory::relink_store`]).
    store: RwLock<Arc<Store>>,
    /// `/proc/self/pagemap`, for `PAGEMAP_SCAN`.
    pagemap: Option<OwnedFd>,
    guard: MapGuard,
    pins: PinWatch,
    /// The backend's own remaps and drops under way that raise an event: while there
    /// are any, the fault threads poll without sleeping if `own_event_spin` is on, so that
    /// the kernel, which holds the caller until its event is read, lets it go at once.
    own_in_flight: std::sync::atomic::AtomicUsize,
    /// Where the fault threads run while a batch of remaps is under way.
    follow: follow::Follow,
    hook: RwLock<Option<DirtyHook>>,
    counters: Counters,
}

/// Guest memory of this process for the engines; see the module docs.
///
/// ```no_run
/// use page_memory::linux::LinuxMemory;
/// use page_memory::{DomainId, MergeOutcome, PageId, PageMemory};
///
/// let mem = LinuxMemory::new().expect("userfaultfd write-protect");
/// let r = mem.add_region(2, DomainId(0)).unwrap();
/// let base = mem.region_ptr(r).unwrap();
/// // SAFETY: the region is two pages of memory this process owns.
/// unsafe { std::ptr::write_bytes(base, 7, 2 * 4096) };
/// let (a, b) = (PageId::new(r, 0), PageId::new(r, 1));
/// let t = mem.protect(&[a, b]);
/// let canon = mem.canonicalize(a, t[0].clone().unwrap()).unwrap();
/// assert_eq!(mem.merge(b, t[1].clone().unwrap(), &canon).unwrap(), MergeOutcome::Merged);
/// ```
pub struct LinuxMemory {
    inner: Arc<Inner>,
    /// Stopped (and joined) when dropped, after `drop` retired the regions.
    faults: Option<FaultThreads>,
}

impl std::fmt::Debug for LinuxMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxMemory")
            .field("regions", &self.live_regions().len())
            .field("dirty_tracking", &self.dirty_tracking())
            .field(
                "fault_threads",
                &self.faults.as_ref().map_or(0, |f| f.len()),
            )
            .field("caps", &self.inner.caps)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// The message of every protect-type operation when there is no userfaultfd.
const NO_UFFD: &str =
    "userfaultfd write-protect is unavailable (see LinuxMemory::caps for why): pages cannot be protected or merged";

impl LinuxMemory {
    /// A memory with the default [`LinuxConfig`] (userfaultfd write-protect required).
    pub fn new() -> Result<LinuxMemory, LinuxError> {
        Self::with_config(LinuxConfig::default())
    }

    /// A memory set up by `config`, with no regions; probes the kernel (see
    /// [`KernelFeature`]) and starts the fault thread(s). Fails with
    /// [`LinuxError::Missing`] where the kernel lacks a feature the backend needs (unless
    /// [`LinuxConfig::require_userfaultfd`] is off).
    pub fn with_config(config: LinuxConfig) -> Result<LinuxMemory, LinuxError> {
        let store = Store::new(config.home_slots)?;
        Self::with_store(config, store)
    }

    /// The memory over `store`, probed and with its fault threads started.
    fn with_store(config: LinuxConfig, store: Arc<Store>) -> Result<LinuxMemory, LinuxError> {
        let guard = MapGuard::new(config.map_count_reserve);
        let probe::Kernel {
            uffd,
            pagemap,
            caps,
        } = probe::probe(&config, guard.limit.load(Ordering::Relaxed))?;
        let inner = Arc::new(Inner {
            uffd,
            caps,
            pid: std::process::id() as i32,
            regions: RwLock::new(Vec::new()),
            store: RwLock::new(store),
            pagemap,
            guard,
            pins: PinWatch::new(),
            own_in_flight: std::sync::atomic::AtomicUsize::new(0),
            follow: follow::Follow::default(),
            hook: RwLock::new(None),
            counters: Counters::default(),
            config,
        });
        let faults = match inner.uffd {
            Some(_) => Some(FaultThreads::start(&inner)?),
            None => None,
        };
        Ok(LinuxMemory { inner, faults })
    }

    /// The thread ids of the fault threads that have started (each registers as it
    /// starts, so right after [`new`](Self::new) the list may still be short): for an
    /// embedder's placement of them (priority, cgroups, affinity). With
    /// [`LinuxConfig::fault_threads_follow`] the backend narrows their CPU affinity while a
    /// batch of its own remaps is under way and puts back the affinity they had when the
    /// batch began: an affinity the embedder sets between batches stays.
    pub fn fault_thread_ids(&self) -> Vec<i32> {
        self.inner.follow.thread_ids()
    }

    /// What the kernel offered.
    pub fn caps(&self) -> &LinuxCaps {
        &self.inner.caps
    }

    /// How writes to protected pages are tracked.
    pub fn dirty_tracking(&self) -> DirtyTracking {
        if self.inner.uffd.is_some() {
            DirtyTracking::UffdWriteProtect
        } else {
            DirtyTracking::Unavailable
        }
    }

    /// How writes in a remap's window are caught.
    pub fn window_check(&self) -> WindowCheck {
        if self.inner.pagemap.is_some() {
            WindowCheck::PagemapScan
        } else {
            WindowCheck::Contents
        }
    }

    /// The base address of region `id`: guest memory, to be read and written directly.
    pub fn region_ptr(&self, id: RegionId) -> Result<*mut u8, PageError> {
        let r = self.inner.live_region(id)?;
        Ok(r.base as *mut u8)
    }

    /// The address of `page`.
    pub fn page_ptr(&self, page: PageId) -> Result<*mut u8, PageError> {
        let r = self.inner.live_region(page.region)?;
        if page.index >= r.info.pages {
            return Err(PageError::NoSuchPage(page));
        }
        Ok(r.addr(page.index) as *mut u8)
    }

    /// What `page` is backed by now.
    pub fn backing(&self, page: PageId) -> Result<Backing, PageError> {
        self.inner.with_page(page, |_, _, s| {
            Ok(match s.kind {
                Kind::Anon => Backing::Private,
                Kind::Zero => Backing::Zero,
                Kind::Store => Backing::Store {
                    offset: s.slot().map_or(0, |x| x.offset()),
                },
                Kind::StoreCow => Backing::PrivateCopy,
            })
        })
    }

    /// Whether `page` is protected (for the engine).
    pub fn is_protected(&self, page: PageId) -> Result<bool, PageError> {
        self.inner.with_page(page, |_, _, s| Ok(s.protected()))
    }

    /// Whether `a` and `b` map the same page of the canonical store.
    pub fn shares_frame(&self, a: PageId, b: PageId) -> Result<bool, PageError> {
        let slot = |p| {
            self.inner.with_page(p, |_, _, s| {
                Ok(match (s.kind, s.slot()) {
                    (Kind::Store, Some(x)) => Some(x.index()),
                    _ => None,
                })
            })
        };
        Ok(matches!((slot(a)?, slot(b)?), (Some(x), Some(y)) if x == y))
    }

    /// Discards `pages` for the embedder (a balloon device inflating, free-page
    /// reporting): afterwards each reads as zeros, whatever it mapped before. A page of
    /// its own anonymous memory is dropped (`MADV_DONTNEED`, runs of pages in one call);
    /// a page that maps the canonical store (merged, canonical, or a private copy inside
    /// a store mapping) gets fresh anonymous memory mapped over it, and lets go of its
    /// store slot. Its tokens become stale, and the dirty hook hears of it (its contents
    /// changed). One result per page, in order; a page that is gone, or (see *Pins*)
    /// pinned, is refused and left as it is.
    ///
    /// Use this rather than `MADV_DONTNEED` on guest memory: the embedder's own
    /// `MADV_DONTNEED` is safe (see *Discards* in the module docs) but leaves a page that
    /// maps the store reading its old contents rather than zeros.
    pub fn discard(&self, pages: &[PageId]) -> Vec<Result<(), PageError>> {
        if let Err(refused) = self.inner.pins_checked(pages) {
            return refused;
        }
        let mut out = Vec::with_capacity(pages.len());
        for run in crate::consecutive_runs(pages) {
            let start = out.len();
            self.inner.recycle_run(run, &mut out, true);
            // Their contents changed: a live migration must send them again.
            for (p, r) in run.iter().zip(&out[start..]) {
                if r.is_ok() {
                    self.inner.dirty(*p);
                }
            }
        }
        out
    }

    /// Counters since the start.
    pub fn stats(&self) -> LinuxStats {
        let i = &self.inner;
        let c = &i.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let store = i.store();
        LinuxStats {
            write_faults: g(&c.write_faults),
            cow_breaks: g(&c.cow_breaks),
            canonicalized: g(&c.canonicalized),
            merges: g(&c.merges),
            zero_merges: g(&c.zero_merges),
            recycled: g(&c.recycled),
            unmerged: g(&c.unmerged),
            window_writes: g(&c.window_writes),
            settle_failures: g(&c.settle_failures),
            discarded: g(&c.discarded),
            pin_alarms: g(&i.pins.alarms),
            pin_refusals: g(&i.pins.refusals),
            undeclared_pinned_bytes: g(&i.pins.undeclared),
            declared_pinned_pages: g(&i.pins.declared_pages),
            foreign_unmaps: g(&c.foreign_unmaps),
            foreign_removes: g(&c.foreign_removes),
            foreign_remaps: g(&c.foreign_remaps),
            map_limit_refusals: g(&i.guard.refusals),
            map_recounts: g(&i.guard.recounts),
            mappings_counted: g(&i.guard.counted),
            max_map_count: g(&i.guard.limit),
            store_slots: g(&store.live),
            store_punched: g(&store.punched),
            store_punch_errors: g(&store.punch_errors),
        }
    }

    /// The real memory the regions and the store use now (reads `/proc/self/smaps`: a
    /// few milliseconds per thousand mappings).
    pub fn usage(&self) -> Result<LinuxUsage, PageError> {
        let ranges: Vec<(usize, usize)> = self
            .live_regions()
            .iter()
            .filter(|r| !r.unmapped.load(Ordering::Relaxed))
            .map(|r| (r.base, r.base + r.len()))
            .collect();
        let t = sys::smaps_totals(&ranges).map_err(|e| PageError::Os {
            op: "read /proc/self/smaps",
            errno: e.raw_os_error().unwrap_or(libc::EIO),
        })?;
        let pins = sys::pinned_and_locked().unwrap_or((0, 0));
        let census = match &self.inner.pagemap {
            Some(fd) => Some(census(fd.as_fd(), &ranges)?),
            None => None,
        };
        Ok(LinuxUsage {
            region_rss: t.rss,
            region_pss: t.pss,
            region_anonymous: t.anonymous,
            region_swap: t.swap,
            region_mappings: t.mappings,
            store_bytes: self.inner.store().bytes()?,
            census,
            process_pinned: pins.0,
            process_locked: pins.1,
        })
    }

    fn live_regions(&self) -> Vec<Arc<Region>> {
        self.inner
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|r| *r.live.read().unwrap_or_else(|e| e.into_inner()))
            .cloned()
            .collect()
    }
}

impl Drop for LinuxMemory {
    fn drop(&mut self) {
        // Retire the regions while the fault threads still run (a writer may be waiting).
        let regions: Vec<Arc<Region>> = self
            .inner
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for region in regions {
            let mut live = region.live.write().unwrap_or_else(|e| e.into_inner());
            if *live {
                *live = false;
                self.inner.retire(&region);
            }
        }
        // The fault threads stop when `faults` is dropped, right after this.
    }
}

impl Inner {
    /// The fault threads on this thread's CPU until the returned guard drops, for a batch
    /// of remaps (see `follow.rs`), if configured.
    fn follow(&self) -> Option<follow::Following<'_>> {
        (self.config.fault_threads_follow && self.uffd.is_some()).then(|| self.follow.follow())
    }

    /// The canonical store now.
    fn store(&self) -> Arc<Store> {
        self.store.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn uffd(&self) -> Result<&Uffd, PageError> {
        self.uffd.as_ref().ok_or(PageError::Unsupported(NO_UFFD))
    }

    fn dirty(&self, page: PageId) {
        let hook = self.hook.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(h) = hook {
            h(page);
        }
    }
}

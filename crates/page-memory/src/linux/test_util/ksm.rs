//! Linux KSM through its sysfs knobs (`/sys/kernel/mm/ksm`), for measurements that run
//! KSM beside the Linux backend: reading and writing the knobs, finding ksmd, telling
//! whether someone else uses KSM, saving the knobs and writing them back when done
//! ([`Restore`]), the knob set-up of a comparison run ([`set_up_comparison`]), and
//! unmerging after one ([`unmerge_and_stop`]).
//!
//! Writing the knobs needs root.

use std::fs;
use std::time::{Duration, Instant};

/// Where KSM's knobs are.
pub const SYSFS: &str = "/sys/kernel/mm/ksm";

/// The knobs [`set_up_comparison`] saves (those this kernel has) and changes.
pub const COMPARISON_KNOBS: [&str; 7] = [
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "smart_scan",
    "advisor_mode",
    "max_page_sharing",
    "use_zero_pages",
];

/// Why KSM is refused when [`in_use`] says someone else uses it.
pub const IN_USE: &str = "KSM is in use by another process (pages_shared > 0 or run = 1)";

/// Knob `knob`, trimmed (empty if it cannot be read, as for a knob this kernel lacks).
pub fn read(knob: &str) -> String {
    fs::read_to_string(format!("{SYSFS}/{knob}"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Knob `knob` as a number (0 if it cannot be read or parsed).
pub fn num(knob: &str) -> u64 {
    read(knob).parse().unwrap_or(0)
}

/// Writes `value` to knob `knob`.
pub fn write(knob: &str, value: &str) -> std::io::Result<()> {
    fs::write(format!("{SYSFS}/{knob}"), value)
}

/// [`write()`], its error saying which knob (and that it needs root).
pub fn set(knob: &str, value: &str) -> Result<(), String> {
    write(knob, value).map_err(|e| format!("KSM's {knob} (needs root): {e}"))
}

/// [`write()`] for measurements that stop on a failed write: panics saying what was
/// written where.
pub fn put(knob: &str, value: &str) {
    if let Err(e) = write(knob, value) {
        panic!("writing {value} to {SYSFS}/{knob}: {e}");
    }
}

/// The pid of ksmd, or why there is none.
pub fn ksmd() -> Result<u32, String> {
    fs::read_dir("/proc")
        .ok()
        .and_then(|d| {
            d.flatten().find_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|c| c.trim() == "ksmd")
                    .then_some(pid)
            })
        })
        .ok_or_else(|| "no ksmd (a kernel without KSM)".to_string())
}

/// Whether the knobs can be used here: this process is root and the kernel has KSM; or
/// why not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(format!(
            "KSM's sysfs knobs ({SYSFS}) need root; run as root"
        ));
    }
    if !std::path::Path::new(SYSFS).exists() {
        return Err(format!("this kernel has no KSM ({SYSFS} is missing)"));
    }
    Ok(())
}

/// Whether someone else uses KSM: pages merged (`pages_shared` + `pages_sharing` > 0) or
/// ksmd running (`run` = 1).
pub fn in_use() -> bool {
    num("pages_shared") + num("pages_sharing") > 0 || read("run") == "1"
}

/// KSM's knobs as they were; written back on drop, in reverse order of [`save`]
/// (so `run`, saved first, is written last). `advisor_mode` reads as its choices with
/// the current one bracketed (`[none] scan-time`); the bracketed one is written back.
///
/// [`save`]: Restore::save
#[derive(Debug)]
pub struct Restore(Vec<(&'static str, String)>);

impl Restore {
    /// Saves `knobs`, leaving out those that cannot be read (knobs this kernel lacks).
    pub fn save(knobs: &[&'static str]) -> Self {
        Restore(
            knobs
                .iter()
                .map(|&k| (k, read(k)))
                .filter(|(_, v)| !v.is_empty())
                .collect(),
        )
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        for (k, v) in self.0.iter().rev() {
            let v = if *k == "advisor_mode" {
                v.split('[')
                    .nth(1)
                    .and_then(|x| x.split(']').next())
                    .unwrap_or("none")
            } else {
                v.as_str()
            };
            let _ = write(k, v);
        }
    }
}

/// Unmerges everything (`run` = 2), waits until no page is merged (at most `limit`,
/// polling every `poll`), then stops ksmd (`run` = 0). Panics if a knob cannot be
/// written ([`put`]).
pub fn unmerge_and_stop(limit: Duration, poll: Duration) {
    put("run", "2");
    let t = Instant::now();
    while num("pages_shared") + num("pages_sharing") > 0 && t.elapsed() < limit {
        std::thread::sleep(poll);
    }
    put("run", "0");
}

/// Sets KSM up for a comparison run: saves [`COMPARISON_KNOBS`] (written back when the
/// returned guard drops, even after a panic), stops ksmd (`run` = 0; the knobs below only
/// take effect while it is stopped with nothing merged), and sets `smart_scan` 0,
/// `use_zero_pages` 0, `max_page_sharing` 256 and `advisor_mode` none where this kernel
/// has them. The caller sets `pages_to_scan` and `sleep_millisecs`. Check [`available`]
/// and [`in_use`] first; panics if a knob cannot be written ([`put`]).
pub fn set_up_comparison() -> Restore {
    let restore = Restore::save(&COMPARISON_KNOBS);
    put("run", "0");
    for (k, v) in [
        ("smart_scan", "0"),
        ("use_zero_pages", "0"),
        ("max_page_sharing", "256"),
    ] {
        if !read(k).is_empty() {
            put(k, v);
        }
    }
    if read("advisor_mode").contains('[') {
        put("advisor_mode", "none");
    }
    restore
}

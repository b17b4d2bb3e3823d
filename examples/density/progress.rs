//! The live progress line: elapsed time, memory in use, pages merged and recycled per
//! second. On a terminal it is redrawn in place a few times a second; otherwise a line is
//! printed at each quarter of a run.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::engine::{Counters, Setup};
use crate::plan::{sim_time, WARMUP_S};

/// How often the line is redrawn on a terminal.
const REDRAW: Duration = Duration::from_millis(200);
/// The window over which rates are computed.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// The progress line's state.
pub struct Progress {
    enabled: bool,
    tty: bool,
    last_draw: Option<Instant>,
    quarter: u32,
    /// Counter snapshots of the last `RATE_WINDOW`, oldest first.
    history: Vec<(Instant, Counters)>,
    width: usize,
}

impl Progress {
    /// A progress line on stdout (or none).
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stdout().is_terminal(),
            last_draw: None,
            quarter: 0,
            history: Vec::new(),
            width: 0,
        }
    }

    /// Shows where a run is.
    pub fn update(
        &mut self,
        setup: &Setup,
        elapsed: Duration,
        total: Duration,
        t: f64,
        bytes: u64,
        c: Counters,
    ) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        self.history.push((now, c));
        while self.history.len() > 2 && now - self.history[1].0 >= RATE_WINDOW {
            self.history.remove(0);
        }
        let quarter = (4.0 * elapsed.as_secs_f64() / total.as_secs_f64()) as u32;
        let due = if self.tty {
            self.last_draw.is_none_or(|d| now - d >= REDRAW)
        } else {
            quarter > self.quarter
        };
        if !due {
            return;
        }
        self.last_draw = Some(now);
        self.quarter = quarter;
        let (t0, c0) = self.history[0];
        let dt = (now - t0).as_secs_f64().max(1e-3);
        let per_s = |a: u64, b: u64| fmt_rate((b.saturating_sub(a)) as f64 / dt);
        let line = format!(
            "  {:<20} {:>5.1}/{:.0} s  sim {:>6} {:<9} mem {:>7.1} MiB  merged {:>6}/s  recycled {:>6}/s",
            setup.name(),
            elapsed.as_secs_f64(),
            total.as_secs_f64(),
            sim_time(t),
            if t < WARMUP_S { "(warm-up)" } else { "" },
            bytes as f64 / 1048576.0,
            per_s(c0.merges, c.merges),
            per_s(c0.recycled, c.recycled),
        );
        let mut out = std::io::stdout().lock();
        if self.tty {
            let pad = self.width.saturating_sub(line.len());
            let _ = write!(out, "\r{line}{:pad$}", "");
            self.width = line.len();
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// Ends a run's line.
    pub fn done(&mut self) {
        if self.enabled && self.tty && self.width > 0 {
            print!("\r{:w$}\r", "", w = self.width);
            let _ = std::io::stdout().flush();
        }
        self.width = 0;
        self.quarter = 0;
        self.last_draw = None;
        self.history.clear();
    }
}

/// `12`, `3.4k`, `1.2M`.
pub fn fmt_rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

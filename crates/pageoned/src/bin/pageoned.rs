//! `pageoned`: the deduplication service. See `pageoned::service`.
//!
//! ```text
//! pageoned [--socket PATH] [--domain UID=DOMAIN]... [--only-listed]
//!          [--period-ms N] [--threads N] [--stable-periods N] [--stats-s N] [--recycle]
//! ```
//! `--recycle` runs the Per Page Recycler in the passes: the agents of VMMs that
//! registered PIP pools recycle the pages their guests freed.
//! Runs until killed. A killed service leaves every guest running (see the module docs
//! of `pageoned::service`); a restarted one removes the stale socket and the agents
//! reconnect.

#[cfg(target_os = "linux")]
fn main() {
    use std::time::Duration;

    use page_memory::DomainId;
    use pageoned::service::{Service, ServiceConfig};

    let mut args = std::env::args().skip(1);
    let mut socket = String::from("/run/pageoned.sock");
    let mut domains = Vec::new();
    let mut only_listed = false;
    let mut period = Duration::from_millis(200);
    let mut threads = 1;
    let mut stable = 2u8;
    let mut stats_every = Duration::from_secs(10);
    let mut recycle = false;
    let usage = |why: &str| -> ! {
        eprintln!("pageoned: {why}");
        eprintln!(
            "usage: pageoned [--socket PATH] [--domain UID=DOMAIN]... [--only-listed] \
             [--period-ms N] [--threads N] [--stable-periods N] [--stats-s N] [--recycle]"
        );
        std::process::exit(2)
    };
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--socket" => socket = value(),
            "--domain" => {
                let v = value();
                let parsed = v
                    .split_once('=')
                    .and_then(|(u, d)| Some((u.parse::<u32>().ok()?, d.parse::<u32>().ok()?)))
                    .filter(|&(_, d)| d < 0x8000_0000);
                match parsed {
                    Some(p) => domains.push(p),
                    None => usage("--domain takes UID=DOMAIN, DOMAIN below 2^31"),
                }
            }
            "--only-listed" => only_listed = true,
            "--recycle" => recycle = true,
            "--period-ms" => {
                period =
                    Duration::from_millis(value().parse().unwrap_or_else(|_| usage("--period-ms")))
            }
            "--threads" => threads = value().parse().unwrap_or_else(|_| usage("--threads")),
            "--stable-periods" => {
                stable = value()
                    .parse()
                    .unwrap_or_else(|_| usage("--stable-periods"))
            }
            "--stats-s" => {
                stats_every =
                    Duration::from_secs(value().parse().unwrap_or_else(|_| usage("--stats-s")))
            }
            "--help" | "-h" => usage("help"),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    let engine = pageone::Config::default()
        .merge_period(period)
        .work_threads(threads)
        .stable_periods(stable);
    let mut config = ServiceConfig::new(&socket)
        .with_engine(engine)
        .with_only_listed(only_listed)
        .with_recycle(recycle);
    for (uid, d) in domains {
        config = config.with_domain(uid, DomainId(d));
    }
    let service = match Service::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pageoned: cannot listen on {socket}: {e}");
            std::process::exit(1)
        }
    };
    eprintln!(
        "pageoned: listening on {socket} (pid {})",
        std::process::id()
    );
    loop {
        std::thread::sleep(stats_every);
        let s = service.stats();
        let mut line = format!(
            "pageoned: {} VMMs, {} requests ({} pages)",
            s.vmms, s.requests, s.request_pages
        );
        for d in service.domains() {
            if let Some(e) = service.engine_stats(d) {
                line += &format!(
                    "; domain {:#x}: {} shared, {} sharing, {} unique, {} recycled",
                    d.0, e.pages_shared, e.pages_sharing, e.pages_unique, e.recycled
                );
            }
        }
        eprintln!("{line}");
    }
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("pageoned runs on Linux only");
    std::process::exit(3);
}

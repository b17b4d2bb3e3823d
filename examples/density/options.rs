//! The command line: a handful of flags, parsed by hand.

use std::path::PathBuf;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// VMs (regions) per run.
    pub vms: u32,
    /// Memory of each VM, MiB.
    pub vm_mib: u32,
    /// Wall-clock seconds of each run (warm-up and measured window together).
    pub seconds: f64,
    /// Whether `--seconds` was given (`--real` has a longer default).
    pub seconds_given: bool,
    /// PageONE work threads.
    pub threads: usize,
    /// Run on the Linux backend (real memory, real RSS) instead of the simulated memory.
    pub real: bool,
    /// Run real guests on KVM (kvm-vmm's VMM and bare-metal guest) instead.
    pub kvm: bool,
    /// Run the reclaim period × merge period sweep.
    pub sweep: bool,
    /// Print the live progress line.
    pub progress: bool,
    /// Where the plot goes.
    pub svg: PathBuf,
    /// Whether `--svg` was given (`--real` has its own default file).
    pub svg_given: bool,
    /// Seed of the workload (VM phases, contents).
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            vms: 8,
            vm_mib: 64,
            seconds: 8.0,
            seconds_given: false,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            real: false,
            kvm: false,
            sweep: true,
            progress: true,
            svg: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/density.svg")),
            svg_given: false,
            seed: 2017,
        }
    }
}

/// `--seconds` with `--real` unless given: guest writes to write-protected pages of the
/// Linux backend go through its userfaultfd fault thread (about 10 µs each), so the guests
/// need a less compressed schedule to keep up.
pub const REAL_SECONDS: f64 = 30.0;

/// `--seconds` with `--kvm` unless given: the guests' steps go through barrier rounds of
/// all VMs (and on this project's paravirtual KVM a vCPU's page faults are costly).
pub const KVM_SECONDS: f64 = 30.0;

/// `--vms` with `--kvm` unless given: every VM is a vCPU thread, and the guests' first
/// writes to pages the engines protected or recycled are page faults resolved in this
/// process (on this project's 2-core machines, 8 VMs fall far behind the schedule).
pub const KVM_VMS: u32 = 4;

/// The help text.
pub const USAGE: &str = "\
cargo run --release --example density -- [FLAGS]

The 2017 density experiment, scaled down: VMs whose applications allocate and free
memory on a cycle, plus the same OS image in every VM, under three set-ups (raw, a
KSM-like single-threaded dedup, PPR + PageONE), then a reclaim x merge period sweep.

  --vms N         VMs per run (default 8, or 4 with --kvm)
  --vm-mib M      memory of each VM in MiB (default 64)
  --seconds S     wall seconds of each run, warm-up included (default 8, or 30 with
                  --real or --kvm; 6 runs by default); simulated time is compressed to fit
  --threads T     PageONE work threads (default: the available cores)
  --real          run on the Linux backend (needs `--features linux`; real memory, RSS
                  read from /proc/self/smaps)
  --kvm           run real guests on KVM: kvm-vmm's VMM and bare-metal guest (from a
                  clone of the repository; needs /dev/kvm, the x86_64-unknown-none
                  target, root); KSM-like is Linux KSM itself there
  --no-sweep      skip the reclaim x merge period sweep (3 runs instead of 6)
  --no-progress   no live progress line
  --svg PATH      where to write the plot (default target/density.svg, with --real
                  target/density-real.svg, with --kvm target/density-kvm.svg)
  --docs-plot     write the plot over the committed docs/density.svg (or, with --real,
                  docs/density-real.svg, with --kvm docs/density-kvm.svg)
  --seed N        workload seed (default 2017)
  -h, --help      this text";

/// Why the command line was not accepted, or that help was asked for.
#[derive(Debug, PartialEq)]
pub enum ParseError {
    /// `-h` / `--help`.
    Help,
    /// A bad flag or value.
    Bad(String),
}

impl Options {
    /// Parses `args` (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, ParseError> {
        let mut o = Options::default();
        let mut docs_plot = false;
        let mut vms_given = false;
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or_else(|| ParseError::Bad(format!("{name} needs a value")))
            };
            match flag.as_str() {
                "-h" | "--help" => return Err(ParseError::Help),
                "--vms" => {
                    o.vms = number(&flag, &value(&flag)?, 1.0, 4096.0)? as u32;
                    vms_given = true;
                }
                "--vm-mib" => o.vm_mib = number(&flag, &value(&flag)?, 1.0, 65536.0)? as u32,
                "--seconds" => {
                    o.seconds = number(&flag, &value(&flag)?, 0.5, 86400.0)?;
                    o.seconds_given = true;
                }
                "--threads" => o.threads = number(&flag, &value(&flag)?, 1.0, 1024.0)? as usize,
                "--seed" => o.seed = number(&flag, &value(&flag)?, 0.0, 1e15)? as u64,
                "--svg" => {
                    o.svg = PathBuf::from(value(&flag)?);
                    o.svg_given = true;
                }
                "--real" => o.real = true,
                "--kvm" => o.kvm = true,
                "--docs-plot" => docs_plot = true,
                "--no-sweep" => o.sweep = false,
                "--no-progress" => o.progress = false,
                other => return Err(ParseError::Bad(format!("unknown flag {other:?}"))),
            }
        }
        if o.real && o.kvm {
            return Err(ParseError::Bad(
                "--real and --kvm exclude each other".into(),
            ));
        }
        if !o.seconds_given {
            if o.real {
                o.seconds = REAL_SECONDS;
            } else if o.kvm {
                o.seconds = KVM_SECONDS;
            }
        }
        if o.kvm && !vms_given {
            o.vms = KVM_VMS;
        }
        if !o.svg_given {
            let dir = if docs_plot { "docs" } else { "target" };
            let file = if o.real {
                "density-real.svg"
            } else if o.kvm {
                "density-kvm.svg"
            } else {
                "density.svg"
            };
            o.svg = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(dir)
                .join(file);
        }
        Ok(o)
    }

    /// Pages of each VM.
    pub fn vm_pages(&self) -> u32 {
        self.vm_mib * 256
    }
}

fn number(flag: &str, v: &str, min: f64, max: f64) -> Result<f64, ParseError> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && (min..=max).contains(&x) => Ok(x),
        _ => Err(ParseError::Bad(format!(
            "{flag} {v:?}: expected a number from {min} to {max}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Options, ParseError> {
        Options::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn flags() {
        let o = parse("--vms 3 --vm-mib 16 --seconds 2.5 --threads 1 --real --no-sweep").unwrap();
        assert_eq!((o.vms, o.vm_mib, o.seconds, o.threads), (3, 16, 2.5, 1));
        assert!(o.real && !o.sweep);
        assert!(o.svg.ends_with("target/density-real.svg"));
        let o = parse("--real").unwrap();
        assert_eq!(o.seconds, REAL_SECONDS);
        let o = parse("--real --svg x.svg --seconds 3").unwrap();
        assert_eq!((o.seconds, o.svg.to_str()), (3.0, Some("x.svg")));
        assert!(parse("").unwrap().svg.ends_with("target/density.svg"));
        let o = parse("--kvm").unwrap();
        assert!(o.kvm && !o.real && o.svg.ends_with("target/density-kvm.svg"));
        assert_eq!((o.seconds, o.vms), (KVM_SECONDS, KVM_VMS));
        assert_eq!(parse("--kvm --vms 2").unwrap().vms, 2);
        assert!(matches!(parse("--kvm --real"), Err(ParseError::Bad(_))));
        assert!(parse("--docs-plot")
            .unwrap()
            .svg
            .ends_with("docs/density.svg"));
        assert_eq!(parse("--help").unwrap_err(), ParseError::Help);
        assert!(matches!(parse("--vms"), Err(ParseError::Bad(_))));
        assert!(matches!(parse("--vms 0"), Err(ParseError::Bad(_))));
        assert!(matches!(parse("--frobnicate"), Err(ParseError::Bad(_))));
    }
}

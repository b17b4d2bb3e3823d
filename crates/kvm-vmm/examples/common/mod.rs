//! What the examples share: their numeric flags, and every set-up run a number of times.
// Each example uses its own part.
#![allow(dead_code)]

/// Sets each flag of `flags` given on the command line as `--name N`. Panics on a flag
/// without a number or an unknown flag.
pub fn parse_flags(flags: &mut [(&str, &mut u64)]) {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let v: u64 = argv
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", argv[i]));
        match flags.iter_mut().find(|(name, _)| *name == argv[i]) {
            Some((_, flag)) => **flag = v,
            None => panic!("unknown flag {}", argv[i]),
        }
        i += 2;
    }
}

/// Runs every set-up of `setups` `reps` times, the repetitions interleaved (every
/// set-up once, then again): per set-up, the rows of the runs that worked, each first
/// passed to `log` with its repetition; a run that did not prints `<name>: SKIPPED:
/// <why>`.
pub fn run_reps<S: Copy, R>(
    setups: &[S],
    reps: u64,
    name: impl Fn(S) -> &'static str,
    mut run: impl FnMut(S) -> Result<R, String>,
    log: impl Fn(u64, S, &R),
) -> Vec<(S, Vec<R>)> {
    let mut rows: Vec<(S, Vec<R>)> = setups.iter().map(|&s| (s, Vec::new())).collect();
    for rep in 0..reps {
        for (s, out) in rows.iter_mut() {
            match run(*s) {
                Ok(r) => {
                    log(rep, *s, &r);
                    out.push(r)
                }
                Err(e) => println!("{}: SKIPPED: {e}", name(*s)),
            }
        }
    }
    rows
}

//! One process per VM: a parent re-executes its own binary once per VM, each child runs
//! its VM and sends the outcome back through a pipe (its standard output), and the
//! parent reads them back as [`VmOutcome`]s.
//!
//! A child learns which VM it runs from [`CHILD_ENV`] ([`child_vm`]); the parent picks
//! the arguments it is started with (an example passes its own flags and a child-mode
//! flag; a test passes `--exact <its name>` so that the test binary runs only that test,
//! which sees [`child_vm`] and runs the child's part). The child prints its outcome with
//! [`send`]: lines holding [`LINE_PREFIX`] (the VM's name, console, every call,
//! elapsed and vCPU time, or the error), among whatever else it prints; the parent's
//! [`ChildVm::wait`] keeps only those lines.
//!
//! Engines run where the VM's RAM is: in the child (each child may run its own engine,
//! or none); merging across the VMs of several processes is not provided here.
//!
//! ```no_run
//! use std::time::Duration;
//! use kvm_vmm::process::{child_vm, send, ChildVm};
//! use kvm_vmm::workload::Checker;
//! use kvm_vmm::{guest_image, Vm};
//!
//! let image = guest_image().unwrap();
//! if let Some(i) = child_vm() {
//!     let config = Checker { pages: 256, ..Checker::default() }.config(format!("vm{i}"), 8 << 20);
//!     send(&Vm::new(config, &image).and_then(|mut vm| vm.run(Duration::from_secs(30))));
//!     return;
//! }
//! let children: Vec<ChildVm> = (0..2).map(|i| ChildVm::spawn(i, &[]).unwrap()).collect();
//! for c in children {
//!     let out = c.wait(Duration::from_secs(60)).unwrap();
//!     assert_eq!(Checker::report(&out).unwrap().mismatched, 0);
//! }
//! ```

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::vm::{Call, VmOutcome};
use crate::Error;

/// The environment variable that makes a process a child running VM `N` (its value).
pub const CHILD_ENV: &str = "KVM_VMM_CHILD_VM";

/// What starts every line of a child's outcome.
pub const LINE_PREFIX: &str = "kvm-vmm-child:";

/// The VM this process runs as a child ([`CHILD_ENV`]), or `None` in the parent.
pub fn child_vm() -> Option<usize> {
    std::env::var(CHILD_ENV).ok()?.parse().ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The lines [`send`] prints for `result`.
pub fn encode(result: &Result<VmOutcome, Error>) -> Vec<String> {
    let p = LINE_PREFIX;
    match result {
        Err(e) => vec![format!("{p} error {}", hex(e.to_string().as_bytes()))],
        Ok(o) => {
            let mut lines = vec![
                format!("{p} name {}", hex(o.name.as_bytes())),
                format!("{p} console {}", hex(o.console.as_bytes())),
                format!(
                    "{p} time {} {}",
                    o.elapsed.as_nanos(),
                    o.vcpu_cpu.as_nanos()
                ),
            ];
            for c in &o.calls {
                let args: Vec<String> = c.args.iter().map(|a| a.to_string()).collect();
                lines.push(format!("{p} call {} {} {}", c.vcpu, c.code, args.join(" ")));
            }
            lines.push(format!("{p} end"));
            lines
        }
    }
}

/// Reads the outcome back from a child's output `lines` (other lines ignored): the
/// child's error as [`Error::Thread`] with its message, or a message saying what is
/// missing or malformed.
pub fn decode<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<VmOutcome, String> {
    let mut out = VmOutcome {
        name: String::new(),
        console: String::new(),
        calls: Vec::new(),
        elapsed: Duration::ZERO,
        vcpu_cpu: Duration::ZERO,
    };
    let bad = |l: &str| format!("a malformed line from the child: {l:?}");
    let text = |h: &str, l: &str| {
        unhex(h)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .ok_or_else(|| bad(l))
    };
    let mut ended = false;
    for line in lines {
        // The prefix may follow other output on the line (a test harness's "test ...").
        let Some(rest) = line
            .find(LINE_PREFIX)
            .map(|i| &line[i + LINE_PREFIX.len()..])
        else {
            continue;
        };
        let mut f = rest.split_ascii_whitespace();
        match f.next() {
            Some("error") => {
                return Err(format!(
                    "the child's VM failed: {}",
                    text(f.next().unwrap_or(""), line)?
                ))
            }
            Some("name") => out.name = text(f.next().unwrap_or(""), line)?,
            Some("console") => out.console = text(f.next().unwrap_or(""), line)?,
            Some("time") => {
                let mut n = || f.next().and_then(|v| v.parse::<u64>().ok());
                let (Some(e), Some(c)) = (n(), n()) else {
                    return Err(bad(line));
                };
                out.elapsed = Duration::from_nanos(e);
                out.vcpu_cpu = Duration::from_nanos(c);
            }
            Some("call") => {
                let nums: Option<Vec<u64>> = f.map(|v| v.parse().ok()).collect();
                let nums = nums.filter(|n| n.len() >= 2).ok_or_else(|| bad(line))?;
                out.calls.push(Call {
                    vcpu: nums[0] as u32,
                    code: nums[1] as u32,
                    args: nums[2..].to_vec(),
                });
            }
            Some("end") => ended = true,
            _ => return Err(bad(line)),
        }
    }
    if ended {
        Ok(out)
    } else {
        Err("the child sent no outcome (it exited early or printed none)".into())
    }
}

/// Prints `result` for the parent (on standard output, in lines starting with
/// [`LINE_PREFIX`], after a line break) and flushes.
pub fn send(result: &Result<VmOutcome, Error>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    for line in encode(result) {
        let _ = writeln!(out, "{line}");
    }
    let _ = out.flush();
}

/// A child process running one VM.
#[derive(Debug)]
pub struct ChildVm {
    vm: usize,
    child: Child,
}

impl ChildVm {
    /// Starts this process's own binary (`/proc/self/exe`) with `args` and
    /// [`CHILD_ENV`] = `vm`, its standard output a pipe to this process.
    pub fn spawn(vm: usize, args: &[&str]) -> std::io::Result<ChildVm> {
        let exe = std::env::current_exe()?;
        let child = Command::new(exe)
            .args(args)
            .env(CHILD_ENV, vm.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        Ok(ChildVm { vm, child })
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits (at most `timeout`; then kills the child) for the child to exit and returns
    /// the outcome it sent, or why there is none.
    pub fn wait(mut self, timeout: Duration) -> Result<VmOutcome, String> {
        let vm = self.vm;
        let stdout = self.child.stdout.take().ok_or("the child has no pipe")?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let lines: Vec<String> = BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect();
            let _ = tx.send(lines);
        });
        let lines = match rx.recv_timeout(timeout) {
            Ok(lines) => lines,
            Err(_) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let _ = reader.join();
                return Err(format!("VM {vm}'s child did not finish within {timeout:?}"));
            }
        };
        let _ = reader.join();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        let outcome = decode(lines.iter().map(String::as_str))
            .map_err(|e| format!("VM {vm}'s child (exit {status}): {e}"))?;
        if !status.success() {
            return Err(format!("VM {vm}'s child exited with {status}"));
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_survive_the_pipe_format() {
        let o = VmOutcome {
            name: "vm 1".into(),
            console: "hello\nworld ✓".into(),
            calls: vec![
                Call {
                    vcpu: 1,
                    code: 2,
                    args: vec![3, u64::MAX],
                },
                Call {
                    vcpu: 0,
                    code: 7,
                    args: vec![],
                },
            ],
            elapsed: Duration::from_millis(1234),
            vcpu_cpu: Duration::from_nanos(99),
        };
        let lines = encode(&Ok(o.clone()));
        let mut with_noise = vec!["running 1 test".to_string()];
        with_noise.extend(lines);
        with_noise[1] = format!("test x ... {}", with_noise[1]);
        let back = decode(with_noise.iter().map(String::as_str)).unwrap();
        assert_eq!(back.name, o.name);
        assert_eq!(back.console, o.console);
        assert_eq!(back.elapsed, o.elapsed);
        assert_eq!(back.vcpu_cpu, o.vcpu_cpu);
        assert_eq!(back.calls.len(), 2);
        assert_eq!(back.calls[0].args, [3, u64::MAX]);
        assert_eq!((back.calls[1].vcpu, back.calls[1].code), (0, 7));
        let err = encode(&Err(Error::KvmMissing));
        assert!(decode(err.iter().map(String::as_str))
            .unwrap_err()
            .contains("/dev/kvm is missing"));
        assert!(decode(["nothing"]).is_err());
    }
}

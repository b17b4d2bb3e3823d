//! A connection that speaks the wire protocol by hand (a broken or hostile agent).

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use pageoned::socket;
use pageoned::wire::{self, Msg, WireError};

/// Sends `msg`.
pub fn send(fd: &OwnedFd, msg: &Msg) {
    let mut frame = Vec::new();
    wire::encode(msg, &mut frame).unwrap();
    socket::send(fd, &frame, &[]).unwrap();
}

/// The next message (`None`: end of stream), waiting at most 5 s.
pub fn recv(fd: &OwnedFd) -> Option<Result<Msg, WireError>> {
    let mut buf = Vec::new();
    socket::recv(fd, &mut buf, Some(Duration::from_secs(5)))
        .unwrap()
        .map(|_| wire::decode(&buf))
}

/// Connects, says hello and takes the welcome (which carries the store).
pub fn hello(path: &Path, name: &str) -> OwnedFd {
    let fd = socket::connect(path).unwrap();
    send(&fd, &Msg::Hello { name: name.into() });
    let mut buf = Vec::new();
    let got = socket::recv(&fd, &mut buf, Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    assert_eq!(got.fds.len(), 1, "the welcome carries the store");
    fd
}

/// Registers 16 pages of this process's own memory (which the service can read) as the
/// connection's region 1, and waits for the service's yes; the memory is returned, to be
/// kept while the region is registered.
pub fn register_own_memory(fd: &OwnedFd) -> Vec<u8> {
    let ram = vec![7u8; 32 * 4096];
    let base = (ram.as_ptr() as u64).next_multiple_of(4096);
    send(
        fd,
        &Msg::Register {
            id: 1,
            regions: vec![wire::RegionDecl {
                region: 1,
                addr: base,
                pages: 16,
            }],
        },
    );
    assert!(matches!(
        recv(fd),
        Some(Ok(Msg::Registered {
            id: 1,
            result: Ok(())
        }))
    ));
    ram
}

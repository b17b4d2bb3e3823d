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

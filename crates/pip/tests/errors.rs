//! Every error type is a `core::error::Error` with a readable `Display`.

use core::error::Error;

use pip::{AttachError, Invalid, LayoutError, Lost, RegisterError, Reject};

fn message(e: &dyn Error) -> String {
    let s = e.to_string();
    assert!(!s.is_empty() && !s.ends_with('.'), "{s:?}");
    s
}

#[test]
fn errors_display() {
    assert!(message(&AttachError::NotRegistered(1)).contains("state 1"));
    message(&AttachError::BadRegistration);
    assert!(message(&RegisterError::State(2)).contains("state 2"));
    message(&RegisterError::Reserved);
    message(&LayoutError::Magic);
    message(&Lost);
    for why in Invalid::ALL {
        message(&why);
        let reject = Reject::Invalid(why);
        message(&reject);
        let source = reject.source().expect("the reason");
        assert_eq!(source.to_string(), why.to_string());
    }
    assert!(Reject::NotMarked.source().is_none());
}

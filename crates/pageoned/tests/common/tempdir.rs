//! A directory of a test's own, removed when dropped.

/// A directory removed when dropped.
pub struct Dir(pub std::path::PathBuf);

impl Dir {
    /// A fresh directory for test `name` (unique per process and moment).
    pub fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "pageoned-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

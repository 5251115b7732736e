//! The process-wide panic count behind `coredns_panics_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Panics seen by the hook of [`install_panic_hook`], process-wide (a panic belongs to the
/// process, not to one `Metrics`), exported as `coredns_panics_total`.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic in `coredns_panics_total`, then runs the hook that was installed before
/// (by default, printing the message). Idempotent. With `panic = "abort"` (the release profile)
/// the process dies right after, so the count matters for panics caught by tokio tasks in other
/// builds, and for the restart it explains.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// Panics counted since the process started.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

//! The process-wide panic count behind `coredns_panics_total`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Panics seen by the hook of [`install_panic_hook`], process-wide (a panic belongs to the
/// process, not to one `Metrics`), exported as `coredns_panics_total`.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic in `coredns_panics_total`, then runs the hook that was installed before
/// (by default, printing the message). Idempotent. The hook runs before the unwinding, so a panic
/// contained at the packet boundary (`server::contain`: the query gets SERVFAIL, the server goes
/// on) or by tokio (a task ends alone) is counted while the process keeps serving.
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

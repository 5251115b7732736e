//! Where a thread's upstream readers run (one per pooled UDP socket, one per pooled TCP
//! connection). On a UDP worker's thread they run inside the worker's own future, polled with
//! its other waits ([`poll_readers`]): a reply then wakes the worker directly. As tasks they
//! would wake it through the runtime, which then polls its I/O driver once more (an empty
//! `epoll_wait`) before it returns to the worker: one system call more per miss. On every other
//! thread (the shared runtime's) they are tasks.
//!
//! A reader is stopped through its [`Stop`] handle (a retired socket), or dropped with the set
//! when the thread ends.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures::future::{AbortHandle, Abortable};
use futures::stream::{FuturesUnordered, StreamExt};

type Reader = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Readers started on this thread since its worker last polled them, and that worker's waker.
#[derive(Default)]
struct Incoming {
    /// Whether this thread's worker runs readers (see [`adopt`]).
    adopted: bool,
    new: Vec<Reader>,
    waker: Option<Waker>,
}

thread_local! {
    static INCOMING: RefCell<Incoming> = RefCell::new(Incoming::default());
    /// The readers this thread's worker runs.
    static RUNNING: RefCell<FuturesUnordered<Reader>> = RefCell::new(FuturesUnordered::new());
}

/// Stops a reader: it is dropped at its next poll (or at once, when it runs as a task).
pub(super) struct Stop(AbortHandle);

impl Stop {
    pub(super) fn stop(&self) {
        self.0.abort();
    }
}

/// Makes this thread's readers run inside its worker's future from now on: the worker must
/// poll them ([`poll_readers`]) whenever it waits.
pub fn adopt() {
    INCOMING.with_borrow_mut(|i| i.adopted = true);
}

/// Starts `reader` on this thread: in its worker's set, or as a task of the current runtime.
pub(super) fn start(reader: impl Future<Output = ()> + Send + 'static) -> Stop {
    let (handle, registration) = AbortHandle::new_pair();
    let reader = Abortable::new(reader, registration);
    let adopted = INCOMING.with_borrow(|i| i.adopted);
    if !adopted {
        tokio::spawn(reader);
        return Stop(handle);
    }
    INCOMING.with_borrow_mut(|i| {
        i.new.push(Box::pin(async move {
            let _ = reader.await;
        }));
        // Polled at the worker's next wait; wake it if it waits already.
        if let Some(w) = i.waker.take() {
            w.wake();
        }
    });
    Stop(handle)
}

/// Polls this thread's readers (those started since the last call first get their first
/// poll). Never ready: a worker polls it beside its other waits.
pub fn poll_readers(cx: &mut Context<'_>) -> Poll<()> {
    let new = INCOMING.with_borrow_mut(|i| {
        if !i.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            i.waker = Some(cx.waker().clone());
        }
        std::mem::take(&mut i.new)
    });
    // Borrowed while the readers run: a reader never starts another (starts go to INCOMING).
    RUNNING.with_borrow_mut(|running| {
        running.extend(new);
        while let Poll::Ready(Some(())) = running.poll_next_unpin(cx) {}
    });
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::forward::test_util::rt;

    /// Sets its flag when dropped.
    struct Flag(Arc<AtomicBool>);
    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    async fn run_readers_once() {
        std::future::poll_fn(|cx| {
            let _ = poll_readers(cx);
            Poll::Ready(())
        })
        .await
    }

    /// On a worker's thread a reader runs only when the worker polls the readers, not as a task
    /// the runtime runs by itself; a stopped one is dropped at that poll.
    #[test]
    fn adopted_readers_run_when_the_worker_polls_them() {
        // Each test has its own thread: adopting concerns this one only.
        rt().block_on(async {
            adopt();
            let done = Arc::new(AtomicBool::new(false));
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let flag = Flag(done.clone());
            let _running = start(async move {
                let _ = rx.await;
                drop(flag);
            });
            run_readers_once().await;
            tx.send(()).unwrap();
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            assert!(!done.load(Ordering::Relaxed), "ran without the worker");
            run_readers_once().await;
            assert!(done.load(Ordering::Relaxed), "ran when polled");

            let dropped = Arc::new(AtomicBool::new(false));
            let flag = Flag(dropped.clone());
            let stop = start(async move {
                let _flag = flag;
                std::future::pending::<()>().await;
            });
            run_readers_once().await;
            assert!(!dropped.load(Ordering::Relaxed));
            stop.stop();
            run_readers_once().await;
            assert!(
                dropped.load(Ordering::Relaxed),
                "a stopped reader is dropped"
            );
        });
    }

    /// Elsewhere a reader is a task of the current runtime.
    #[test]
    fn readers_elsewhere_are_tasks() {
        rt().block_on(async {
            let done = Arc::new(AtomicBool::new(false));
            let flag = Flag(done.clone());
            let _running = start(async move { drop(flag) });
            tokio::task::yield_now().await;
            assert!(done.load(Ordering::Relaxed));
        });
    }
}

//! The mailbox of a thread's UDP worker: replies to the misses it resolves without a task
//! (`direct`), put there by the readers of its thread's upstream sockets and connections (the UDP
//! socket pools, the pooled TCP connections), each under the token the worker gave with the
//! query. Readers and worker share the thread, so the mailbox is a thread-local with no lock.

use std::cell::RefCell;
use std::task::{Context, Poll, Waker};

use super::UpstreamError;
use crate::dns::Response;

/// What one upstream exchange ends with.
pub type Answer = Result<Response, UpstreamError>;

/// Replies for this thread's worker, and the waker of the worker waiting for them.
#[derive(Default)]
struct Answers {
    ready: Vec<(u64, Answer)>,
    waker: Option<Waker>,
}

thread_local! {
    static ANSWERS: RefCell<Answers> = RefCell::new(Answers::default());
}

/// Hands `answer` to this thread's worker under `token`, and wakes the worker.
pub(super) fn deliver(token: u64, answer: Answer) {
    // Not during the thread's exit (the worker is gone then).
    let _ = ANSWERS.try_with(|a| {
        let mut a = a.borrow_mut();
        a.ready.push((token, answer));
        if let Some(w) = a.waker.take() {
            w.wake();
        }
    });
}

/// Moves the replies that arrived for this thread's worker into `into` (emptied first).
pub fn take_answers(into: &mut Vec<(u64, Answer)>) {
    into.clear();
    ANSWERS.with_borrow_mut(|a| std::mem::swap(&mut a.ready, into));
}

/// Forgets the worker's waker: the worker is running, so replies handed over now need not wake
/// it (a wake from inside its own poll makes the runtime poll its I/O driver once more for
/// nothing before it returns to the worker).
pub(super) fn running() {
    ANSWERS.with_borrow_mut(|a| a.waker = None);
}

/// Ready once a reply for this thread's worker is waiting to be taken.
pub fn poll_answers(cx: &mut Context<'_>) -> Poll<()> {
    ANSWERS.with_borrow_mut(|a| {
        if a.ready.is_empty() {
            a.waker = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
}

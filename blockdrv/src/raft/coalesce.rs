//! Requests for a value that has to be fetched after each request arrived, such as a read
//! index (a read must see every write acknowledged before it arrived), served by fewer
//! fetches: at most one runs at a time, and the requests that arrive while it runs share the
//! next one. They cannot share the one under way, which may have begun before they arrived.
//! A follower's reads at queue depth 32 then ask the leader for an index about twice per 32
//! reads instead of once each.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// Shares fetches among concurrent requests (see the module's doc).
#[derive(Debug)]
pub struct Coalesce<T> {
    queue: Mutex<Queue<T>>,
}

#[derive(Debug)]
struct Queue<T> {
    /// Whether a request is fetching, or has been handed the next fetch.
    fetching: bool,
    /// Requests waiting for the next fetch, in order of arrival.
    waiting: Vec<oneshot::Sender<Turn<T>>>,
}

/// What a waiting request is told.
#[derive(Debug)]
enum Turn<T> {
    /// The value, from a fetch that began after it arrived.
    Got(T),
    /// It fetches next, for itself and those waiting then.
    Fetch,
}

impl<T> Default for Coalesce<T> {
    fn default() -> Coalesce<T> {
        Coalesce {
            queue: Mutex::new(Queue {
                fetching: false,
                waiting: Vec::new(),
            }),
        }
    }
}

/// The fetching turn a request holds: given to the request that waited longest when dropped
/// (done, or the request cancelled: the requests it fetched for then ask again).
struct Holding<'a, T>(&'a Coalesce<T>);

/// A request waiting in the queue. Cancelled, it hands on a turn it was given meanwhile.
struct Waiting<'a, T> {
    coalesce: &'a Coalesce<T>,
    rx: oneshot::Receiver<Turn<T>>,
    answered: bool,
}

impl<T> Drop for Waiting<'_, T> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        // Closed first: a turn is either in it now or handed to another request.
        self.rx.close();
        if let Ok(Turn::Fetch) = self.rx.try_recv() {
            drop(Holding(self.coalesce));
        }
    }
}

impl<T> Drop for Holding<'_, T> {
    fn drop(&mut self) {
        let mut q = self.0.lock();
        while !q.waiting.is_empty() {
            if q.waiting.remove(0).send(Turn::Fetch).is_ok() {
                return;
            }
        }
        q.fetching = false;
    }
}

impl<T> Coalesce<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Clone> Coalesce<T> {
    /// The value from a fetch that began after this call: `fetch` run by this request or
    /// by another. Cancel-safe: a request dropped while it waits or fetches leaves the others
    /// served.
    pub async fn get<F, Fut>(&self, fetch: F) -> T
    where
        F: Fn() -> Fut,
        Fut: Future<Output = T>,
    {
        loop {
            let waiting = {
                let mut q = self.lock();
                if q.fetching {
                    let (tx, rx) = oneshot::channel();
                    q.waiting.push(tx);
                    Some(Waiting {
                        coalesce: self,
                        rx,
                        answered: false,
                    })
                } else {
                    q.fetching = true;
                    None
                }
            };
            if let Some(mut w) = waiting {
                let answer = (&mut w.rx).await;
                w.answered = true;
                match answer {
                    Ok(Turn::Got(v)) => return v,
                    Ok(Turn::Fetch) => {}
                    // The request fetching for it was cancelled: ask again.
                    Err(_) => continue,
                }
            }
            let _turn = Holding(self);
            // Those waiting now arrived before the fetch begins.
            let batch = std::mem::take(&mut self.lock().waiting);
            let v = fetch().await;
            for w in batch {
                let _ = w.send(Turn::Got(v.clone()));
            }
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    /// A fetch that returns how many fetches had begun (with it), after `delay`.
    async fn counted(begun: &AtomicU64, delay: Duration) -> u64 {
        let n = begun.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(delay).await;
        n
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_fetches_that_began_after_they_arrived() {
        let c = Arc::new(Coalesce::<u64>::default());
        let begun = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (c, begun) = (c.clone(), begun.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(200 * (i % 8))).await;
                // Fetches begun before this request: the value must come from a later one.
                let before = begun.load(Ordering::SeqCst);
                let v = c.get(|| counted(&begun, Duration::from_millis(2))).await;
                assert!(
                    v > before,
                    "fetch {v} began before the request (after {before})"
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let fetches = begun.load(Ordering::SeqCst);
        assert!(fetches < 32, "{fetches} fetches for 64 requests");
    }

    /// A request, on a task of its own, whose fetch takes `delay`; 20 ms later (queued).
    async fn request(
        c: &Arc<Coalesce<u64>>,
        begun: &Arc<AtomicU64>,
        delay: Duration,
    ) -> tokio::task::JoinHandle<u64> {
        let (c, begun) = (c.clone(), begun.clone());
        let t = tokio::spawn(async move { c.get(|| counted(&begun, delay)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        t
    }

    type Requests = (
        Arc<Coalesce<u64>>,
        Arc<AtomicU64>,
        [tokio::task::JoinHandle<u64>; 3],
    );

    /// Three requests one after the other: the first fetches (for 60 s), the second's fetch
    /// takes `second`, the third's 1 ms.
    async fn three_requests(second: Duration) -> Requests {
        let c = Arc::new(Coalesce::<u64>::default());
        let begun = Arc::new(AtomicU64::new(0));
        let first = request(&c, &begun, Duration::from_secs(60)).await;
        let second = request(&c, &begun, second).await;
        let third = request(&c, &begun, Duration::from_millis(1)).await;
        (c, begun, [first, second, third])
    }

    #[tokio::test]
    async fn a_cancelled_fetch_hands_its_turn_on_and_its_waiters_ask_again() {
        let (c, begun, [first, second, third]) = three_requests(Duration::from_millis(1)).await;
        // The first request is cancelled while it fetches.
        first.abort();
        // The second fetches (it waited longest) for the third.
        let v = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiting request is not left hanging")
            .unwrap();
        assert_eq!(v, 2);
        assert_eq!(third.await.unwrap(), 2);
        // And the next request fetches again.
        let v = c.get(|| counted(&begun, Duration::ZERO)).await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    async fn a_waiting_request_cancelled_as_it_is_handed_the_turn_hands_it_on() {
        let (_, _, [first, second, third]) = three_requests(Duration::from_millis(1)).await;
        // Cancelled in this order: the first hands its turn to the second, which is dropped
        // before it runs again.
        first.abort();
        second.abort();
        let v = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("the turn is not lost")
            .unwrap();
        assert_eq!(v, 2);
    }

    #[tokio::test]
    async fn requests_a_cancelled_fetch_was_for_fetch_again() {
        let (_, begun, [first, second, third]) = three_requests(Duration::from_secs(60)).await;
        // The second takes the turn and fetches (slowly) for the third; cancelled too.
        first.abort();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(begun.load(Ordering::SeqCst), 2);
        second.abort();
        let v = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .expect("the request fetched for is not left hanging")
            .unwrap();
        assert_eq!(v, 3);
    }
}

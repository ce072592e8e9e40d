//! A destination's ready queue: jobs waiting for a worker, the workers it has started (up to
//! the destination's cap), and which sources of its pool are at their warm-up cap here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::worker::worker;
use super::{DeliveryContext, Destination, Job};
use crate::config::{Pool, Source};

/// One destination's ready queue and its workers.
/// How often an idle worker with a reason to end early asks again.
const GIVE_UP_CHECK: Duration = Duration::from_secs(1);

pub struct DestQueue {
    pub key: Destination,
    /// The egress pool whose sources this queue's connections bind to.
    pub pool: Option<Pool>,
    state: Mutex<DestState>,
    notify: Notify,
    max_workers: usize,
}

#[derive(Default)]
struct DestState {
    jobs: VecDeque<Job>,
    workers: usize,
    idle: usize,
    /// Sources of the pool at their warm-up cap here: until when (ms) and the cap.
    exhausted: std::collections::HashMap<String, (u64, u64)>,
}

impl DestQueue {
    pub fn new(key: Destination, pool: Option<Pool>, max_workers: usize) -> Arc<DestQueue> {
        Arc::new(DestQueue {
            key,
            pool,
            state: Mutex::default(),
            notify: Notify::new(),
            max_workers,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a job: an idle worker is woken for it, and a new worker starts (if the cap
    /// allows) when more jobs wait than idle workers could take, so that a burst pushed at
    /// once is spread over connections, not served by the one idle worker.
    pub fn push(self: &Arc<Self>, job: Job, ctx: &Arc<DeliveryContext>) {
        let mut state = self.lock();
        state.jobs.push_back(job);
        let wake = state.idle > 0;
        let spawn = state.jobs.len() > state.idle && state.workers < self.max_workers;
        if spawn {
            state.workers += 1;
        }
        drop(state);
        if wake {
            self.notify.notify_one();
        }
        if spawn {
            tokio::spawn(worker(self.clone(), ctx.clone()));
        }
    }

    /// The next job, waiting up to `idle` for one; None when the worker should stop.
    pub(super) async fn next_job(&self, idle: Duration) -> Option<Job> {
        self.next_job_unless(idle, None).await
    }

    /// As [`DestQueue::next_job`], and while idle asks `give_up` every [`GIVE_UP_CHECK`]: the
    /// worker ends as soon as it says so (its connection should not wait out `idle`).
    pub(super) async fn next_job_unless(
        &self,
        idle: Duration,
        give_up: Option<&(dyn Fn() -> bool + Send + Sync)>,
    ) -> Option<Job> {
        let mut deadline = tokio::time::Instant::now() + idle;
        loop {
            {
                let mut state = self.lock();
                if let Some(job) = state.jobs.pop_front() {
                    return Some(job);
                }
                state.idle += 1;
            }
            let mut wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            if give_up.is_some() {
                wait = wait.min(GIVE_UP_CHECK);
            }
            let woken = tokio::time::timeout(wait, self.notify.notified())
                .await
                .is_ok();
            let mut state = self.lock();
            state.idle -= 1;
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            // Asked after a wake-up whose job another worker took, too: with others busy,
            // this one may be woken often and never time out.
            let done =
                give_up.is_some_and(|g| g()) || (!woken && tokio::time::Instant::now() >= deadline);
            if done {
                // Decided under the lock, so a push now sees one worker fewer and starts one.
                state.workers -= 1;
                return None;
            }
            if woken {
                deadline = tokio::time::Instant::now() + idle;
            }
        }
    }

    /// Whether jobs wait for a worker.
    pub(super) fn has_jobs(&self) -> bool {
        !self.lock().jobs.is_empty()
    }

    /// Puts a job back at the head of the queue, for this worker or an idle one to take.
    pub(super) fn retry_first(&self, job: Job) {
        let mut state = self.lock();
        state.jobs.push_front(job);
        let wake = state.idle > 0;
        drop(state);
        if wake {
            self.notify.notify_one();
        }
    }

    /// A source of the pool to connect from, at random by weight among those not at their
    /// warm-up cap here; None without a pool; Err with the earliest (next allowance, cap) when
    /// every source is at its cap.
    pub(super) fn source(&self) -> Result<Option<&Source>, (u64, u64)> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let now = baton_spool::now_ms();
        let mut state = self.lock();
        state.exhausted.retain(|_, (next, _)| *next > now);
        let open: Vec<&(Source, u32)> = pool
            .sources
            .iter()
            .filter(|(s, _)| !state.exhausted.contains_key(&s.name))
            .collect();
        if open.is_empty() {
            let earliest = state.exhausted.values().min_by_key(|(next, _)| *next);
            return Err(earliest.copied().unwrap_or((now + 1000, 0)));
        }
        Ok(Some(pick_source(&open)))
    }

    /// `source` reached its warm-up cap here until `next`: others of the pool send meanwhile.
    pub(super) fn exhaust(&self, source: String, next: u64, cap: u64) {
        self.lock().exhausted.insert(source, (next, cap));
    }

    /// Every waiting job (a destination found unreachable defers them all at once).
    pub(super) fn take_all(&self) -> Vec<Job> {
        self.lock().jobs.drain(..).collect()
    }
}

/// A source from the pool, at random by weight.
fn pick_source<'a>(sources: &[&'a (Source, u32)]) -> &'a Source {
    use rand::RngExt;
    let total: u32 = sources.iter().map(|(_, w)| w).sum();
    let mut ticket = rand::rng().random_range(0..total.max(1));
    for (source, weight) in sources {
        if ticket < *weight {
            return source;
        }
        ticket -= weight;
    }
    &sources[0].0
}

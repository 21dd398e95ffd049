//! Counters, peaks and busy slot time for `GET /stats`, and the recent-request
//! log for `GET /debug/requests`. Atomics on the hot path so gpusim is never
//! the bottleneck; the only locks taken per request are a read lock (per-user
//! counts) and a short push onto the request log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::content::Kind;

/// How many requests `/debug/requests` remembers.
pub const LOG_CAPACITY: usize = 1000;
/// Distinct `user` values counted one by one; beyond this they share [`OTHER_USERS`],
/// so a client inventing a user per request cannot grow memory without bound.
const MAX_USERS: usize = 10_000;
pub const OTHER_USERS: &str = "(other)";

/// Things `/stats` counts besides served requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Error500,
    Error429,
    Error400,
    Hung,
    Slow,
    InvalidOutput,
}

/// One line of `/debug/requests`.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLog {
    /// Unix time in milliseconds when the request arrived.
    pub arrived_at: u64,
    /// Unix time in milliseconds when the answer was decided.
    pub at: u64,
    pub user: Option<String>,
    pub kind: Option<&'static str>,
    pub traceparent: Option<String>,
    pub authorization_present: bool,
    /// `null` for a hung request: it never gets an answer.
    pub status: Option<u16>,
    /// The order in which this request got its slot (1 for the first since the
    /// server started); `null` if it never got one (refused, hung).
    pub slot_order: Option<u64>,
}

/// The body of `GET /stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub served: u64,
    pub errors_500: u64,
    pub errors_429: u64,
    pub errors_400: u64,
    pub hung: u64,
    pub slow: u64,
    pub invalid_outputs: u64,
    pub in_flight: i64,
    pub peak_in_flight: i64,
    /// Requests queued for a slot now (in the semaphore's FIFO queue).
    pub waiting: i64,
    pub busy_slots: i64,
    pub peak_busy_slots: i64,
    pub busy_slot_seconds: f64,
    pub slots: usize,
    pub uptime_seconds: f64,
    pub utilisation: f64,
    pub served_by_user: BTreeMap<String, u64>,
    pub served_by_kind: BTreeMap<&'static str, u64>,
}

pub struct Stats {
    served: AtomicU64,
    events: [AtomicU64; 6],
    in_flight: AtomicI64,
    peak_in_flight: AtomicI64,
    waiting: AtomicI64,
    busy_slots: AtomicI64,
    peak_busy_slots: AtomicI64,
    busy_nanos: AtomicU64,
    started: Mutex<Instant>,
    by_user: RwLock<HashMap<String, AtomicU64>>,
    by_kind: [AtomicU64; Kind::ALL.len()],
    log: Mutex<VecDeque<RequestLog>>,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

/// A poisoned lock only means another request panicked mid-update of a counter
/// map; the data is still usable, and the simulator must keep answering.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            served: AtomicU64::new(0),
            events: Default::default(),
            in_flight: AtomicI64::new(0),
            peak_in_flight: AtomicI64::new(0),
            waiting: AtomicI64::new(0),
            busy_slots: AtomicI64::new(0),
            peak_busy_slots: AtomicI64::new(0),
            busy_nanos: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
            by_user: RwLock::new(HashMap::new()),
            by_kind: Default::default(),
            log: Mutex::new(VecDeque::with_capacity(LOG_CAPACITY)),
        }
    }

    /// Counts a request in flight until the guard drops, which also happens
    /// when the client hangs up and axum drops the handler's future.
    pub fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts a request queued for a slot until the guard drops (it got its
    /// slot, or gave up waiting).
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    /// Counts a busy slot until the guard drops; its lifetime is added to busy slot time.
    pub fn busy(&self) -> Busy<'_> {
        let now = self.busy_slots.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_busy_slots.fetch_max(now, Ordering::Relaxed);
        Busy { stats: self, since: Instant::now() }
    }

    pub fn count(&self, e: Event) {
        self.events[e as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn served(&self, user: Option<&str>, kind: Kind) {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.by_kind[kind as usize].fetch_add(1, Ordering::Relaxed);
        let Some(user) = user else { return };
        {
            let users = self.by_user.read().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = users.get(user) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut users = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        let key = if users.len() < MAX_USERS || users.contains_key(user) { user } else { OTHER_USERS };
        users.entry(key.to_string()).or_default().fetch_add(1, Ordering::Relaxed);
    }

    pub fn record(&self, entry: RequestLog) {
        let mut log = lock(&self.log);
        if log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(entry);
    }

    /// The last `limit` requests, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<RequestLog> {
        let log = lock(&self.log);
        log.iter().skip(log.len().saturating_sub(limit)).cloned().collect()
    }

    /// Zero counters and busy time, restart the uptime clock. Peaks restart from
    /// what is in flight now, since those requests are still there.
    pub fn reset(&self) {
        self.served.store(0, Ordering::Relaxed);
        for c in self.events.iter().chain(self.by_kind.iter()) {
            c.store(0, Ordering::Relaxed);
        }
        self.busy_nanos.store(0, Ordering::Relaxed);
        self.peak_in_flight.store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
        self.peak_busy_slots.store(self.busy_slots.load(Ordering::Relaxed), Ordering::Relaxed);
        *lock(&self.started) = Instant::now();
        self.by_user.write().unwrap_or_else(|e| e.into_inner()).clear();
        lock(&self.log).clear();
    }

    pub fn snapshot(&self, slots: usize) -> Snapshot {
        let uptime = lock(&self.started).elapsed().as_secs_f64();
        let busy = self.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let ev = |e: Event| self.events[e as usize].load(Ordering::Relaxed);
        let capacity = slots as f64 * uptime;
        Snapshot {
            served: self.served.load(Ordering::Relaxed),
            errors_500: ev(Event::Error500),
            errors_429: ev(Event::Error429),
            errors_400: ev(Event::Error400),
            hung: ev(Event::Hung),
            slow: ev(Event::Slow),
            invalid_outputs: ev(Event::InvalidOutput),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            peak_in_flight: self.peak_in_flight.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
            busy_slots: self.busy_slots.load(Ordering::Relaxed),
            peak_busy_slots: self.peak_busy_slots.load(Ordering::Relaxed),
            busy_slot_seconds: busy,
            slots,
            uptime_seconds: uptime,
            utilisation: if capacity > 0.0 { busy / capacity } else { 0.0 },
            served_by_user: self
                .by_user
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(u, c)| (u.clone(), c.load(Ordering::Relaxed)))
                .collect(),
            served_by_kind: Kind::ALL
                .iter()
                .map(|k| (k.as_str(), self.by_kind[*k as usize].load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

pub struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Waiting<'a>(&'a Stats);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Busy<'a> {
    stats: &'a Stats,
    since: Instant,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.stats.busy_slots.fetch_sub(1, Ordering::Relaxed);
        let nanos = u64::try_from(self.since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.busy_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_and_release() {
        let s = Stats::new();
        {
            let _a = s.enter();
            let _b = s.enter();
            let _slot = s.busy();
            assert_eq!(s.snapshot(4).in_flight, 2);
            assert_eq!(s.snapshot(4).busy_slots, 1);
        }
        let snap = s.snapshot(4);
        assert_eq!((snap.in_flight, snap.peak_in_flight), (0, 2));
        assert_eq!((snap.busy_slots, snap.peak_busy_slots), (0, 1));
    }

    #[test]
    fn served_counts_by_user_and_kind_and_reset_zeroes() {
        let s = Stats::new();
        s.served(Some("DEV-1"), Kind::Proposal);
        s.served(Some("DEV-1"), Kind::Review);
        s.served(None, Kind::Interpretation);
        s.count(Event::Error429);
        let snap = s.snapshot(1);
        assert_eq!(snap.served, 3);
        assert_eq!(snap.errors_429, 1);
        assert_eq!(snap.served_by_user["DEV-1"], 2);
        assert_eq!(snap.served_by_kind["review"], 1);
        assert_eq!(snap.served_by_kind["text"], 0);
        s.reset();
        let snap = s.snapshot(1);
        assert_eq!((snap.served, snap.errors_429), (0, 0));
        assert!(snap.served_by_user.is_empty());
    }

    #[test]
    fn the_log_keeps_the_latest_entries() {
        let s = Stats::new();
        for i in 0..(LOG_CAPACITY + 5) {
            s.record(RequestLog {
                arrived_at: i as u64,
                at: i as u64,
                user: None,
                kind: None,
                traceparent: None,
                authorization_present: false,
                status: Some(200),
                slot_order: None,
            });
        }
        let all = s.recent(usize::MAX);
        assert_eq!(all.len(), LOG_CAPACITY);
        assert_eq!(all.last().map(|e| e.at), Some((LOG_CAPACITY + 4) as u64));
        assert_eq!(s.recent(2)[0].at, (LOG_CAPACITY + 3) as u64);
    }
}

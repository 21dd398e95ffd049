//! The circuit breaker around the GPU server: failsafe's state machine,
//! wrapped so the rest of the worker sees one small API.
//!
//! Failsafe counts failures (consecutive, or a success rate over a window) and
//! opens; we add what it lacks (see ../shared/crates.md): slow calls count as
//! failures (`call_verdict`), half-open admits one probe at a time
//! (`Admit::Probe`), every probe has its own timeout, and the state is
//! observable (a watch channel the consumer uses to pause deliberations, and
//! metrics/log lines on each transition). The fleet-wide part (shared open
//! state, one probe per fleet) lives in `fleet.rs`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use failsafe::backoff::{self, EqualJittered};
use failsafe::failure_policy::{self, ConsecutiveFailures, FailurePolicy, OrElse, SuccessRateOverTimeWindow};
use failsafe::{Instrument, StateMachine};
use tokio::sync::watch;

use crate::gpu::GpuError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> BreakerState {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Open after this many failures in a row.
    pub consecutive_failures: u32,
    /// Or when the success rate over `window` falls below this...
    pub required_success_rate: f64,
    /// ...with at least this many calls in the window.
    pub min_requests: u32,
    pub window: Duration,
    /// How long it stays open: jittered, growing from `open_min` to `open_max` while probes fail.
    pub open_min: Duration,
    pub open_max: Duration,
    /// A probe that takes longer than this failed (a hung probe cannot keep it half-open).
    pub probe_timeout: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            consecutive_failures: 5,
            required_success_rate: 0.5,
            min_requests: 10,
            window: Duration::from_secs(10),
            open_min: Duration::from_secs(2),
            open_max: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(5),
        }
    }
}

/// What one call's result means to the breaker (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallVerdict {
    Success,
    Failure,
    /// Not the server's health: a 4xx refusal, or a deadline that passed before sending.
    Ignored,
}

pub fn call_verdict(result: &Result<(), &GpuError>, elapsed: Duration) -> CallVerdict {
    match result {
        Ok(()) => CallVerdict::Success,
        Err(GpuError::Transient { .. }) => CallVerdict::Failure,
        Err(GpuError::Invalid { .. }) => CallVerdict::Ignored,
        Err(GpuError::BreakerOpen) => CallVerdict::Ignored,
        // The server answered; the answer was too big (one task's problem).
        Err(GpuError::Oversized { .. }) => CallVerdict::Ignored,
        // A call cut by the task's deadline after being in flight was a slow call.
        Err(GpuError::Deadline) if elapsed >= Duration::from_millis(100) => CallVerdict::Failure,
        Err(GpuError::Deadline) => CallVerdict::Ignored,
    }
}

/// Permission for one call.
pub enum Admit {
    Call,
    /// The one half-open probe; dropping it frees the probe slot.
    Probe(ProbeSlot),
    Reject,
}

pub struct ProbeSlot(Arc<AtomicBool>);

impl Drop for ProbeSlot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Transition hooks: failsafe calls these; we keep the state and tell the world.
pub trait TransitionObserver: Send + Sync {
    fn on_transition(&self, to: BreakerState);
}

struct Hooks {
    state: Arc<AtomicU8>,
    tx: watch::Sender<BreakerState>,
    observer: Arc<dyn TransitionObserver>,
}

impl Hooks {
    fn set(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.state.swap(to.to_u8(), Ordering::AcqRel));
        if from != to {
            match to {
                BreakerState::Open => {
                    tracing::warn!(message = "GPU circuit breaker opened.", from = from.as_str())
                }
                BreakerState::HalfOpen => tracing::info!(message = "GPU circuit breaker half-open; probing."),
                BreakerState::Closed => tracing::info!(message = "GPU circuit breaker closed."),
            }
            self.observer.on_transition(to);
            let _ = self.tx.send(to);
        }
    }
}

impl Instrument for Hooks {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.set(BreakerState::Closed);
    }
}

type Policy = OrElse<ConsecutiveFailures<EqualJittered>, SuccessRateOverTimeWindow<EqualJittered>>;

pub struct Breaker {
    machine: StateMachine<Policy, Hooks>,
    state: Arc<AtomicU8>,
    probing: Arc<AtomicBool>,
    /// Another replica holds the fleet's breaker open (set by `fleet.rs`).
    fleet_open: AtomicBool,
    rx: watch::Receiver<BreakerState>,
    pub settings: BreakerSettings,
}

impl Breaker {
    pub fn new(settings: BreakerSettings, observer: Arc<dyn TransitionObserver>) -> Breaker {
        // Equal jitter (half the period fixed, half random): full jitter may
        // draw 0 s and probe a failing server right after opening.
        let open = || backoff::equal_jittered(settings.open_min, settings.open_max);
        let policy = failure_policy::consecutive_failures(settings.consecutive_failures, open()).or_else(
            failure_policy::success_rate_over_time_window(
                settings.required_success_rate,
                settings.min_requests,
                settings.window,
                open(),
            ),
        );
        let state = Arc::new(AtomicU8::new(0));
        let (tx, rx) = watch::channel(BreakerState::Closed);
        let hooks = Hooks { state: state.clone(), tx, observer };
        Breaker {
            machine: StateMachine::new(policy, hooks),
            state,
            probing: Arc::new(AtomicBool::new(false)),
            fleet_open: AtomicBool::new(false),
            rx,
            settings,
        }
    }

    /// This replica's own state.
    pub fn local_state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// The state the fleet should act on: open when this replica or the fleet says so.
    pub fn state(&self) -> BreakerState {
        match self.local_state() {
            BreakerState::Closed if self.fleet_open.load(Ordering::Acquire) => BreakerState::Open,
            s => s,
        }
    }

    /// Changes of the local state (the consumer pauses deliberations on it).
    pub fn subscribe(&self) -> watch::Receiver<BreakerState> {
        self.rx.clone()
    }

    pub fn set_fleet_open(&self, open: bool) {
        self.fleet_open.store(open, Ordering::Release);
    }

    pub fn fleet_open(&self) -> bool {
        self.fleet_open.load(Ordering::Acquire)
    }

    /// Ask to call the server. Ordinary calls are refused unless closed; in
    /// half-open exactly one probe at a time is admitted.
    pub fn admit(&self) -> Admit {
        if self.local_state() == BreakerState::Closed && self.fleet_open() {
            return Admit::Reject;
        }
        if !self.machine.is_call_permitted() {
            return Admit::Reject;
        }
        match self.local_state() {
            BreakerState::Closed => Admit::Call,
            _ => match self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => Admit::Probe(ProbeSlot(self.probing.clone())),
                Err(_) => Admit::Reject,
            },
        }
    }

    /// May a task's call go to the GPU server now? Only while closed. Half-open
    /// probes belong to the fleet's prober alone (`fleet::sync_breaker`, under
    /// the fleet-wide probe lease), so a recovering server sees one probe from
    /// the whole fleet rather than one per replica.
    pub fn admit_call(&self) -> bool {
        matches!(self.admit(), Admit::Call)
    }

    /// Only a probe (half-open) is worth trying now: used by the prober.
    pub fn admit_probe(&self) -> Option<ProbeSlot> {
        match self.admit() {
            Admit::Probe(slot) => Some(slot),
            _ => None,
        }
    }

    pub fn record(&self, verdict: CallVerdict) {
        match verdict {
            CallVerdict::Success => self.machine.on_success(),
            CallVerdict::Failure => self.machine.on_error(),
            CallVerdict::Ignored => {}
        }
    }

    /// Another replica's probe succeeded: close without probing ourselves.
    pub fn reset(&self) {
        self.machine.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Quiet;
    impl TransitionObserver for Quiet {
        fn on_transition(&self, _: BreakerState) {}
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            required_success_rate: 0.5,
            min_requests: 100,
            window: Duration::from_secs(10),
            open_min: Duration::from_secs(2),
            open_max: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(1),
        }
    }

    fn transient() -> GpuError {
        GpuError::Transient { message: "503".into(), retry_after: None, timed_out: false }
    }

    #[test]
    fn verdicts() {
        let ms = Duration::from_millis;
        assert_eq!(call_verdict(&Ok(()), ms(5)), CallVerdict::Success);
        assert_eq!(call_verdict(&Err(&transient()), ms(5)), CallVerdict::Failure);
        let timeout = GpuError::Transient { message: "t".into(), retry_after: None, timed_out: true };
        assert_eq!(call_verdict(&Err(&timeout), ms(5)), CallVerdict::Failure);
        let refused = GpuError::Invalid { status: 400, message: String::new() };
        assert_eq!(call_verdict(&Err(&refused), ms(5)), CallVerdict::Ignored);
        assert_eq!(call_verdict(&Err(&GpuError::Deadline), ms(5000)), CallVerdict::Failure);
        assert_eq!(call_verdict(&Err(&GpuError::Deadline), ms(0)), CallVerdict::Ignored);
    }

    #[test]
    fn opens_on_consecutive_failures_then_probes_once_and_closes() {
        failsafe::clock::freeze(|clock| {
            let b = Breaker::new(settings(), Arc::new(Quiet));
            for _ in 0..2 {
                assert!(matches!(b.admit(), Admit::Call));
                b.record(CallVerdict::Failure);
            }
            assert_eq!(b.local_state(), BreakerState::Closed);
            b.record(CallVerdict::Failure);
            assert_eq!(b.local_state(), BreakerState::Open);
            assert!(matches!(b.admit(), Admit::Reject), "open rejects");

            clock.advance(Duration::from_secs(3));
            let probe = match b.admit() {
                Admit::Probe(p) => p,
                _ => panic!("half-open admits a probe"),
            };
            assert_eq!(b.local_state(), BreakerState::HalfOpen);
            assert!(matches!(b.admit(), Admit::Reject), "only one probe at a time");
            assert!(!b.admit_call(), "tasks never probe: the fleet's prober does");
            b.record(CallVerdict::Success);
            drop(probe);
            assert_eq!(b.local_state(), BreakerState::Closed);
            assert!(matches!(b.admit(), Admit::Call));
        });
    }

    #[test]
    fn failed_probe_reopens() {
        failsafe::clock::freeze(|clock| {
            let b = Breaker::new(settings(), Arc::new(Quiet));
            for _ in 0..3 {
                b.record(CallVerdict::Failure);
            }
            clock.advance(Duration::from_secs(3));
            assert!(!b.admit_call(), "half-open: no task call");
            let probe = b.admit_probe().expect("probe");
            // A hung probe ends by its own timeout and counts as a failure.
            b.record(CallVerdict::Failure);
            drop(probe);
            assert_eq!(b.local_state(), BreakerState::Open);
            assert!(matches!(b.admit(), Admit::Reject));
        });
    }

    #[test]
    fn refusals_do_not_count() {
        let b = Breaker::new(settings(), Arc::new(Quiet));
        for _ in 0..10 {
            b.record(CallVerdict::Ignored);
        }
        assert_eq!(b.local_state(), BreakerState::Closed);
    }

    #[test]
    fn fleet_open_rejects_and_reset_closes() {
        let b = Breaker::new(settings(), Arc::new(Quiet));
        b.set_fleet_open(true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.admit(), Admit::Reject));
        b.set_fleet_open(false);
        assert!(matches!(b.admit(), Admit::Call));
        for _ in 0..3 {
            b.record(CallVerdict::Failure);
        }
        b.reset();
        assert_eq!(b.local_state(), BreakerState::Closed);
    }
}

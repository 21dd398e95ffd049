//! The worker's consumers: *lanes*, each a consumer of one work queue with a
//! credit (prefetch) of its own, so that the two queues share the worker's
//! concurrency ([`crate::credit`] decides the shares; this module starts and
//! cancels the consumers and counts what each has in flight).
//!
//! A lane is started with `basic.qos(credit)` then `basic.consume` on its
//! kind's channel (the prefetch applies to consumers started after it), and is
//! cancelled with `basic.cancel`: what it delivered stays ours to finish and
//! ack on that channel, what it had buffered still comes out of its stream,
//! then the stream ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::Poll;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use lapin::types::ShortString;

use flota_shared::amqp::{self, Topology};
use flota_shared::envelope::Kind;

use crate::credit::{self, KindLoad, LaneId, Step};

struct Lane {
    id: LaneId,
    kind: Kind,
    tag: String,
    credit: u16,
    /// The kind's credit-1 lane, kept while the kind may be consumed, to see work arrive.
    base: bool,
    cancelled: bool,
    /// `None` once it ended (after its cancel) or was taken.
    stream: Option<lapin::Consumer>,
    in_flight: Arc<AtomicU16>,
}

/// Held by a task while its delivery is in flight; counts it in its lane.
pub struct InFlight(Arc<AtomicU16>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A delivery, the kind and channel it came on (the only one it can be acked
/// on), and its place in its lane's count.
pub struct Taken {
    pub kind: Kind,
    pub delivery: Delivery,
    pub channel: lapin::Channel,
    pub in_flight: InFlight,
}

pub struct Lanes {
    topo: Topology,
    worker_id: String,
    /// One channel per kind: its lanes' deliveries are acked on it.
    channels: [lapin::Channel; 2],
    lanes: Vec<Lane>,
    next_id: LaneId,
    /// Per kind, the most in flight at once since the last window.
    peak: [u16; 2],
    /// Where the next poll starts, so that no lane is always polled first.
    turn: usize,
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Interpret => 0,
        Kind::Deliberate => 1,
    }
}

impl Lanes {
    pub fn new(
        topo: &Topology,
        worker_id: &str,
        interpret: lapin::Channel,
        deliberate: lapin::Channel,
    ) -> Lanes {
        Lanes {
            topo: topo.clone(),
            worker_id: worker_id.to_string(),
            channels: [interpret, deliberate],
            lanes: Vec::new(),
            next_id: 0,
            peak: [0; 2],
            turn: 0,
        }
    }

    /// Start a lane of `kind` with `credit`.
    pub async fn add(&mut self, kind: Kind, credit: u16, base: bool) -> lapin::Result<()> {
        let id = self.next_id;
        self.next_id += 1;
        let tag = format!("{}-{}-{id}", self.worker_id, kind.as_str());
        let (channel, queue) = (&self.channels[slot(kind)], self.topo.work_queue(kind));
        let stream = amqp::consume_with_prefetch(channel, &queue, &tag, credit).await?;
        let in_flight = Arc::new(AtomicU16::new(0));
        self.lanes.push(Lane {
            id,
            kind,
            tag,
            credit,
            base,
            cancelled: false,
            stream: Some(stream),
            in_flight,
        });
        Ok(())
    }

    /// Start the base lanes (deliberations only when `deliberations`), then give
    /// interpretations the rest of the concurrency, as if they were saturated.
    pub async fn start(&mut self, concurrency: u16, deliberations: bool) -> lapin::Result<()> {
        self.add(Kind::Interpret, 1, true).await?;
        if deliberations {
            self.add(Kind::Deliberate, 1, true).await?;
        }
        let mut interpret = self.load(Kind::Interpret, true);
        interpret.peak = interpret.credit();
        let deliberate = self.load(Kind::Deliberate, deliberations);
        for step in credit::plan(concurrency, 0, &interpret, &deliberate) {
            self.apply(step).await?;
        }
        Ok(())
    }

    /// Follow the credit plan for this window, then open the next one.
    pub async fn rebalance(&mut self, concurrency: u16, deliberations: bool) -> lapin::Result<()> {
        let interpret = self.load(Kind::Interpret, true);
        let deliberate = self.load(Kind::Deliberate, deliberations);
        let steps = credit::plan(concurrency, self.draining(), &interpret, &deliberate);
        if !steps.is_empty() {
            tracing::debug!(
                message = "Sharing the prefetch anew.",
                interpret = interpret.credit(),
                interpret_peak = interpret.peak,
                deliberate = deliberate.credit(),
                deliberate_peak = deliberate.peak,
                steps = ?steps
            );
        }
        for step in steps {
            self.apply(step).await?;
        }
        self.lanes
            .retain(|l| !(l.cancelled && l.stream.is_none() && l.in_flight.load(Ordering::Acquire) == 0));
        for kind in Kind::ALL {
            self.peak[slot(kind)] = self.in_flight(kind);
        }
        Ok(())
    }

    async fn apply(&mut self, step: Step) -> lapin::Result<()> {
        match step {
            Step::Add(kind, credit) => self.add(kind, credit, false).await,
            Step::Cancel(id) => self.cancel(id).await,
        }
    }

    /// Cancel one lane; its stream yields what it had buffered, then ends.
    async fn cancel(&mut self, id: LaneId) -> lapin::Result<()> {
        let Some(lane) = self.lanes.iter_mut().find(|l| l.id == id && !l.cancelled) else {
            return Ok(());
        };
        lane.cancelled = true;
        let channel = &self.channels[slot(lane.kind)];
        channel.basic_cancel(ShortString::from(lane.tag.clone()), BasicCancelOptions::default()).await
    }

    /// Cancel every lane of `kind` and take their streams, for the caller to
    /// take out what they buffered ([`flota_shared::acks::take_buffered`]).
    pub async fn cancel_kind(&mut self, kind: Kind) -> lapin::Result<Vec<lapin::Consumer>> {
        let ids: Vec<LaneId> =
            self.lanes.iter().filter(|l| l.kind == kind && !l.cancelled).map(|l| l.id).collect();
        for id in ids {
            self.cancel(id).await?;
        }
        Ok(self.lanes.iter_mut().filter(|l| l.kind == kind).filter_map(|l| l.stream.take()).collect())
    }

    /// Cancel every lane (the drain); errors are the channel's, which closes anyway.
    pub async fn cancel_all(&mut self) {
        let ids: Vec<LaneId> = self.lanes.iter().filter(|l| !l.cancelled).map(|l| l.id).collect();
        for id in ids {
            let _ = self.cancel(id).await;
        }
    }

    /// The prefetch of `kind`'s active lanes.
    pub fn credit(&self, kind: Kind) -> u16 {
        self.lanes.iter().filter(|l| l.kind == kind && !l.cancelled).map(|l| l.credit).sum()
    }

    /// Whether `kind` is being consumed (has a lane not cancelled).
    pub fn consuming(&self, kind: Kind) -> bool {
        self.lanes.iter().any(|l| l.kind == kind && !l.cancelled)
    }

    /// The next delivery of any lane; pending while there is none. An error: a
    /// lane failed, or ended without our cancel (the broker cancelled it: its
    /// queue was deleted).
    pub async fn next(&mut self) -> Result<Taken, String> {
        std::future::poll_fn(|cx| {
            let n = self.lanes.len();
            self.turn = self.turn.wrapping_add(1);
            for k in 0..n {
                let i = (self.turn + k) % n;
                let Some(stream) = self.lanes[i].stream.as_mut() else { continue };
                match stream.poll_next_unpin(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Some(Ok(delivery))) => return Poll::Ready(Ok(self.take(i, delivery))),
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(format!("consumer error: {e}"))),
                    Poll::Ready(None) if self.lanes[i].cancelled => self.lanes[i].stream = None,
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(format!("consumer {} ended", self.lanes[i].tag)));
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    fn take(&mut self, i: usize, delivery: Delivery) -> Taken {
        let lane = &self.lanes[i];
        lane.in_flight.fetch_add(1, Ordering::AcqRel);
        let (kind, in_flight) = (lane.kind, InFlight(lane.in_flight.clone()));
        let now = self.in_flight(kind);
        let peak = &mut self.peak[slot(kind)];
        *peak = (*peak).max(now);
        Taken { kind, delivery, channel: self.channels[slot(kind)].clone(), in_flight }
    }

    fn in_flight(&self, kind: Kind) -> u16 {
        self.lanes.iter().filter(|l| l.kind == kind).map(|l| l.in_flight.load(Ordering::Acquire)).sum()
    }

    /// What cancelled lanes still have in flight.
    fn draining(&self) -> u16 {
        self.lanes.iter().filter(|l| l.cancelled).map(|l| l.in_flight.load(Ordering::Acquire)).sum()
    }

    fn load(&self, kind: Kind, available: bool) -> KindLoad {
        let active = || self.lanes.iter().filter(move |l| l.kind == kind && !l.cancelled);
        KindLoad {
            available,
            base: active().filter(|l| l.base).map(|l| l.credit).sum(),
            lanes: active().filter(|l| !l.base).map(|l| (l.id, l.credit)).collect(),
            peak: self.peak[slot(kind)],
        }
    }
}

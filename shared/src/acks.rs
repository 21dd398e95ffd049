//! Acks that do not wait on lapin, batched per channel.
//!
//! `lapin::Acker::ack().await` costs two thread hops per delivery: through
//! lapin's internal RPC, then a wake-up once lapin's I/O thread has written
//! the frame. On a fleet that waits on a GPU every hop is a wake-up of its
//! own, and they were a large share of the CPU each task costs. Here an ack
//! is queued on its channel and the caller goes on; runs of settled
//! deliveries are covered by one `multiple` ack.
//!
//! Nothing is acked earlier than before: a delivery is marked ready only
//! after whatever its decision published was confirmed. An ack that never
//! reaches the broker (the connection dies first) means a redelivery, which
//! every handler answers from the store: the same as an ack that failed.
//!
//! The bookkeeping ([`AckLedger`]) is pure; [`AckBatcher`] is its I/O edge.
//! [`defer_buffered`] settles what a cancelled consumer still holds.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::amqp::{Holding, Publisher};

/// One ack frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckFrame {
    /// This delivery tag alone.
    Single(u64),
    /// Every delivery up to and including this tag not yet settled on the broker.
    UpTo(u64),
}

/// Which deliveries of one channel may be acked, and with which frames.
///
/// A `multiple` ack settles every delivery at or below its tag, so it may
/// cover only tags that are ready or already settled: never one still being
/// worked on, nor one whose nack is not yet sent. Delivery tags of a channel
/// grow by one per delivery, starting at 1.
#[derive(Debug, Default)]
pub struct AckLedger {
    /// Delivered, not yet ready to ack nor nacked.
    unsettled: BTreeSet<u64>,
    /// Ready to ack, no frame sent yet.
    ready: BTreeSet<u64>,
}

impl AckLedger {
    /// A delivery arrived. Call before anything can settle it.
    pub fn delivered(&mut self, tag: u64) {
        self.unsettled.insert(tag);
    }

    /// The delivery may be acked. A tag that is not unsettled (unknown, or
    /// already settled) is ignored, so no tag is ever acked twice.
    pub fn ready(&mut self, tag: u64) -> bool {
        let known = self.unsettled.remove(&tag);
        if known {
            self.ready.insert(tag);
        }
        known
    }

    /// The delivery was settled by other means (its nack was sent): it no
    /// longer holds back a `multiple` ack.
    pub fn settled_otherwise(&mut self, tag: u64) {
        self.unsettled.remove(&tag);
    }

    /// How many acks wait for a frame.
    pub fn pending(&self) -> usize {
        self.ready.len()
    }

    /// The frames that ack every ready delivery, and forget them: one
    /// `multiple` ack for the ready tags below the lowest unsettled one, a
    /// single ack for each ready tag above it.
    pub fn take_frames(&mut self) -> Vec<AckFrame> {
        let ready = std::mem::take(&mut self.ready);
        let (below, above): (Vec<u64>, Vec<u64>) = match self.unsettled.first() {
            Some(&floor) => ready.into_iter().partition(|&t| t < floor),
            None => (ready.into_iter().collect(), Vec::new()),
        };
        let mut frames = Vec::with_capacity(1 + above.len());
        match below.as_slice() {
            [] => {}
            [one] => frames.push(AckFrame::Single(*one)),
            [.., last] => frames.push(AckFrame::UpTo(*last)),
        }
        frames.extend(above.into_iter().map(AckFrame::Single));
        frames
    }
}

/// Acks one channel's deliveries through an [`AckLedger`]. Clones share it.
///
/// Every delivery must be registered with [`delivered`](Self::delivered)
/// before it is handed on, and then either acked here or nacked here. The
/// channel must carry one consumer for its whole life: deliveries a cancelled
/// consumer had buffered are never seen, so a later `multiple` ack would
/// settle them unprocessed.
#[derive(Clone)]
pub struct AckBatcher {
    inner: Arc<Inner>,
}

struct Inner {
    channel: lapin::Channel,
    ledger: Mutex<AckLedger>,
    wake: Notify,
    window: Duration,
}

/// With this many acks waiting, they go at once rather than at the window's end.
pub const FLUSH_AT: usize = 128;

impl AckBatcher {
    /// `window`: how long ready acks may wait for more to join them. It delays
    /// the broker's view only, so it suits consumers whose prefetch is well
    /// above what they hold at once: a delayed ack holds a prefetch slot.
    pub fn new(channel: lapin::Channel, window: Duration) -> AckBatcher {
        AckBatcher {
            inner: Arc::new(Inner { channel, ledger: Mutex::default(), wake: Notify::new(), window }),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, AckLedger> {
        // The ledger's invariants hold between its calls; a panic cannot leave it torn.
        self.inner.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn delivered(&self, delivery: &Delivery) {
        self.ledger().delivered(delivery.delivery_tag);
    }

    /// Ack once [`run`](Self::run) next sends; the caller does not wait for lapin.
    pub fn ack(&self, delivery: &Delivery) {
        let pending = {
            let mut ledger = self.ledger();
            ledger.ready(delivery.delivery_tag);
            ledger.pending()
        };
        if pending >= FLUSH_AT {
            self.flush();
        } else {
            self.inner.wake.notify_one();
        }
    }

    /// Nack now and wait until the frame is written, then let later acks cover
    /// this tag (a `multiple` ack sent before the nack would have acked it).
    pub async fn nack(&self, delivery: &Delivery, requeue: bool) -> lapin::Result<bool> {
        let sent = delivery.acker.nack(BasicNackOptions { requeue, ..Default::default() }).await;
        // Nothing new to send: acks waiting above this tag already woke `run`.
        self.ledger().settled_otherwise(delivery.delivery_tag);
        sent
    }

    /// Send the frames for every ready ack now.
    pub fn flush(&self) {
        let frames = self.ledger().take_frames();
        for frame in frames {
            let (tag, multiple) = match frame {
                AckFrame::Single(tag) => (tag, false),
                AckFrame::UpTo(tag) => (tag, true),
            };
            if let Err(e) = send_detached(&self.inner.channel, tag, multiple) {
                // The channel is gone: the broker redelivers, the store answers.
                tracing::warn!(message = "Ack not sent; the broker will redeliver.", delivery_tag = tag, multiple, error = %e);
            }
        }
    }

    /// Send ready acks until `stop`, then once more. Run it beside the consumer
    /// and stop it after the last delivery is settled, so the drain's acks go too.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = stop.cancelled() => break,
            }
            if self.ledger().pending() == 0 {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.inner.window) => {}
                _ = stop.cancelled() => break,
            }
            self.flush();
        }
        self.flush();
    }
}

/// How long a cancelled consumer may take to hand over its buffer. It is
/// complete when the cancel returns, so this bounds only a broken channel.
const HAND_BACK_WITHIN: Duration = Duration::from_secs(5);

/// What a consumer had buffered but nobody took, once `basic_cancel` for it has
/// returned. lapin queues a consumer's deliveries as they arrive, whether or not
/// its stream is polled; dropping the consumer drops them too, and they stay
/// unacked on the channel until it closes. After `basic.cancel-ok` the stream
/// yields what it buffered, then ends, so this does not wait.
pub async fn take_buffered(mut consumer: lapin::Consumer) -> Vec<Delivery> {
    let mut buffered = Vec::new();
    let drain = async {
        // An error means the channel failed: its deliveries go back with it.
        while let Some(Ok(delivery)) = consumer.next().await {
            buffered.push(delivery);
        }
    };
    let _ = tokio::time::timeout(HAND_BACK_WITHIN, drain).await;
    buffered
}

/// Send the deliveries a cancelled consumer had buffered ([`take_buffered`]) to
/// `delay_queue` (a delay tier that dead-letters them back to their work queue),
/// unchanged, and ack each once the broker confirmed its copy; returns how many.
///
/// Not nack-requeue for all: that spends one of the quorum queue's `x-delivery-limit`
/// deliveries, and the worker cancels its deliberation consumer every time the
/// GPU breaker opens: under a flapping breaker the same never-started
/// deliberations would bounce until the broker dead-letters them, with no
/// result and no reason of Flota's. A copy is a new message; waiting never
/// spends a delivery.
///
/// Each copy waits for its confirm as long as its delivery is held, like a
/// result ([`Holding`]): a resource alarm only delays it. A
/// copy is handed back (nack-requeue) only when the broker refused it, or
/// `give_up` is cancelled first (the worker's drain is over), or the
/// delivery's channel closed (then the broker has it back already).
pub async fn defer(
    deliveries: Vec<Delivery>,
    channel: &lapin::Channel,
    publisher: &Publisher,
    delay_queue: &str,
    give_up: &CancellationToken,
) -> usize {
    let hold = &Holding { publisher, give_up, channel };
    let settle = deliveries.into_iter().map(|delivery| async move {
        match hold.publish("", delay_queue, &delivery.data, delivery.properties.clone()).await {
            Ok(()) => ack_detached(channel, &delivery).is_ok(),
            Err(_) => {
                let requeue = BasicNackOptions { requeue: true, ..Default::default() };
                let _ = delivery.acker.nack(requeue).await;
                false
            }
        }
    });
    futures::future::join_all(settle).await.into_iter().filter(|deferred| *deferred).count()
}

/// [`take_buffered`], then [`defer`] what it took.
pub async fn defer_buffered(
    consumer: lapin::Consumer,
    channel: &lapin::Channel,
    publisher: &Publisher,
    delay_queue: &str,
    give_up: &CancellationToken,
) -> usize {
    defer(take_buffered(consumer).await, channel, publisher, delay_queue, give_up).await
}

/// Ack one delivery without waiting for lapin: for consumers that cannot
/// batch (see [`AckBatcher::new`]). `channel` must be the one it came on.
pub fn ack_detached(channel: &lapin::Channel, delivery: &Delivery) -> lapin::Result<()> {
    send_detached(channel, delivery.delivery_tag, false)
}

/// Queue an ack frame on the channel and return without waiting for lapin's
/// I/O thread to write it. `Channel::basic_ack` puts the frame in the
/// channel's queue when first polled, then waits for the write; polling it
/// once with a waker that does nothing and dropping it skips that wait and the
/// wake-up it would cost. An error known at once (a closed channel) is returned.
fn send_detached(channel: &lapin::Channel, tag: u64, multiple: bool) -> lapin::Result<()> {
    let mut send = std::pin::pin!(channel.basic_ack(tag, BasicAckOptions { multiple }));
    match send.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result,
        Poll::Pending => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger_with(tags: std::ops::RangeInclusive<u64>) -> AckLedger {
        let mut ledger = AckLedger::default();
        for t in tags {
            ledger.delivered(t);
        }
        ledger
    }

    #[test]
    fn a_run_of_ready_tags_is_one_multiple_ack() {
        let mut ledger = ledger_with(1..=4);
        for t in 1..=4 {
            ledger.ready(t);
        }
        assert_eq!(ledger.take_frames(), vec![AckFrame::UpTo(4)]);
        assert_eq!(ledger.pending(), 0);
    }

    #[test]
    fn one_ready_tag_is_a_single_ack() {
        let mut ledger = ledger_with(1..=2);
        ledger.ready(1);
        assert_eq!(ledger.take_frames(), vec![AckFrame::Single(1)]);
    }

    #[test]
    fn a_tag_still_being_worked_on_is_never_covered() {
        let mut ledger = ledger_with(1..=5);
        for t in [1, 2, 4, 5] {
            ledger.ready(t);
        }
        // 3 is unsettled: a multiple ack may go up to 2 only; 4 and 5 go alone.
        assert_eq!(ledger.take_frames(), vec![AckFrame::UpTo(2), AckFrame::Single(4), AckFrame::Single(5)]);
        ledger.ready(3);
        assert_eq!(ledger.take_frames(), vec![AckFrame::Single(3)]);
    }

    #[test]
    fn a_nacked_tag_stops_holding_back_once_its_nack_is_sent() {
        let mut ledger = ledger_with(1..=3);
        ledger.ready(1);
        ledger.ready(3);
        assert_eq!(ledger.take_frames(), vec![AckFrame::Single(1), AckFrame::Single(3)]);
        let mut ledger = ledger_with(1..=3);
        ledger.settled_otherwise(2);
        ledger.ready(1);
        ledger.ready(3);
        // 2 was nacked already: covering it settles nothing twice.
        assert_eq!(ledger.take_frames(), vec![AckFrame::UpTo(3)]);
    }

    #[test]
    fn no_tag_is_acked_twice_nor_one_never_delivered() {
        let mut ledger = ledger_with(1..=2);
        assert!(ledger.ready(1));
        assert!(!ledger.ready(1));
        assert!(!ledger.ready(9));
        assert_eq!(ledger.take_frames(), vec![AckFrame::Single(1)]);
        assert!(!ledger.ready(1));
        assert_eq!(ledger.take_frames(), vec![]);
    }

    #[test]
    fn acks_already_sent_below_a_later_run_are_not_resent() {
        let mut ledger = ledger_with(1..=6);
        for t in 1..=3 {
            ledger.ready(t);
        }
        assert_eq!(ledger.take_frames(), vec![AckFrame::UpTo(3)]);
        for t in 4..=6 {
            ledger.ready(t);
        }
        assert_eq!(ledger.take_frames(), vec![AckFrame::UpTo(6)]);
    }
}

//! How a worker shares its `FLOTA_CONCURRENCY` (its prefetch) between its two
//! queues: pure decisions, no I/O.
//!
//! RabbitMQ's prefetch is per consumer (quorum queues have no channel-wide
//! QoS) and fixed when the consumer starts. Giving each queue's consumer the
//! whole concurrency let a worker hold twice that many deliveries unacked with
//! both queues backed up, half of them waiting for a free slot while another
//! replica sat idle: the hoarding Celery users know from its prefetch.
//!
//! So each queue is consumed through *lanes*: consumers of their own, each
//! with a small credit (prefetch). A kind always keeps a base lane of credit 1
//! while it may be consumed, to see work arrive; it grows by adding lanes and
//! shrinks by cancelling them (their deliveries finish, no more come). A kind
//! is *saturated* when its deliveries in flight reached its credit in the last
//! window: it could take more. The split follows from that:
//! - one kind available (deliberations pause while the breaker is open): it
//!   gets the whole concurrency;
//! - one kind saturated, the other not: the other keeps what it uses plus one
//!   (its headroom to show that it grows), or a little more within the slack
//!   (an eighth of the concurrency) so that small changes cause no churn; the
//!   saturated one gets everything the other does not use. What the other
//!   keeps and does not use is what a worker may hold beyond the concurrency:
//!   a delivery arriving there waits for a slot, and the next tick finds both
//!   kinds saturated;
//! - both saturated: each moves toward half.
//!
//! What a worker holds unacked is therefore at most `FLOTA_CONCURRENCY` plus
//! the slack (`FLOTA_CONCURRENCY / 8`, at least 1: 36 at 32, 5 at 4), and at
//! most `FLOTA_CONCURRENCY` while both kinds are saturated; what it runs is at
//! most `FLOTA_CONCURRENCY` (the consumer's semaphore). Holding a few more
//! rather than fewer is on purpose: the mixed bench showed a backlogged kind
//! kept a fifth of the slots from its work when it got only what the other
//! kept, used or not.

use flota_shared::envelope::Kind;

/// A consumer of one queue with a credit of its own.
pub type LaneId = u64;

/// One kind's lanes and load, as the consumer loop sees them at a tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindLoad {
    /// Whether the kind may be consumed now (deliberations: the breaker is closed).
    pub available: bool,
    /// The credit of its base lane (1 when available).
    pub base: u16,
    /// Its other active lanes and their credit.
    pub lanes: Vec<(LaneId, u16)>,
    /// The most of its deliveries in flight at once since the last tick (the
    /// cancelled lanes' too).
    pub peak: u16,
}

impl KindLoad {
    pub fn credit(&self) -> u16 {
        self.base + self.lanes.iter().map(|(_, c)| c).sum::<u16>()
    }

    fn saturated(&self) -> bool {
        self.available && self.peak >= self.credit()
    }
}

/// What the consumer loop does to follow the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Cancel this lane: its deliveries in flight finish, no more come.
    Cancel(LaneId),
    /// Start a lane of this kind with this credit.
    Add(Kind, u16),
}

/// The steps that move each kind's credit toward its share.
///
/// `draining` is what the cancelled lanes still have in flight: it counts
/// against the concurrency until it is done, so a lane is added only into
/// room that is really free.
pub fn plan(concurrency: u16, draining: u16, interpret: &KindLoad, deliberate: &KindLoad) -> Vec<Step> {
    let c = concurrency.max(1);
    let loads = [(Kind::Interpret, interpret), (Kind::Deliberate, deliberate)];
    let targets = targets(c, interpret, deliberate);
    let slack = eighth(c);
    let mut steps = Vec::new();

    // Shrink first: what a cancelled lane had in flight stays counted in `draining`.
    // Within the slack only a kind with nothing in flight shrinks (it costs nothing).
    for ((_, load), target) in loads.iter().zip(targets) {
        let credit = load.credit();
        if credit >= target + slack || (load.peak == 0 && credit > target) {
            steps.extend(cancellations(load, target, slack).into_iter().map(Step::Cancel));
        }
    }

    // Then grow into the room left: the concurrency, and beside a saturated kind what
    // the other keeps and does not use (its headroom of one, and within the slack).
    let both = interpret.available && deliberate.available;
    let capacity = if both { (targets[0] + targets[1]).clamp(c, c + slack) } else { c };
    let active: u16 = loads.iter().map(|(_, l)| l.credit()).sum();
    let mut room = capacity.saturating_sub(active).saturating_sub(draining);
    let deficits: Vec<u16> =
        loads.iter().zip(targets).map(|((_, l), t)| t.saturating_sub(l.credit())).collect();
    let wanting = deficits.iter().filter(|d| **d > 0).count() as u16;
    let grain = eighth(c);
    let mut grants = [0u16; 2];
    if let Some(share) = room.checked_div(wanting) {
        // An even share of the room first, then what one kind leaves to the other.
        for (g, d) in grants.iter_mut().zip(&deficits) {
            *g = (*d).min(share);
            room -= *g;
        }
        for (g, d) in grants.iter_mut().zip(&deficits) {
            let more = (d - *g).min(room);
            *g += more;
            room -= more;
        }
    }
    for (((kind, _), deficit), grant) in loads.iter().zip(&deficits).zip(grants) {
        // No lanes of crumbs while draining will free more: wait for room for a grain
        // (or the whole deficit). With nothing draining, waiting would free nothing.
        if grant == 0 || (draining > 0 && grant < (*deficit).min(grain)) {
            continue;
        }
        let mut left = grant;
        while left > 0 {
            let lane = left.min(grain);
            steps.push(Step::Add(*kind, lane));
            left -= lane;
        }
    }
    steps
}

/// An eighth of the concurrency, at least 1: the size of a lane added (the
/// grain) and how far a share may sit from its target before lanes are
/// cancelled (the slack).
fn eighth(c: u16) -> u16 {
    (c / 8).max(1)
}

/// Each kind's share of the concurrency (0 for a kind that may not be consumed).
fn targets(c: u16, interpret: &KindLoad, deliberate: &KindLoad) -> [u16; 2] {
    match (interpret.available, deliberate.available) {
        (false, false) => [0, 0],
        (true, false) => [c, 0],
        (false, true) => [0, c],
        (true, true) => match (interpret.saturated(), deliberate.saturated()) {
            (false, false) => [interpret.credit(), deliberate.credit()],
            (true, false) => {
                let (busy, idle) = busy_and_idle(c, interpret, deliberate);
                [busy, idle]
            }
            (false, true) => {
                let (busy, idle) = busy_and_idle(c, deliberate, interpret);
                [idle, busy]
            }
            (true, true) => both_saturated(c, interpret.credit(), deliberate.credit()),
        },
    }
}

/// Both saturated: each moves toward half, a kind below its half at most
/// doubling (or a grain) a window, so that one deliberation arriving takes a
/// little from the interpretations, not half at once; the kind above its half
/// gives back only what the other takes.
fn both_saturated(c: u16, interpret: u16, deliberate: u16) -> [u16; 2] {
    let halves = [c - c / 2, (c / 2).max(1)];
    let grain = eighth(c);
    let credits = [interpret, deliberate];
    let mut t = [0u16; 2];
    for k in 0..2 {
        t[k] = if credits[k] < halves[k] {
            halves[k].min((2 * credits[k]).max(credits[k] + grain))
        } else {
            credits[k]
        };
    }
    // A kind above its half gives back what the other takes. Both can be above their
    // halves, by the slack at most, when the busy one had borrowed the other's unused share.
    for k in 0..2 {
        if t[0] + t[1] > c && t[k] > halves[k] {
            t[k] = c.saturating_sub(t[1 - k]).max(halves[k]);
        }
    }
    t
}

/// One kind saturated, the other not: the other keeps what it used plus one
/// (or its credit, when that is within the slack and it is in use), the
/// saturated one all but what the other used, and never less than it has.
/// The two may sum to more than the concurrency, by the slack at most. A kind with nothing in
/// flight keeps only its base lane, or one deliberation that came and went
/// would keep a grain from the interpretations for good.
fn busy_and_idle(c: u16, busy: &KindLoad, idle: &KindLoad) -> (u16, u16) {
    let used = idle.peak + 1;
    let slack = eighth(c);
    let idle_share = if idle.credit() >= used + slack || idle.peak == 0 { used } else { idle.credit() };
    // The busy kind gets what the other really used, not what it keeps: the other's
    // headroom and what it keeps within the slack would otherwise stand idle while
    // the busy kind's work waits (in the mixed bench, a fifth of the deliberations'
    // slots). A burst of the other kind into them is what a worker may hold beyond
    // the concurrency, until the next tick finds both saturated.
    (c.saturating_sub(idle.peak).max(busy.credit()), idle_share)
}

/// Lanes to cancel to bring `load` down to `target`: the largest that still
/// leave at least `target`; then, if more than the slack is left over, the
/// smallest one left (the kind dips below its share for a while and grows back
/// as room frees). The base lane is never cancelled here.
fn cancellations(load: &KindLoad, target: u16, slack: u16) -> Vec<LaneId> {
    let mut lanes = load.lanes.clone();
    lanes.sort_by_key(|(id, credit)| (std::cmp::Reverse(*credit), *id));
    let mut credit = load.credit();
    let mut cancel = Vec::new();
    lanes.retain(|(id, lane)| {
        if credit - lane >= target {
            credit -= lane;
            cancel.push(*id);
            false
        } else {
            true
        }
    });
    if credit >= target + slack
        && let Some((id, _)) = lanes.iter().min_by_key(|(id, credit)| (*credit, *id))
    {
        cancel.push(*id);
    }
    cancel
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(available: bool, lanes: &[u16], peak: u16) -> KindLoad {
        KindLoad {
            available,
            base: u16::from(available),
            lanes: lanes
                .iter()
                .enumerate()
                .map(|(i, c)| (i as LaneId + 100 * lanes.len() as u64, *c))
                .collect(),
            peak,
        }
    }

    fn added(steps: &[Step], kind: Kind) -> u16 {
        steps.iter().map(|s| if let Step::Add(k, c) = s { if *k == kind { *c } else { 0 } } else { 0 }).sum()
    }

    fn cancelled(steps: &[Step]) -> usize {
        steps.iter().filter(|s| matches!(s, Step::Cancel(_))).count()
    }

    /// Apply a plan to loads, as the consumer would; cancelled lanes' in-flight go to draining.
    fn credit_after(before: &KindLoad, steps: &[Step], kind: Kind) -> u16 {
        let kept: u16 =
            before.lanes.iter().filter(|(id, _)| !steps.contains(&Step::Cancel(*id))).map(|(_, c)| c).sum();
        before.base + kept + added(steps, kind)
    }

    #[test]
    fn at_start_interpretations_get_the_whole_concurrency_beside_the_idle_base() {
        // Base lanes only; interpretations arriving fill theirs.
        let steps = plan(32, 0, &load(true, &[], 1), &load(true, &[], 0));
        assert_eq!(added(&steps, Kind::Interpret), 31, "{steps:?}");
        assert_eq!(added(&steps, Kind::Deliberate), 0);
        assert!(steps.iter().all(|s| matches!(s, Step::Add(_, c) if *c <= 4)), "lanes of a grain: {steps:?}");
    }

    #[test]
    fn a_saturated_kind_alone_keeps_the_concurrency_and_nothing_changes() {
        let interpret = load(true, &[4, 4, 4, 4, 4, 4, 4, 3], 32);
        assert_eq!(interpret.credit(), 32);
        assert_eq!(plan(32, 0, &interpret, &load(true, &[], 0)), vec![]);
        // Below its credit for a moment (between an ack and the next delivery): no churn either.
        assert_eq!(plan(32, 0, &load(true, &[4, 4, 4, 4, 4, 4, 4, 3], 30), &load(true, &[], 0)), vec![]);
    }

    #[test]
    fn both_saturated_move_toward_half_each_and_hold_no_more_than_the_concurrency() {
        // One deliberation arrives while interpretations hold everything: they give back a grain
        // (a lane is cancelled), and the deliberations grow into it once it drained.
        let interpret = load(true, &[4, 4, 4, 4, 4, 4, 4, 3], 32);
        let deliberate = load(true, &[], 1);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert_eq!(credit_after(&interpret, &steps, Kind::Interpret), 28, "{steps:?}");
        assert_eq!(added(&steps, Kind::Deliberate), 0, "no room until the cancelled lane drains");
        let interpret = load(true, &[4, 4, 4, 4, 4, 4, 3], 28);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert_eq!(added(&steps, Kind::Deliberate), 3, "{steps:?}");
        // Still saturated at 4: doubling; the interpretations give back what that takes.
        let deliberate = load(true, &[3], 4);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert_eq!(credit_after(&interpret, &steps, Kind::Interpret), 24, "{steps:?}");
        // At half each, it stays there, holding the concurrency and no more.
        let (interpret, deliberate) = (load(true, &[4, 4, 4, 3], 16), load(true, &[4, 4, 4, 3], 16));
        assert_eq!(plan(32, 0, &interpret, &deliberate), vec![]);
        // With lanes draining, a kind below its half grows only into what is really free, and
        // by a grain at least: 1 free of 10 draining is left for later, 5 free are taken.
        let deliberate = load(true, &[4], 5);
        assert_eq!(plan(32, 10, &interpret, &deliberate), vec![]);
        let steps = plan(32, 6, &interpret, &deliberate);
        assert_eq!(added(&steps, Kind::Deliberate), 32 - 16 - 5 - 6, "{steps:?}");
    }

    #[test]
    fn a_kind_that_stopped_using_its_share_gives_it_back() {
        // Deliberations use 2 of their 16; interpretations are saturated at 16.
        let interpret = load(true, &[4, 4, 4, 3], 16);
        let deliberate = load(true, &[4, 4, 4, 3], 2);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert!(
            credit_after(&deliberate, &steps, Kind::Deliberate) >= 3,
            "keeps what it uses + 1: {steps:?}"
        );
        assert!(credit_after(&deliberate, &steps, Kind::Deliberate) <= 4, "{steps:?}");
        // Kept within the slack (4 for 2 in use), but the interpretations may borrow what is
        // not used: they get all but the 2 in flight.
        let deliberate_after = load(true, &[3], 2);
        let steps = plan(32, 0, &interpret, &deliberate_after);
        assert_eq!(added(&steps, Kind::Interpret), 30 - 16, "{steps:?}");
    }

    #[test]
    fn a_saturated_kind_borrows_what_the_other_keeps_and_does_not_use() {
        // Interpretations arrive steadily, 9 at most in flight, and keep 13 (within the
        // slack, so no churn); a backlog of deliberations is saturated at the other 19.
        let interpret = load(true, &[4, 4, 4], 9);
        let deliberate = load(true, &[4, 4, 4, 4, 2], 19);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert_eq!(cancelled(&steps), 0, "{steps:?}");
        // They may run all but the 9 the interpretations use: 4 more, 36 held at most.
        assert_eq!(credit_after(&deliberate, &steps, Kind::Deliberate), 23, "{steps:?}");
        assert_eq!(credit_after(&interpret, &steps, Kind::Interpret), 13, "{steps:?}");
        // The interpretations burst into what they kept: both saturated, the deliberations give
        // back down to their half (within the slack of it), no more is added.
        let deliberate = load(true, &[4, 4, 4, 4, 4, 2], 23);
        let steps = plan(32, 0, &load(true, &[4, 4, 4], 13), &deliberate);
        assert_eq!(added(&steps, Kind::Interpret) + added(&steps, Kind::Deliberate), 0, "{steps:?}");
        assert!(credit_after(&deliberate, &steps, Kind::Deliberate) < 16 + 4, "{steps:?}");
    }

    #[test]
    fn a_kind_with_nothing_in_flight_gives_back_even_a_small_share() {
        // A deliberation came and went: its kind kept 4 of 32 (within the slack), nothing in flight.
        let interpret = load(true, &[4, 4, 4, 4, 4, 4, 3], 28);
        let deliberate = load(true, &[3], 0);
        let steps = plan(32, 0, &interpret, &deliberate);
        assert_eq!(
            credit_after(&deliberate, &steps, Kind::Deliberate),
            1,
            "back to its base lane: {steps:?}"
        );
        // And the interpretations take the whole concurrency back.
        let steps = plan(32, 0, &interpret, &load(true, &[], 0));
        assert_eq!(added(&steps, Kind::Interpret), 4, "{steps:?}");
        // While it is in use, a share within the slack is kept (no churn).
        let steps = plan(32, 0, &interpret, &load(true, &[3], 1));
        assert_eq!(cancelled(&steps), 0, "{steps:?}");
    }

    #[test]
    fn an_unavailable_kind_leaves_everything_to_the_other() {
        // The breaker opened: the deliberations' lanes are gone, their 6 running ones drain.
        let interpret = load(true, &[4, 3], 8);
        let steps = plan(32, 6, &interpret, &load(false, &[], 6));
        assert_eq!(added(&steps, Kind::Interpret), 32 - 8 - 6, "{steps:?}");
        assert_eq!(cancelled(&steps), 0);
    }

    #[test]
    fn small_differences_cause_no_churn() {
        // 17 against a share of 16: within the slack, nothing is cancelled.
        let steps = plan(32, 0, &load(true, &[4, 4, 4, 4], 17), &load(true, &[4, 4, 4, 3], 16));
        assert_eq!(cancelled(&steps), 0, "{steps:?}");
    }

    #[test]
    fn a_concurrency_of_one_or_two_still_consumes_both_kinds() {
        for c in [1, 2] {
            let steps = plan(c, 0, &load(true, &[], 1), &load(true, &[], 1));
            assert_eq!(cancelled(&steps), 0, "c={c}: {steps:?}");
            assert!(
                added(&steps, Kind::Interpret) + added(&steps, Kind::Deliberate) <= c,
                "c={c}: {steps:?}"
            );
        }
        // Alone, each may take the whole concurrency (the base lane is it, for 1).
        assert_eq!(plan(1, 0, &load(true, &[], 1), &load(false, &[], 0)), vec![]);
    }

    /// Whatever the loads, a plan never lets active credit plus draining exceed
    /// the concurrency plus the slack (an eighth, at least one), nor the
    /// concurrency when both kinds are saturated.
    #[test]
    fn no_plan_holds_more_than_the_concurrency_plus_the_slack() {
        for c in [1u16, 2, 3, 5, 8, 32, 64] {
            let slack = eighth(c);
            for i_lanes in [vec![], vec![1], vec![3, 3], vec![c.saturating_sub(1).max(1)]] {
                for d_lanes in [vec![], vec![2], vec![c / 2 + 1]] {
                    for draining in [0, 1, c / 2] {
                        for (pi, pd) in [(0, 0), (c, 0), (0, c), (c, c), (1, 1)] {
                            let i = load(true, &i_lanes, pi);
                            let mut d = load(true, &d_lanes, pd);
                            // Lane ids are unique across a worker's kinds (`Lanes` numbers them).
                            d.lanes.iter_mut().for_each(|(id, _)| *id += 1000);
                            let before = i.credit() + d.credit() + draining;
                            let steps = plan(c, draining, &i, &d);
                            let after = credit_after(&i, &steps, Kind::Interpret)
                                + credit_after(&d, &steps, Kind::Deliberate)
                                + draining
                                + steps
                                    .iter()
                                    .filter_map(|s| match s {
                                        // A cancelled lane's credit becomes, at most, draining.
                                        Step::Cancel(id) => i
                                            .lanes
                                            .iter()
                                            .chain(&d.lanes)
                                            .find(|(l, _)| l == id)
                                            .map(|(_, c)| *c),
                                        _ => None,
                                    })
                                    .sum::<u16>();
                            let added = added(&steps, Kind::Interpret) + added(&steps, Kind::Deliberate);
                            let both_saturated = pi >= i.credit() && pd >= d.credit();
                            let bound = if both_saturated { c } else { c + slack };
                            if added > 0 {
                                assert!(after <= bound, "c={c} {i:?} {d:?} draining={draining}: {steps:?}");
                            } else {
                                assert!(
                                    after <= before.max(bound),
                                    "c={c} {i:?} {d:?} draining={draining}: {steps:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

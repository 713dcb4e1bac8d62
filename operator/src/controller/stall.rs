//! A consumer that stops moving while work waits: the silent stall.
//!
//! The failure users of JetStream pipelines report most after outages is a
//! consumer that delivers nothing while orders wait, and that only its
//! recreation fixes. The stream's last sequence alone says nothing here (the
//! outcomes land in the same stream), so the operator looks at the consumer:
//!
//! - **work waits**: inputs pending on the consumer's filter or awaiting ack,
//!   or an input stored since the last look that the consumer does not count
//!   at all (its position is past the stream's: see
//!   [`super::dereference::Figures::unseen_input`]);
//! - **nothing moves**: no delivery (redeliveries included) and the ack floor
//!   where it was;
//! - **workers are there**: every worker the Deployment asks for is available
//!   (at least one), and the pipeline is not paused;
//!
//! for longer than the window. The window is never shorter than the longest a
//! healthy consumer may stay still with work waiting (a message in flight for
//! the ack wait, or in NAK backoff for the longest delay): so a message in
//! backoff is told apart from a stall by its redelivery, which moves the
//! delivery count. Then the Stalled condition turns True with the figures, a
//! Warning Event and `orderoperator_pipeline_stalled` say so, and the chart's
//! `OrderPipelineStalled` alert fires. What the operator can repair safely it
//! repairs: a consumer that the server lost is recreated from the ack floor
//! it last read (see [`resume_from`]), so nothing acknowledged is delivered
//! again. Pure: the reconcile gives it what it read.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::dereference::Figures;
use super::jetstream_api::StreamView;
use crate::conditions::{self, reasons, types};
use crate::crd::OrderPipelineStatus;
use crate::render::Plan;

/// The operator's default `--stall-window`.
pub const DEFAULT_WINDOW: &str = "5m";

/// The shortest window that tells a stall from a consumer that waits on
/// purpose: a delivery in flight for the ack wait (or the longest backoff
/// step), then in NAK backoff for the longest delay.
pub(crate) fn window(flag: Duration, plan: &Plan) -> Duration {
    let t = &plan.topology;
    let in_flight = t.backoff.iter().copied().fold(plan.ack_wait, Duration::max);
    flag.max(in_flight + plan.nak_max_delay)
}

/// What one look saw, beside the figures.
pub(crate) struct Look<'a> {
    pub(crate) figures: &'a Figures,
    pub(crate) old: &'a OrderPipelineStatus,
    pub(crate) now: &'a Time,
    /// Read now: since when this process has seen the consumer's deliveries
    /// and ack floor where they are (`None`: the figures are a recent pass's).
    pub(crate) still_since: Option<Time>,
    pub(crate) paused: bool,
    pub(crate) workers_available: i32,
    pub(crate) workers_desired: i32,
    pub(crate) window: Duration,
    pub(crate) consumer: &'a str,
    pub(crate) generation: Option<i64>,
}

/// Since when work has waited with nothing moving (`None`: not waiting), and
/// the Stalled condition.
pub(crate) fn assess(l: &Look) -> (Option<Time>, Condition) {
    let f = l.figures;
    let (pending, ack_pending) = (f.consumer.pending, f.consumer.ack_pending);
    let work = pending > 0 || ack_pending > 0 || f.unseen_input;
    let old = l.old.consumer.as_ref();
    let moved = old
        .is_none_or(|o| o.delivered != f.consumer.delivered || o.ack_floor != f.consumer.ack_floor);
    let workers_ok = l.workers_available >= 1 && l.workers_available >= l.workers_desired;
    let cond = |stalled: bool, reason: &str, message: String| {
        conditions::condition(types::STALLED, stalled, reason, message, l.generation)
    };
    if l.paused {
        let m = "paused: the consumer delivers nothing on purpose".to_string();
        return (None, cond(false, reasons::PAUSED, m));
    }
    if !workers_ok {
        let m = format!(
            "not looked at while workers are missing ({} of {} available): WorkersAvailable says why",
            l.workers_available, l.workers_desired
        );
        return (None, cond(false, reasons::WORKERS_UNAVAILABLE, m));
    }
    if !work {
        let m = "no order waits".to_string();
        return (None, cond(false, reasons::NOTHING_WAITING, m));
    }
    let since = match (&l.still_since, moved) {
        // A reused pass says nothing new: the wait goes on as it was.
        (None, _) => old.and_then(|o| o.waiting_since.clone()),
        (Some(_), true) => None,
        // Still since the first look that saw it here.
        (Some(seen), false) => old
            .and_then(|o| o.waiting_since.clone())
            .or(Some(seen.clone())),
    };
    let Some(since) = since else {
        let m = format!("delivering: {pending} pending, {ack_pending} awaiting ack");
        return (None, cond(false, reasons::CONSUMER_MOVING, m));
    };
    let still = l.now.0.duration_since(since.0);
    let still = Duration::try_from(still).unwrap_or_default();
    if still < l.window {
        // No figure that changes while nothing moves: no status write per look.
        let m = format!(
            "nothing delivered or acknowledged since {}; Stalled after the {}s window",
            since.0,
            l.window.as_secs()
        );
        return (Some(since), cond(false, reasons::CONSUMER_WAITING, m));
    }
    let m = stalled_message(l, &since);
    (Some(since), cond(true, reasons::CONSUMER_STALLED, m))
}

fn stalled_message(l: &Look, since: &Time) -> String {
    let (f, c) = (l.figures, l.consumer);
    let (pending, ack_pending) = (f.consumer.pending, f.consumer.ack_pending);
    let floor = f.consumer.ack_floor;
    let head = format!(
        "consumer {c} has delivered nothing and its ack floor has stayed at stream sequence {floor} since {} (longer than the {}s window) while {} worker(s) are available",
        since.0,
        l.window.as_secs(),
        l.workers_available
    );
    if f.unseen_input {
        let delivered = f.observation.cursor.delivered_stream_seq;
        let last = f.stream.last_sequence;
        return format!(
            "{head}: the stream stores new orders that the consumer does not count (it reports 0 pending; it delivered up to stream sequence {delivered}, the stream's last is {last}). Its position is past the stream's, as after NATS lost the stream's last messages; delete the consumer (nats consumer rm) and the operator recreates it"
        );
    }
    if ack_pending > 0 && pending > 0 {
        return format!(
            "{head}: {pending} orders wait undelivered behind {ack_pending} delivered but never acknowledged nor redelivered. A client that is not a worker of this pipeline may hold them (in-progress acks keep them from redelivery): nats consumer info shows the waiting pulls; stop that client and they are redelivered after the ack wait"
        );
    }
    format!(
        "{head}: {pending} pending, {ack_pending} awaiting ack. Look for errors in the workers' logs (kubectl logs -l app.kubernetes.io/instance=NAME) and at the consumer on the server (nats consumer info)"
    )
}

/// When to look again while work waits and the window has not run out, so the
/// stall is seen when it begins rather than at the next resync.
pub(crate) fn next_look(
    status: &OrderPipelineStatus,
    now: &Time,
    window: Duration,
) -> Option<Duration> {
    let stalled = conditions::is_true(&status.conditions, types::STALLED);
    let since = status.consumer.as_ref()?.waiting_since.as_ref()?;
    let still = Duration::try_from(now.0.duration_since(since.0)).unwrap_or_default();
    (!stalled).then(|| window.saturating_sub(still) + Duration::from_millis(100))
}

/// Where to recreate a consumer the server no longer has: after the ack floor
/// the last status recorded, when that was read on this very stream (same
/// creation time) and is not past its end; `None` delivers from the start of
/// the stream (a new stream, or nothing known). Whatever was acknowledged
/// after that read is delivered again, and the outcome protocol gives it no
/// second outcome; nothing above the floor is skipped.
pub(crate) fn resume_from(old: &OrderPipelineStatus, live: &StreamView) -> Option<u64> {
    let floor = u64::try_from(old.consumer.as_ref()?.ack_floor).ok()?;
    let start = floor + 1;
    let inside = floor <= live.last_sequence && start > live.first_sequence.max(1);
    (same_stream(old, live) && inside).then_some(start)
}

/// The status was written from this very stream (its creation time).
pub(crate) fn same_stream(old: &OrderPipelineStatus, live: &StreamView) -> bool {
    let recorded = old.stream.as_ref().and_then(|s| s.created.clone());
    live.created.is_some() && recorded == live.created.and_then(super::dereference::created_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{ConsumerStatus, StreamStatus};
    use k8s_openapi::jiff::Timestamp;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + s).unwrap())
    }

    fn figures(pending: i64, ack_pending: i64, delivered: i64, floor: i64) -> Figures {
        Figures {
            consumer_paused: false,
            legacy_records: Some(0),
            stream: StreamStatus {
                last_sequence: 500,
                ..Default::default()
            },
            consumer: ConsumerStatus {
                pending,
                ack_pending,
                delivered,
                ack_floor: floor,
                ..Default::default()
            },
            dead_letters: 0,
            observation: Default::default(),
            oldest_unprocessed_age_seconds: None,
            stream_config: Default::default(),
            unseen_input: false,
        }
    }

    /// A look at `f` after `old`, at `now`, seen still since `still_since`,
    /// with 1 of 1 workers, a 60 s window.
    fn at_look<'a>(
        f: &'a Figures,
        old: &'a OrderPipelineStatus,
        now: &'a Time,
        still_since: Option<Time>,
    ) -> Look<'a> {
        Look {
            figures: f,
            old,
            now,
            still_since,
            paused: false,
            workers_available: 1,
            workers_desired: 1,
            window: Duration::from_secs(60),
            consumer: "c",
            generation: None,
        }
    }

    /// One look after `prev` (the status so far) at time `now`.
    fn look(prev: &OrderPipelineStatus, f: &Figures, now: i64) -> OrderPipelineStatus {
        let now = at(now);
        let mut l = at_look(f, prev, &now, Some(now.clone()));
        (l.workers_available, l.workers_desired) = (2, 2);
        (l.consumer, l.generation) = ("orders-workers", Some(1));
        let (since, c) = assess(&l);
        let mut s = prev.clone();
        let mut consumer = f.consumer.clone();
        consumer.waiting_since = since;
        s.consumer = Some(consumer);
        s.conditions = conditions::merge(&prev.conditions, vec![c]);
        s
    }

    fn stalled(s: &OrderPipelineStatus) -> (&str, &str) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == types::STALLED)
            .unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    #[test]
    fn still_with_work_for_the_window_is_a_stall_and_a_move_ends_it() {
        let s0 = look(&Default::default(), &figures(100, 10, 50, 40), 0);
        assert_eq!(stalled(&s0), ("False", reasons::CONSUMER_MOVING));
        // Nothing moves from second 10: waiting since then.
        let s1 = look(&s0, &figures(150, 10, 50, 40), 10);
        assert_eq!(stalled(&s1), ("False", reasons::CONSUMER_WAITING));
        assert_eq!(s1.consumer.as_ref().unwrap().waiting_since, Some(at(10)));
        let s2 = look(&s1, &figures(200, 10, 50, 40), 69);
        assert_eq!(stalled(&s2), ("False", reasons::CONSUMER_WAITING));
        let s3 = look(&s2, &figures(250, 10, 50, 40), 70);
        assert_eq!(stalled(&s3), ("True", reasons::CONSUMER_STALLED));
        let msg = &s3.conditions[0].message;
        let want = format!(
            "ack floor has stayed at stream sequence 40 since {} (longer than the 60s window)",
            at(10).0
        );
        assert!(msg.contains(&want), "{msg}");
        assert!(
            msg.contains("250 orders wait undelivered behind 10 delivered"),
            "{msg}"
        );
        // One delivery: moving again, the wait forgotten.
        let s4 = look(&s3, &figures(249, 10, 51, 40), 75);
        assert_eq!(stalled(&s4), ("False", reasons::CONSUMER_MOVING));
        assert_eq!(s4.consumer.as_ref().unwrap().waiting_since, None);
        // An ack floor that moves is progress too.
        let s5 = look(&s4, &figures(249, 10, 51, 41), 80);
        assert_eq!(stalled(&s5), ("False", reasons::CONSUMER_MOVING));
    }

    #[test]
    fn no_work_paused_or_missing_workers_is_never_a_stall() {
        let s0 = look(&Default::default(), &figures(0, 0, 50, 50), 0);
        let s1 = look(&s0, &figures(0, 0, 50, 50), 1_000);
        assert_eq!(stalled(&s1), ("False", reasons::NOTHING_WAITING));
        assert_eq!(s1.consumer.as_ref().unwrap().waiting_since, None);
        let now = at(2_000);
        let f = figures(100, 0, 50, 50);
        let mut l = at_look(&f, &s1, &now, Some(now.clone()));
        (l.paused, l.workers_available, l.workers_desired) = (true, 2, 2);
        assert_eq!(assess(&l).1.reason, reasons::PAUSED);
        l.paused = false;
        l.workers_available = 1;
        assert_eq!(assess(&l).1.reason, reasons::WORKERS_UNAVAILABLE);
        l.workers_available = 0;
        l.workers_desired = 0;
        assert_eq!(assess(&l).1.reason, reasons::WORKERS_UNAVAILABLE);
    }

    #[test]
    fn a_reused_pass_neither_starts_nor_ends_a_wait() {
        let s0 = look(&Default::default(), &figures(100, 10, 50, 40), 0);
        let now = at(5);
        let f = figures(100, 10, 50, 40);
        let l = at_look(&f, &s0, &now, None);
        assert_eq!(assess(&l).0, None);
        let s1 = look(&s0, &f, 10);
        let l = Look { old: &s1, ..l };
        assert_eq!(assess(&l).0, Some(at(10)));
    }

    #[test]
    fn the_wait_starts_at_the_first_look_that_saw_the_consumer_where_it_is() {
        let s0 = look(&Default::default(), &figures(100, 10, 50, 40), 0);
        let (now, seen) = (at(30), at(29));
        let f = figures(120, 10, 50, 40);
        let l = at_look(&f, &s0, &now, Some(seen.clone()));
        assert_eq!(assess(&l).0, Some(seen));
    }

    #[test]
    fn inputs_the_consumer_does_not_count_are_work() {
        let s0 = look(&Default::default(), &figures(0, 0, 50, 50), 0);
        let mut f = figures(0, 0, 50, 50);
        f.unseen_input = true;
        f.observation.cursor.delivered_stream_seq = 900;
        let s1 = look(&s0, &f, 10);
        let s2 = look(&s1, &f, 70);
        assert_eq!(stalled(&s2), ("True", reasons::CONSUMER_STALLED));
        let msg = &s2.conditions[0].message;
        assert!(
            msg.contains("delivered up to stream sequence 900, the stream's last is 500"),
            "{msg}"
        );
    }

    #[test]
    fn the_window_covers_the_longest_wait_on_purpose() {
        let p: crate::crd::OrderPipeline = serde_yaml::from_str(include_str!(
            "../../../manifests/samples/orderpipeline.yaml"
        ))
        .unwrap();
        let plan = super::super::plan::own(&p).map_err(|_| ()).unwrap();
        let floor = plan
            .topology
            .backoff
            .iter()
            .copied()
            .fold(plan.ack_wait, Duration::max)
            + plan.nak_max_delay;
        assert_eq!(window(Duration::from_secs(1), &plan), floor);
        assert_eq!(
            window(Duration::from_secs(3_600), &plan),
            Duration::from_secs(3_600)
        );
    }

    #[test]
    fn a_lost_consumer_resumes_after_the_floor_of_the_same_stream_only() {
        let old = OrderPipelineStatus {
            stream: Some(StreamStatus {
                created: super::super::dereference::created_of(7_000),
                ..Default::default()
            }),
            consumer: Some(ConsumerStatus {
                ack_floor: 40,
                ..Default::default()
            }),
            ..Default::default()
        };
        let live = |created: i128, first: u64, last: u64| StreamView {
            created: Some(created),
            first_sequence: first,
            last_sequence: last,
            ..Default::default()
        };
        assert_eq!(resume_from(&old, &live(7_000, 1, 100)), Some(41));
        // Another stream of the same name: from its start.
        assert_eq!(resume_from(&old, &live(8_000, 1, 100)), None);
        // A floor past the stream's end (its tail lost): from the start.
        assert_eq!(resume_from(&old, &live(7_000, 1, 30)), None);
        // Everything up to the floor already removed: the start is the same.
        assert_eq!(resume_from(&old, &live(7_000, 41, 100)), None);
        assert_eq!(
            resume_from(&OrderPipelineStatus::default(), &live(7_000, 1, 100)),
            None
        );
    }
}

//! Orders that the input stream's limits remove before they are processed.
//!
//! JetStream removes a message when it reaches `maxAge`, or when the
//! stream is over `maxBytes` with `discard: old`, whether or not a consumer has
//! acknowledged it; only a delivered, unacknowledged one gets an advisory.
//! Nothing in the stream is left of such an order, so the audit of the stored
//! messages cannot see it: the operator counts it from two sources.
//!
//! - **Delivered, not yet acknowledged**: the server ends the delivery with a
//!   `MSG_TERMINATED` advisory whose reason names the removal
//!   ([`TERMINATED_BY_REMOVAL`]), one per input. The operator listens on every
//!   connection it holds. Exact while it is connected.
//! - **Never delivered**: the consumer's `num_pending` (inputs above its
//!   cursor) drops by one per removal. Between two reads of the consumer,
//!   [`removed_undelivered`] turns the drop into a count: exact when the
//!   consumer delivered nothing and held nothing in between (a paused or
//!   stopped pipeline: the case where a backlog outlives `maxAge`), a lower
//!   bound otherwise.
//!
//! Before it happens, the age of the oldest unprocessed order (the first input
//! above the consumer's ack floor) is shown beside `maxAge`; see
//! [`condition`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::jetstream_api::Cursor;
use crate::conditions::{self, reasons, types};
use crate::crd::{OrderPipeline, OrderPipelineStatus, RemovedUnprocessed};

/// The reasons nats-server (2.12 to 2.15) gives when a delivered, unacknowledged
/// message is removed from the stream (`consumer.go`: a limit, or a delete or
/// purge of a message still pending).
pub(crate) const TERMINATED_BY_REMOVAL: [&str; 2] = [
    "Message deleted by stream limits",
    "Unacknowledged message was deleted",
];

/// The advisory subject of a delivery the server ended.
pub(crate) const TERMINATED_ADVISORIES: &str = "$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.*.*";

/// The annotation with which a person acknowledges removed orders: its value
/// is the count they have handled.
pub use orderpipeline_common::names::REMOVED_ACKNOWLEDGED_ANNOTATION as ACKNOWLEDGED_ANNOTATION;

/// One read of the consumer and its stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Observation {
    pub(crate) cursor: Cursor,
    /// Inputs above the cursor (`num_pending`).
    pub(crate) pending: u64,
    pub(crate) ack_pending: u64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
}

/// Orders removed unprocessed since the last read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Removed {
    pub(crate) count: u64,
    /// `false`: `count` is a lower bound.
    pub(crate) exact: bool,
}

/// The never-delivered inputs the stream removed between `prev` and `now`.
///
/// Removal takes the oldest messages first, so it reaches an undelivered input
/// only once the stream's first sequence has passed the consumer's cursor; until
/// then nothing was lost. After: `num_pending` went from `prev.pending` to
/// `now.pending` by adding the inputs written since (`last_seq` grew by them
/// alone when no worker held a message: only workers write outcomes) and
/// losing the ones delivered and the ones removed. With no delivery in between
/// (the delivery count unchanged) that gives the count exactly; otherwise at
/// least `prev.pending - now.pending - deliveries`. A stream or consumer that
/// was recreated in between (sequences went back) starts a new baseline.
pub(crate) fn removed_undelivered(prev: &Observation, now: &Observation) -> Removed {
    let nothing = Removed {
        count: 0,
        exact: true,
    };
    if now.last_seq < prev.last_seq || now.cursor.deliveries < prev.cursor.deliveries {
        return nothing;
    }
    if now.first_seq <= prev.cursor.delivered_stream_seq.saturating_add(1) {
        return nothing;
    }
    let deliveries = now.cursor.deliveries - prev.cursor.deliveries;
    if deliveries == 0 && prev.ack_pending == 0 && now.ack_pending == 0 {
        let written = now.last_seq - prev.last_seq;
        return Removed {
            count: (prev.pending + written).saturating_sub(now.pending),
            exact: true,
        };
    }
    Removed {
        count: prev.pending.saturating_sub(now.pending + deliveries),
        exact: false,
    }
}

/// The maxAge to hold the input stream at (`spec.stream.holdUnprocessed`):
/// `max_age` doubled until the oldest unprocessed order (`oldest` seconds, as
/// the last reconcile saw it) is younger than half of it, so it is never the
/// next to go; `max_age` itself once the backlog is younger than half of it.
/// Stable between reconciles: it moves only when the age crosses a half.
pub(crate) fn held_max_age(
    hold: bool,
    max_age: std::time::Duration,
    oldest: Option<i64>,
) -> std::time::Duration {
    let age = std::time::Duration::from_secs(u64::try_from(oldest.unwrap_or(0)).unwrap_or(0));
    let mut held = max_age;
    while hold
        && !held.is_zero()
        && age * 2 >= held
        && held < std::time::Duration::from_secs(1 << 40)
    {
        held *= 2;
    }
    held
}

/// spec.stream.maxAge in seconds (0: none).
pub(crate) fn spec_max_age_seconds(p: &OrderPipeline) -> i64 {
    orderpipeline_common::duration::parse_duration(&p.spec.stream.max_age)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Raises the input stream's maxAge at once when the oldest unprocessed order
/// read in this reconcile needs more than the topology applied (which was
/// planned from the previous reconcile's reading): the hold reacts within one
/// resync interval, not two. Only the live maxAge changes (`live`: the stream's
/// configuration as this reconcile read it); `t` records it. Lowering waits
/// for the next reconcile's plan.
pub(crate) async fn hold_now(
    p: &OrderPipeline,
    js: &dyn super::jetstream_api::JetStream,
    t: &mut orderpipeline_common::topology::Topology,
    live: &async_nats::jetstream::stream::Config,
    oldest: Option<i64>,
) -> Result<(), super::jetstream_api::JsError> {
    let want = held_max_age(p.spec.stream.hold_unprocessed, t.max_age, oldest);
    if want <= t.max_age {
        return Ok(());
    }
    if live.max_age < want {
        let mut cfg = live.clone();
        cfg.max_age = want;
        js.update_stream(cfg).await?;
        tracing::info!(stream = %t.stream, max_age = ?want, "holding maxAge above the oldest unprocessed order");
    }
    t.max_age = want;
    Ok(())
}

/// `status.heldMaxAgeSeconds`: the held maxAge when it is above the spec's.
pub(crate) fn held_seconds(p: &OrderPipeline, applied: std::time::Duration) -> Option<i64> {
    let applied = i64::try_from(applied.as_secs()).unwrap_or(i64::MAX);
    (applied > spec_max_age_seconds(p)).then_some(applied)
}

/// `old` with `removed` added (at `now`); unchanged when nothing was removed.
pub(crate) fn fold(
    old: Option<&RemovedUnprocessed>,
    removed: Removed,
    now: &Time,
) -> Option<RemovedUnprocessed> {
    if removed.count == 0 {
        return old.cloned();
    }
    let count = i64::try_from(removed.count).unwrap_or(i64::MAX);
    Some(match old {
        Some(o) => RemovedUnprocessed {
            count: o.count.saturating_add(count),
            exact: o.exact && removed.exact,
            first: o.first.clone(),
            last: now.clone(),
        },
        None => RemovedUnprocessed {
            count,
            exact: removed.exact,
            first: now.clone(),
            last: now.clone(),
        },
    })
}

/// The removed orders no one has acknowledged yet (see [`ACKNOWLEDGED_ANNOTATION`]).
pub(crate) fn unacknowledged(p: &OrderPipeline, s: &OrderPipelineStatus) -> i64 {
    let count = s.removed_unprocessed.as_ref().map_or(0, |r| r.count);
    let acked = p.metadata.annotations.as_ref();
    orderpipeline_common::names::unacknowledged(
        count,
        acked
            .and_then(|a| a.get(ACKNOWLEDGED_ANNOTATION))
            .map(String::as_str),
    )
}

/// `seconds` as `1d2h`, `3h4m`, `5m6s` or `7s`.
pub(crate) fn human(seconds: i64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// InputsRetained: False while removed orders are unacknowledged
/// (`InputsRemovedUnprocessed`, the loss) or the oldest unprocessed order is
/// half `maxAge` old or more (`OldestUnprocessedAging`, the warning before it).
pub(crate) fn condition(
    p: &OrderPipeline,
    s: &OrderPipelineStatus,
    max_age_seconds: i64,
    generation: Option<i64>,
) -> Condition {
    let name = p.metadata.name.as_deref().unwrap_or("NAME");
    let lost = unacknowledged(p, s);
    let age = s.oldest_unprocessed_age_seconds.unwrap_or(0);
    let limit = if max_age_seconds > 0 {
        format!("maxAge {}", human(max_age_seconds))
    } else {
        "no maxAge".to_string()
    };
    if let Some(r) = s.removed_unprocessed.as_ref().filter(|_| lost > 0) {
        let bound = if r.exact { "" } else { "at least " };
        return conditions::condition(
            types::INPUTS_RETAINED,
            false,
            reasons::INPUTS_REMOVED_UNPROCESSED,
            format!(
                "{bound}{lost} order(s) were removed by the input stream's limits ({limit}, maxBytes) before they were processed, the first at {}, the last at {}: they have no outcome and are not in the stream any more. Keep workers running, or raise spec.stream.maxAge/maxBytes; once handled, acknowledge: kubectl annotate orderpipeline {name} {ACKNOWLEDGED_ANNOTATION}={} --overwrite",
                r.first.0, r.last.0, r.count
            ),
            generation,
        );
    }
    if max_age_seconds > 0 && age.saturating_mul(2) >= max_age_seconds {
        let fate = match s.held_max_age_seconds {
            Some(held) => format!(
                "the operator holds the stream's maxAge at {} (spec.stream.holdUnprocessed) until the backlog is younger than half of {}; the stream keeps everything that long meanwhile",
                human(held),
                human(max_age_seconds)
            ),
            None => format!(
                "at {} the stream removes it unprocessed",
                human(max_age_seconds)
            ),
        };
        return conditions::condition(
            types::INPUTS_RETAINED,
            false,
            reasons::OLDEST_UNPROCESSED_AGING,
            format!(
                "the oldest unprocessed order is {} old, half or more of the input stream's {limit}: {fate}. Unpause or scale up the workers, or raise spec.stream.maxAge",
                human(age),
            ),
            generation,
        );
    }
    let backlog = match s.oldest_unprocessed_age_seconds {
        Some(a) => format!("the oldest unprocessed order is {} old", human(a)),
        None => "no order is waiting".to_string(),
    };
    conditions::condition(
        types::INPUTS_RETAINED,
        true,
        reasons::INPUTS_RETAINED,
        format!("no order was removed unprocessed; {backlog} ({limit})"),
        generation,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(delivered: u64, deliveries: u64, pending: u64, ack_pending: u64) -> Observation {
        Observation {
            cursor: Cursor {
                delivered_stream_seq: delivered,
                deliveries,
                ack_floor_stream_seq: delivered,
            },
            pending,
            ack_pending,
            first_seq: 1,
            last_seq: 0,
        }
    }

    fn seqs(mut o: Observation, first: u64, last: u64) -> Observation {
        o.first_seq = first;
        o.last_seq = last;
        o
    }

    #[test]
    fn removed_undelivered_counts_only_what_passed_the_cursor() {
        // (case, prev, now, want)
        let cases = [
            (
                "the head stays at or below the cursor: nothing lost",
                seqs(at(10, 5, 4, 0), 1, 14),
                seqs(at(10, 5, 6, 0), 11, 16),
                Removed {
                    count: 0,
                    exact: true,
                },
            ),
            (
                "paused: 4 pending, 2 written, all 6 removed but the last",
                seqs(at(10, 5, 4, 0), 1, 14),
                seqs(at(10, 5, 1, 0), 16, 16),
                Removed {
                    count: 5,
                    exact: true,
                },
            ),
            (
                "paused, everything removed",
                seqs(at(10, 5, 4, 0), 1, 14),
                seqs(at(10, 5, 0, 0), 15, 14),
                Removed {
                    count: 4,
                    exact: true,
                },
            ),
            (
                "the consumer skipped the removed inputs (cursor moved, no delivery)",
                seqs(at(10, 5, 4, 0), 1, 14),
                seqs(at(14, 5, 0, 0), 15, 14),
                Removed {
                    count: 4,
                    exact: true,
                },
            ),
            (
                "workers delivered meanwhile: a lower bound",
                seqs(at(10, 5, 8, 2), 1, 30),
                seqs(at(20, 8, 1, 2), 15, 30),
                Removed {
                    count: 4,
                    exact: false,
                },
            ),
            (
                "the stream was recreated: a new baseline",
                seqs(at(10, 5, 4, 0), 1, 14),
                seqs(at(0, 0, 3, 0), 1, 3),
                Removed {
                    count: 0,
                    exact: true,
                },
            ),
        ];
        for (case, prev, now, want) in cases {
            assert_eq!(removed_undelivered(&prev, &now), want, "{case}");
        }
    }

    #[test]
    fn fold_adds_and_keeps_the_first_time() {
        let t1 = Time(k8s_openapi::jiff::Timestamp::from_second(100).unwrap());
        let t2 = Time(k8s_openapi::jiff::Timestamp::from_second(200).unwrap());
        let none = Removed {
            count: 0,
            exact: true,
        };
        assert_eq!(fold(None, none, &t1), None);
        let one = fold(
            None,
            Removed {
                count: 3,
                exact: true,
            },
            &t1,
        )
        .unwrap();
        let two = fold(
            Some(&one),
            Removed {
                count: 2,
                exact: false,
            },
            &t2,
        )
        .unwrap();
        assert_eq!((two.count, two.exact), (5, false));
        assert_eq!((two.first.clone(), two.last.clone()), (t1, t2.clone()));
        assert_eq!(fold(Some(&two), none, &t2), Some(two));
    }

    #[test]
    fn the_held_max_age_doubles_past_the_oldest_order_and_comes_back() {
        let d = std::time::Duration::from_secs;
        // (hold, maxAge, oldest unprocessed, held)
        let cases = [
            (true, d(60), None, d(60)),
            (true, d(60), Some(29), d(60)),
            (true, d(60), Some(30), d(120)),
            (true, d(60), Some(59), d(120)),
            (true, d(60), Some(60), d(240)),
            (true, d(60), Some(1000), d(3840)),
            (false, d(60), Some(1000), d(60)),
            (true, d(0), Some(1000), d(0)),
        ];
        for (hold, max_age, oldest, want) in cases {
            assert_eq!(
                held_max_age(hold, max_age, oldest),
                want,
                "{hold} {max_age:?} {oldest:?}"
            );
        }
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(7), "7s");
        assert_eq!(human(306), "5m6s");
        assert_eq!(human(3 * 3600 + 240), "3h4m");
        assert_eq!(human(7 * 86_400), "7d0h");
    }
}

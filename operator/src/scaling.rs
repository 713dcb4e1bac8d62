//! Lag-based scaling as a pure decision: from the consumer's lag (pending +
//! ack pending, what KEDA's JetStream scaler reads), the current replicas, the
//! bounds and the pipeline's scaling memory to the desired replicas and why.
//!
//! - desired = clamp(ceil(lag / targetLagPerReplica), min, max)
//! - scaling from zero needs lag above the activation threshold;
//! - scale up at once, by at most `max_step` per decision;
//! - scale down only when no decision in the stabilization window wanted at
//!   least the current replicas, by at most `max_step`;
//! - to zero only when `min` is 0 and the lag stayed 0 for the cooldown;
//! - an unreadable lag keeps the current replicas (never scale to max on an error).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// `None` when the consumer could not be read.
    pub lag: Option<u64>,
    pub current: i32,
    pub min: i32,
    pub max: i32,
    pub target_lag_per_replica: u64,
    pub activation_lag: u64,
    pub max_step: i32,
    pub stabilization_window: Duration,
    pub cooldown: Duration,
    pub now: Timestamp,
    /// Last time a decision wanted at least the replicas it had (scale-down clock).
    pub last_busy: Option<Timestamp>,
    /// Since when the lag has been 0 (scale-to-zero clock).
    pub idle_since: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub desired: i32,
    /// For the Event and the Scaling condition, e.g. "lag 12000 > 2 x 2500, scaling 2 -> 5".
    pub reason: String,
    /// Updated scale-down clock.
    pub last_busy: Option<Timestamp>,
    /// Updated scale-to-zero clock.
    pub idle_since: Option<Timestamp>,
    /// False when the lag could not be read.
    pub lag_known: bool,
}

fn elapsed(since: Option<Timestamp>, now: Timestamp) -> Duration {
    since
        .map(|t| now.duration_since(t).unsigned_abs())
        .unwrap_or(Duration::ZERO)
}

pub fn decide(i: &Inputs) -> Decision {
    let min = i.min.max(0);
    let max = i.max.max(min).max(1);
    let current = i.current.max(0);
    let Some(lag) = i.lag else {
        return Decision {
            desired: current,
            reason: format!("consumer lag unavailable; keeping {current} replica(s)"),
            last_busy: i.last_busy,
            idle_since: i.idle_since,
            lag_known: false,
        };
    };
    let target = i.target_lag_per_replica.max(1);
    let raw = i32::try_from(lag.div_ceil(target)).unwrap_or(i32::MAX);
    let mut want = raw.clamp(min, max);
    if current == 0 && lag <= i.activation_lag {
        want = min;
    }
    let idle_since = if lag == 0 {
        i.idle_since.or(Some(i.now))
    } else {
        None
    };
    let step = i.max_step.max(1);
    let busy_now = want >= current;
    let last_busy = if busy_now { Some(i.now) } else { i.last_busy };

    let (desired, reason) = if want > current {
        let d = want.min(current.saturating_add(step));
        (
            d,
            format!("lag {lag} > {current} x {target}, scaling {current} -> {d}"),
        )
    } else if want < current {
        let quiet = elapsed(i.last_busy, i.now);
        if i.last_busy.is_some() && quiet < i.stabilization_window {
            (
                current,
                format!(
                    "lag {lag} needs {want}, keeping {current} until the {}s stabilization window passes",
                    i.stabilization_window.as_secs()
                ),
            )
        } else {
            let mut d = want.max(current.saturating_sub(step));
            if d == 0 && elapsed(idle_since, i.now) < i.cooldown {
                d = 1.min(current);
            }
            if d == current {
                (
                    current,
                    format!(
                        "lag 0, keeping {current} until the {}s cooldown passes",
                        i.cooldown.as_secs()
                    ),
                )
            } else {
                (
                    d,
                    format!("lag {lag} <= {d} x {target}, scaling {current} -> {d}"),
                )
            }
        }
    } else {
        (current, format!("lag {lag} fits {current} x {target}"))
    };
    Decision {
        desired,
        reason,
        last_busy,
        idle_since,
        lag_known: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn base() -> Inputs {
        Inputs {
            lag: Some(0),
            current: 2,
            min: 1,
            max: 10,
            target_lag_per_replica: 1000,
            activation_lag: 0,
            max_step: 100,
            stabilization_window: Duration::from_secs(300),
            cooldown: Duration::from_secs(300),
            now: t(1000),
            last_busy: None,
            idle_since: None,
        }
    }

    #[test]
    fn table() {
        // (lag, current, min, max, step, last_busy secs ago, idle secs ago) -> desired
        // (lag, current, min, max, step, last busy secs ago, idle secs ago, desired)
        type Case = (
            Option<u64>,
            i32,
            i32,
            i32,
            i32,
            Option<i64>,
            Option<i64>,
            i32,
        );
        let cases: Vec<Case> = vec![
            // scale up at once, to ceil(lag/target), clamped to max
            (Some(12_000), 2, 1, 10, 100, Some(0), None, 10),
            (Some(5_500), 2, 1, 10, 100, Some(0), None, 6),
            (Some(2_000), 2, 1, 10, 100, Some(0), None, 2),
            (Some(1), 1, 1, 10, 100, Some(0), None, 1),
            // a step limit
            (Some(20_000), 2, 1, 10, 3, Some(0), None, 5),
            // down only after the window
            (Some(0), 5, 1, 10, 100, Some(10), None, 5),
            (Some(0), 5, 1, 10, 100, Some(299), None, 5),
            (Some(0), 5, 1, 10, 100, Some(300), None, 1),
            (Some(1_500), 5, 1, 10, 100, Some(400), None, 2),
            (Some(0), 5, 1, 10, 2, Some(400), None, 3),
            // never below min, never above max
            (Some(0), 3, 2, 10, 100, Some(400), Some(400), 2),
            (Some(1_000_000), 3, 1, 4, 100, Some(0), None, 4),
            // to zero only with min 0 and after the cooldown of zero lag
            (Some(0), 1, 0, 10, 100, Some(400), Some(100), 1),
            (Some(0), 1, 0, 10, 100, Some(400), Some(300), 0),
            // from zero: activation threshold
            (Some(0), 0, 0, 10, 100, None, Some(1000), 0),
            (Some(3), 0, 0, 10, 100, None, None, 1),
            // unreadable lag keeps the current replicas (never max)
            (None, 3, 1, 10, 100, Some(0), None, 3),
            (None, 0, 0, 10, 100, None, None, 0),
        ];
        for (lag, current, min, max, step, busy, idle, want) in cases {
            let i = Inputs {
                lag,
                current,
                min,
                max,
                max_step: step,
                last_busy: busy.map(|s| t(1000 - s)),
                idle_since: idle.map(|s| t(1000 - s)),
                ..base()
            };
            let d = decide(&i);
            assert_eq!(d.desired, want, "{i:?} -> {d:?}");
        }
    }

    #[test]
    fn activation_threshold_holds_zero() {
        let i = Inputs {
            lag: Some(50),
            current: 0,
            min: 0,
            activation_lag: 100,
            ..base()
        };
        assert_eq!(decide(&i).desired, 0);
        let i = Inputs {
            lag: Some(150),
            current: 0,
            min: 0,
            activation_lag: 100,
            ..base()
        };
        assert_eq!(decide(&i).desired, 1);
    }

    #[test]
    fn reasons_read_like_the_event() {
        let i = Inputs {
            lag: Some(12_000),
            current: 2,
            target_lag_per_replica: 2500,
            ..base()
        };
        assert_eq!(decide(&i).reason, "lag 12000 > 2 x 2500, scaling 2 -> 5");
        let i = Inputs {
            lag: None,
            current: 3,
            ..base()
        };
        let d = decide(&i);
        assert!(!d.lag_known && d.reason.contains("unavailable"));
    }

    #[test]
    fn clocks_move_as_documented() {
        let up = decide(&Inputs {
            lag: Some(5000),
            ..base()
        });
        assert_eq!(up.last_busy, Some(t(1000)));
        assert_eq!(up.idle_since, None);
        let idle = decide(&Inputs {
            lag: Some(0),
            current: 1,
            last_busy: Some(t(0)),
            ..base()
        });
        assert_eq!(idle.idle_since, Some(t(1000)));
        let still = decide(&Inputs {
            lag: Some(0),
            current: 1,
            idle_since: Some(t(10)),
            ..base()
        });
        assert_eq!(still.idle_since, Some(t(10)));
    }
}

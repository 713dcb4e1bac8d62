//! Leader election with a coordination.k8s.io Lease: only the holder reconciles.
//! A replica waits until the Lease is free or expired, takes it with an
//! optimistic-concurrency update, renews it, and reports loss (the process then
//! exits, and Kubernetes restarts it as a standby). On shutdown it hands the
//! Lease back once the last running reconcile has ended (never while one still
//! writes), so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease stays valid without renewal (also the handover bound).
    pub duration: Duration,
}

impl LeaseConfig {
    fn renew_every(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(500))
    }

    /// The holder gives up when it could not renew for this long: well before
    /// the Lease expires for a standby (client-go: 10 s of 15 s).
    fn renew_deadline(&self) -> Duration {
        (self.duration * 2 / 3).max(self.renew_every())
    }
}

/// The Lease record as last seen by a standby, and when (on its own clock).
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    record: (Option<String>, Option<String>),
    at: Instant,
}

/// Whether `lease` may be taken by `me` at `now`: free, ours, or held by a
/// holder that has not renewed for its duration *as this replica watched it*.
/// Expiry is measured from when this replica saw the record change, on its own
/// clock (as client-go does), never by comparing its clock with the holder's
/// `renewTime`, so clock skew between machines cannot cut a Lease short.
pub fn can_take(lease: &Lease, me: &str, observed: &mut Option<Observed>, now: Instant) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(h) => {
            let record = (
                Some(h.to_string()),
                spec.renew_time.as_ref().map(|t| t.0.to_string()),
            );
            let seen = match observed {
                Some(o) if o.record == record => o.at,
                _ => {
                    *observed = Some(Observed { record, at: now });
                    now
                }
            };
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            now.duration_since(seen) > duration
        }
    }
}

fn spec_for(cfg: &LeaseConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let same_holder =
        previous.and_then(|p| p.holder_identity.as_deref()) == Some(cfg.identity.as_str());
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(i32::try_from(cfg.duration.as_secs().max(1)).unwrap_or(15)),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(
            previous.and_then(|p| p.lease_transitions).unwrap_or(0)
                + i32::from(!same_holder && previous.is_some()),
        ),
        ..Default::default()
    }
}

/// Tries once to take or renew the Lease; `Ok(true)` when we hold it afterwards.
async fn try_hold(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(spec_for(cfg, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !can_take(&lease, &cfg.identity, observed, Instant::now()) {
                return Ok(false);
            }
            lease.spec = Some(spec_for(cfg, lease.spec.as_ref(), now));
            // The resourceVersion in `lease` makes this a compare-and-swap.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the Lease (or `shutdown` fires: `false`).
pub async fn acquire(client: &Client, cfg: &LeaseConfig, shutdown: &CancellationToken) -> bool {
    let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
    let mut logged = false;
    let mut observed = None;
    loop {
        let attempt = tokio::time::timeout(cfg.renew_every(), try_hold(&api, cfg, &mut observed));
        match attempt.await.unwrap_or(Ok(false)) {
            Ok(true) => {
                tracing::info!(lease = %cfg.name, identity = %cfg.identity, "acquired leadership");
                return true;
            }
            Ok(false) if !logged => {
                tracing::info!(lease = %cfg.name, "another replica leads; standing by");
                logged = true;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "cannot read or take the Lease")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.renew_every()) => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

/// Renews the Lease until `release` fires (then hands it back; fire it only
/// once no reconcile runs) or the Lease is lost: taken by another replica, or
/// not renewed within the renew deadline (then cancels `lost`).
pub async fn hold(
    client: Client,
    cfg: LeaseConfig,
    release: CancellationToken,
    lost: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut renewed = Instant::now();
    let mut observed = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.renew_every()) => {}
            _ = tokio::time::sleep_until(renewed + cfg.renew_deadline()) => {
                tracing::error!(lease = %cfg.name, deadline = ?cfg.renew_deadline(), "could not renew the Lease within the renew deadline");
                lost.cancel();
                return;
            }
            _ = release.cancelled() => {
                hand_back(&api, &cfg).await;
                return;
            }
        }
        let attempt = tokio::time::timeout(cfg.renew_every(), try_hold(&api, &cfg, &mut observed));
        match attempt.await {
            Ok(Ok(true)) => renewed = Instant::now(),
            Ok(Ok(false)) => {
                tracing::error!(lease = %cfg.name, "lost the Lease to another replica");
                lost.cancel();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the Lease failed; retrying"),
            Err(_) => tracing::warn!("renewing the Lease timed out; retrying"),
        }
    }
}

async fn hand_back(api: &Api<Lease>, cfg: &LeaseConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(cfg.identity.as_str())
    {
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
        }
        if api
            .replace(&cfg.name, &PostParams::default(), &lease)
            .await
            .is_ok()
        {
            tracing::info!(lease = %cfg.name, "released leadership");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_at: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn who_may_take_the_lease() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut seen = None;
        assert!(can_take(&lease(None, 0, 15), "a", &mut seen, t0), "free");
        assert!(
            can_take(&lease(Some("a"), 0, 15), "a", &mut seen, t0),
            "ours"
        );
        // Held by b: expiry counts from when a first saw this record, whatever
        // the renewTime says (b's clock may be far behind or ahead of a's).
        let held = lease(Some("b"), 1_000, 15);
        assert!(!can_take(&held, "a", &mut seen, t0), "just seen");
        assert!(!can_take(&held, "a", &mut seen, t0 + s(10)), "fresh");
        assert!(
            can_take(&held, "a", &mut seen, t0 + s(16)),
            "unchanged for 16s"
        );
        // A renewal (a new record) restarts the clock.
        let renewed = lease(Some("b"), 1_005, 15);
        assert!(!can_take(&renewed, "a", &mut seen, t0 + s(17)), "renewed");
        assert!(!can_take(&renewed, "a", &mut seen, t0 + s(30)), "13s since");
        assert!(can_take(&renewed, "a", &mut seen, t0 + s(33)), "16s since");
    }

    #[test]
    fn the_holder_gives_up_before_a_standby_may_take_over() {
        let cfg = LeaseConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(cfg.renew_every(), Duration::from_secs(5));
        assert_eq!(cfg.renew_deadline(), Duration::from_secs(10));
        assert!(cfg.renew_deadline() < cfg.duration);
    }

    #[test]
    fn taking_over_counts_a_transition() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let cfg = LeaseConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        let prev = LeaseSpec {
            holder_identity: Some("b".into()),
            lease_transitions: Some(2),
            ..Default::default()
        };
        let s = spec_for(&cfg, Some(&prev), now);
        assert_eq!(s.holder_identity.as_deref(), Some("a"));
        assert_eq!(s.lease_transitions, Some(3));
        let renew = spec_for(&cfg, Some(&s), now);
        assert_eq!(renew.lease_transitions, Some(3));
    }
}

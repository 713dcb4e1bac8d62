//! Leader election with a coordination.k8s.io Lease: only the holder reconciles.
//! A replica waits until the Lease is free or expired, takes it with an
//! optimistic-concurrency update, renews it, and reports loss (the process then
//! exits, and Kubernetes restarts it as a standby). On shutdown it releases the
//! Lease so a standby takes over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
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
}

/// Whether `lease` may be taken by `me` at `now`.
pub fn can_take(lease: &Lease, me: &str, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == me => true,
        Some(_) => {
            let duration = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15),
            );
            match &spec.renew_time {
                Some(t) => now.duration_since(t.0).unsigned_abs() > duration,
                None => true,
            }
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
async fn try_hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
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
            if !can_take(&lease, &cfg.identity, now) {
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
    loop {
        match try_hold(&api, cfg).await {
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

/// Renews the Lease until `shutdown` fires (then releases it) or the Lease is
/// lost (then cancels `lost`).
pub async fn hold(
    client: Client,
    cfg: LeaseConfig,
    shutdown: CancellationToken,
    lost: CancellationToken,
) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.renew_every()) => {}
            _ = shutdown.cancelled() => {
                release(&api, &cfg).await;
                return;
            }
        }
        match try_hold(&api, &cfg).await {
            Ok(true) => last = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %cfg.name, "lost the Lease to another replica");
                lost.cancel();
                return;
            }
            Err(e) if last.elapsed() > cfg.duration => {
                tracing::error!(error = %e, lease = %cfg.name, "could not renew the Lease within its duration");
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the Lease failed; retrying"),
        }
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaseConfig) {
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

    fn lease(holder: Option<&str>, renewed_secs_ago: i64, duration: i32) -> Lease {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                renew_time: Some(MicroTime(
                    Timestamp::from_second(now.as_second() - renewed_secs_ago).unwrap(),
                )),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn who_may_take_the_lease() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        assert!(can_take(&lease(None, 0, 15), "a", now), "free");
        assert!(can_take(&lease(Some("a"), 0, 15), "a", now), "ours");
        assert!(
            !can_take(&lease(Some("b"), 5, 15), "a", now),
            "held and fresh"
        );
        assert!(can_take(&lease(Some("b"), 16, 15), "a", now), "expired");
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

//! What differs between a JetStream object as the server reports it and as the
//! spec wants it, field by field: the operator updates only then, and reports the
//! field. Pure; table-tested against configs a real nats-server returned
//! (`operator/fixtures/`).

use async_nats::jetstream::{consumer, kv, stream};
use orderpipeline_common::names;
use orderpipeline_common::topology::OWNER_METADATA_KEY;

/// A stream's sources as (stream, filter) pairs: the part the operator sets (the
/// dead-letter stream sources the input stream's `deadlettered` outcomes).
fn sources_of(c: &stream::Config) -> Vec<(String, Option<String>)> {
    c.sources
        .iter()
        .flatten()
        .map(|s| {
            (
                s.name.clone(),
                s.filter_subject.clone().filter(|f| !f.is_empty()),
            )
        })
        .collect()
}

fn first(checks: &[(bool, &'static str)]) -> Option<&'static str> {
    checks
        .iter()
        .find_map(|&(differs, field)| differs.then_some(field))
}

/// `want` with the Idempotency-Key scope the live stream pinned: a stream keeps
/// the scope it was created with for its whole life (orders redelivered after
/// the cluster identity changed keep their key). A stream an older operator
/// created (owned, no scope) is pinned to `legacy` (`namespace/name`, the scope
/// its workers used); one being adopted takes `want`'s. Only the input stream
/// carries a scope.
pub fn pin_scope(live: &stream::Config, mut want: stream::Config, legacy: &str) -> stream::Config {
    let key = names::IDEMPOTENCY_SCOPE_METADATA;
    if !want.metadata.contains_key(key) {
        return want;
    }
    let pinned = match live.metadata.get(key) {
        Some(s) => s.clone(),
        None if live.metadata.contains_key(OWNER_METADATA_KEY) => legacy.to_string(),
        None => return want,
    };
    want.metadata.insert(key.to_string(), pinned);
    want
}

/// The first stream field NATS can change in place that differs from the spec.
pub fn stream_differs(live: &stream::Config, want: &stream::Config) -> Option<&'static str> {
    let scope = |c: &stream::Config| c.metadata.get(names::IDEMPOTENCY_SCOPE_METADATA).cloned();
    first(&[
        (scope(live) != scope(want), "idempotency scope"),
        (live.subjects != want.subjects, "subjects"),
        (live.max_age != want.max_age, "max age"),
        (live.max_bytes != want.max_bytes, "max bytes"),
        (
            live.duplicate_window != want.duplicate_window,
            "duplicate window",
        ),
        (live.num_replicas != want.num_replicas, "replicas"),
        (live.retention != want.retention, "retention"),
        (sources_of(live) != sources_of(want), "sources"),
    ])
}

/// The first consumer field the operator sets that differs. With a backoff the
/// server replaces the ack wait by the backoff's first step, so that is the ack
/// wait to expect (comparing with the spec's would update the consumer on every
/// reconcile).
pub fn consumer_differs(
    live: &consumer::Config,
    want: &consumer::pull::Config,
) -> Option<&'static str> {
    let ack_wait = want.backoff.first().copied().unwrap_or(want.ack_wait);
    first(&[
        (live.filter_subject != want.filter_subject, "filter subject"),
        (live.ack_wait != ack_wait, "ack wait"),
        (live.backoff != want.backoff, "backoff"),
        (
            live.max_ack_pending != want.max_ack_pending,
            "max ack pending",
        ),
        (live.max_deliver != want.max_deliver, "max deliver"),
    ])
}

/// The first bucket setting that differs (`live` is the bucket's stream).
pub fn bucket_differs(live: &stream::Config, want: &kv::Config) -> Option<&'static str> {
    first(&[
        (live.max_age != want.max_age, "ttl"),
        (live.num_replicas != want.num_replicas, "replicas"),
    ])
}

/// Whether this pipeline may manage the stream `name` as it is: its own (by
/// the owner metadata), or unowned under the Adopt policy (`Ok(true)`: adopt
/// it). Another pipeline's, or an unowned stream otherwise, is refused with
/// what to do.
pub fn ownership(
    name: &str,
    live: &stream::Config,
    owner: Option<&str>,
    adopt_allowed: bool,
) -> Result<bool, String> {
    let live_owner = live.metadata.get(OWNER_METADATA_KEY).map(String::as_str);
    if live_owner == owner {
        return Ok(false);
    }
    match live_owner {
        None if adopt_allowed => Ok(true),
        Some(o) => Err(format!(
            "stream {name} already belongs to pipeline {o}; give this pipeline other stream names (spec.stream.name / spec.deadLetter.streamName)"
        )),
        None => Err(format!(
            "stream {name} exists and was not created by an OrderPipeline; delete it (nats stream rm {name}) or choose another name"
        )),
    }
}

/// What NATS cannot change in place: the storage, and retention to or from
/// WorkQueue. `Some(why)` when the spec asks for such a change.
pub fn immutable_change(live: &stream::Config, want: &stream::Config) -> Option<String> {
    let name = &want.name;
    let wq = stream::RetentionPolicy::WorkQueue;
    if live.storage != want.storage {
        Some(format!(
            "stream {name} has {:?} storage but the spec asks for {:?}; NATS cannot change storage in place",
            live.storage, want.storage
        ))
    } else if (live.retention == wq) != (want.retention == wq) {
        Some(format!(
            "stream {name} has {:?} retention but the spec asks for {:?}; NATS cannot change to or from WorkQueue in place",
            live.retention, want.retention
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// `nats consumer info --json` of a consumer created with ack wait 30 s and
    /// backoff 5 s, 30 s, 120 s (nats-server 2.12): the server says ack wait 5 s.
    fn live_consumer() -> consumer::Config {
        serde_json::from_str(include_str!("../fixtures/consumer-with-backoff.json")).unwrap()
    }

    fn live_stream() -> stream::Config {
        serde_json::from_str(include_str!("../fixtures/stream.json")).unwrap()
    }

    fn wanted_consumer() -> consumer::pull::Config {
        consumer::pull::Config {
            durable_name: Some("order-workers".into()),
            filter_subject: "ORDER.created".into(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: -1,
            max_ack_pending: 1000,
            backoff: [5, 30, 120].map(Duration::from_secs).to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn consumer_fields_are_compared_as_the_server_reports_them() {
        let live = live_consumer();
        assert_eq!(
            live.ack_wait,
            Duration::from_secs(5),
            "the fixture's premise"
        );
        type Change = fn(&mut consumer::pull::Config);
        let table: [(&str, Change, Option<&str>); 6] = [
            ("as applied, backoff replacing the ack wait", |_| {}, None),
            (
                "another filter",
                |w| w.filter_subject = "ORDER.x".into(),
                Some("filter subject"),
            ),
            (
                "another backoff",
                |w| w.backoff[2] = Duration::from_secs(60),
                Some("backoff"),
            ),
            (
                "a new first backoff step",
                |w| w.backoff[0] = Duration::from_secs(1),
                Some("ack wait"),
            ),
            (
                "no backoff any more",
                |w| w.backoff.clear(),
                Some("ack wait"),
            ),
            (
                "another max ack pending",
                |w| w.max_ack_pending = 10,
                Some("max ack pending"),
            ),
        ];
        for (case, change, want) in table {
            let mut w = wanted_consumer();
            change(&mut w);
            assert_eq!(consumer_differs(&live, &w), want, "{case}");
        }
        // Without a backoff the spec's ack wait is compared as it is.
        let mut plain_live = live.clone();
        plain_live.backoff.clear();
        plain_live.ack_wait = Duration::from_secs(30);
        let mut plain = wanted_consumer();
        plain.backoff.clear();
        assert_eq!(consumer_differs(&plain_live, &plain), None);
        plain.ack_wait = Duration::from_secs(60);
        assert_eq!(consumer_differs(&plain_live, &plain), Some("ack wait"));
    }

    #[test]
    fn stream_fields_nats_changes_in_place_are_compared() {
        let live = live_stream();
        type Change = fn(&mut stream::Config);
        let table: [(&str, Change, Option<&str>); 6] = [
            ("as applied", |_| {}, None),
            (
                "max age",
                |w| w.max_age = Duration::from_secs(3600),
                Some("max age"),
            ),
            (
                "subjects",
                |w| w.subjects.push("ORDER.*.*".into()),
                Some("subjects"),
            ),
            (
                "duplicate window",
                |w| w.duplicate_window = Duration::from_secs(5),
                Some("duplicate window"),
            ),
            ("replicas", |w| w.num_replicas = 3, Some("replicas")),
            (
                "sources",
                |w| {
                    w.sources = Some(vec![stream::Source {
                        name: "ORDERS".into(),
                        filter_subject: Some("ORDER.deadlettered.*".into()),
                        ..Default::default()
                    }])
                },
                Some("sources"),
            ),
        ];
        for (case, change, want) in table {
            let mut w = live.clone();
            change(&mut w);
            assert_eq!(stream_differs(&live, &w), want, "{case}");
        }
    }

    #[test]
    fn a_stream_is_managed_only_by_its_owner_or_adopted_when_allowed() {
        let mut live = live_stream();
        assert_eq!(ownership("ORDERS", &live, Some("demo/orders"), false), Err(
            "stream ORDERS exists and was not created by an OrderPipeline; delete it (nats stream rm ORDERS) or choose another name".into()
        ));
        assert_eq!(
            ownership("ORDERS", &live, Some("demo/orders"), true),
            Ok(true)
        );
        live.metadata
            .insert(OWNER_METADATA_KEY.into(), "demo/orders".into());
        assert_eq!(
            ownership("ORDERS", &live, Some("demo/orders"), false),
            Ok(false)
        );
        let e = ownership("ORDERS", &live, Some("shop/shop"), true).unwrap_err();
        assert!(e.contains("already belongs to pipeline demo/orders"), "{e}");
    }

    #[test]
    fn the_idempotency_scope_stays_what_the_stream_was_created_with() {
        let key = names::IDEMPOTENCY_SCOPE_METADATA;
        let want = |scope: &str| {
            let mut c = live_stream();
            c.metadata
                .insert(OWNER_METADATA_KEY.into(), "demo/orders".into());
            c.metadata.insert(key.into(), scope.into());
            c
        };
        let scope_of = |c: &stream::Config| c.metadata.get(key).cloned();
        // Pinned by an earlier reconcile (another cluster id then): kept.
        let live = want("c-old/demo/orders");
        let pinned = pin_scope(&live, want("c-new/demo/orders"), "demo/orders");
        assert_eq!(scope_of(&pinned).as_deref(), Some("c-old/demo/orders"));
        assert_eq!(stream_differs(&live, &pinned), None);
        // Created by an operator before the scope: its workers' scope.
        let mut legacy = live_stream();
        legacy
            .metadata
            .insert(OWNER_METADATA_KEY.into(), "demo/orders".into());
        let pinned = pin_scope(&legacy, want("c-new/demo/orders"), "demo/orders");
        assert_eq!(scope_of(&pinned).as_deref(), Some("demo/orders"));
        assert_eq!(stream_differs(&legacy, &pinned), Some("idempotency scope"));
        // Adopted (nobody's): this cluster's. The DLQ (no scope): untouched.
        let pinned = pin_scope(&live_stream(), want("c-new/demo/orders"), "demo/orders");
        assert_eq!(scope_of(&pinned).as_deref(), Some("c-new/demo/orders"));
        assert_eq!(
            pin_scope(&live, live_stream(), "demo/orders"),
            live_stream()
        );
    }

    #[test]
    fn storage_and_workqueue_retention_cannot_change_in_place() {
        let live = live_stream();
        assert_eq!(immutable_change(&live, &live), None);
        let memory = stream::Config {
            storage: stream::StorageType::Memory,
            ..live.clone()
        };
        assert!(
            immutable_change(&live, &memory)
                .unwrap()
                .contains("cannot change storage")
        );
        let wq = stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            ..live.clone()
        };
        assert!(immutable_change(&live, &wq).unwrap().contains("WorkQueue"));
        let interest = stream::Config {
            retention: stream::RetentionPolicy::Interest,
            ..live.clone()
        };
        assert_eq!(
            immutable_change(&live, &interest),
            None,
            "NATS changes this in place"
        );
    }

    #[test]
    fn bucket_ttl_and_replicas_are_compared() {
        let live = stream::Config {
            max_age: Duration::from_secs(86_400),
            num_replicas: 1,
            ..live_stream()
        };
        let want = kv::Config {
            bucket: "ORDERS_STATE".into(),
            max_age: Duration::from_secs(86_400),
            num_replicas: 1,
            ..Default::default()
        };
        assert_eq!(bucket_differs(&live, &want), None);
        let longer = kv::Config {
            max_age: Duration::from_secs(172_800),
            ..want.clone()
        };
        assert_eq!(bucket_differs(&live, &longer), Some("ttl"));
        let r3 = kv::Config {
            num_replicas: 3,
            ..want
        };
        assert_eq!(bucket_differs(&live, &r3), Some("replicas"));
    }
}

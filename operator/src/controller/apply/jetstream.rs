use async_nats::jetstream::{self, stream};
use orderpipeline_common::topology::{OWNER_METADATA_KEY, Topology};

use crate::conditions::reasons;
use crate::crd::{ManagementPolicy, OrderPipeline};
use crate::drift;
use crate::events::EventType;

use super::super::*;

/// Pauses or resumes the consumer to match `spec.paused`.
pub(crate) async fn ensure_paused(
    p: &OrderPipeline,
    ctx: &Context,
    js: &jetstream::Context,
    t: &Topology,
    figures: &Result<Figures, String>,
) -> Result<(), NotReady> {
    let Ok(f) = figures else { return Ok(()) };
    if f.consumer_paused == p.spec.paused {
        return Ok(());
    }
    let s = js.get_stream(&t.stream).await.map_err(|e| {
        NotReady::new(
            Cause::JetStreamError,
            format!("reading stream {}: {e}", t.stream),
        )
    })?;
    if p.spec.paused {
        let until = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100);
        s.pause_consumer(&t.consumer, until).await.map_err(|e| {
            NotReady::new(
                Cause::JetStreamError,
                format!("pausing consumer {}: {e}", t.consumer),
            )
        })?;
        ctx.event(
            p,
            EventType::Normal,
            "Paused",
            "Pause",
            // The workers' scale to zero has its own Event, once the
            // Deployment has been patched.
            format!(
                "paused consumer {}; the stream keeps accepting orders",
                t.consumer
            ),
        )
        .await;
    } else {
        s.resume_consumer(&t.consumer).await.map_err(|e| {
            NotReady::new(
                Cause::JetStreamError,
                format!("resuming consumer {}: {e}", t.consumer),
            )
        })?;
        ctx.event(
            p,
            EventType::Normal,
            "Resumed",
            "Resume",
            format!("resumed consumer {}", t.consumer),
        )
        .await;
    }
    Ok(())
}

/// Creates or updates the stream, DLQ stream, KV bucket and consumer; refuses a
/// stream that belongs to something else or that NATS cannot change in place.
pub(crate) async fn ensure_topology(
    p: &OrderPipeline,
    ctx: &Context,
    js: &jetstream::Context,
    t: &Topology,
    drift: bool,
) -> Result<(), NotReady> {
    // Drift (a change made behind the operator's back) is reported as such, as
    // a Warning whatever the object: the Event for a change is `reason`
    // (Normal), or DriftCorrected (Warning).
    let report = move |reason: &str, action: &'static str, message: String| {
        let (type_, reason, message) = if drift {
            (
                EventType::Warning,
                reasons::DRIFT_CORRECTED.to_string(),
                format!("{message} (it had been changed outside the operator)"),
            )
        } else {
            (EventType::Normal, reason.to_string(), message)
        };
        async move { ctx.event(p, type_, &reason, action, message).await }
    };
    // The same for a creation: under drift the object had been deleted.
    let created = move |reason: &str, object: String, message: String| {
        let (type_, reason, message) = if drift {
            (
                EventType::Warning,
                reasons::DRIFT_CORRECTED.to_string(),
                format!("recreated {object}: it had been deleted outside the operator"),
            )
        } else {
            (EventType::Normal, reason.to_string(), message)
        };
        async move { ctx.event(p, type_, &reason, "Create", message).await }
    };
    let api_err = |what: &str, e: &dyn std::fmt::Display| {
        let s = e.to_string();
        if s.contains("timed out") || s.contains("no responders") || s.contains("disconnected") {
            NotReady::new(
                Cause::NatsUnreachable,
                format!(
                    "{what}: NATS did not answer ({s}); check that nats-server (with JetStream) runs at {}",
                    p.spec.nats.url
                ),
            )
        } else {
            NotReady::new(Cause::JetStreamError, format!("{what}: {s}"))
        }
    };
    for (cfg, what) in [
        (t.stream_config(), "Stream"),
        (t.dlq_stream_config(), "DeadLetterStream"),
    ] {
        let name = cfg.name.clone();
        match js.get_stream(&name).await {
            Ok(mut s) => {
                let live = s
                    .info()
                    .await
                    .map_err(|e| api_err(&format!("reading stream {name}"), &e))?
                    .config
                    .clone();
                let owner = live.metadata.get(OWNER_METADATA_KEY).cloned();
                let adopt = owner.is_none() && p.spec.management_policy == ManagementPolicy::Adopt;
                if owner.as_deref() != t.owner.as_deref() && !adopt {
                    let msg = match owner {
                        Some(o) => format!(
                            "stream {name} already belongs to pipeline {o}; give this pipeline other stream names (spec.stream.name / spec.deadLetter.streamName)"
                        ),
                        None => format!(
                            "stream {name} exists and was not created by an OrderPipeline; delete it (nats stream rm {name}) or choose another name"
                        ),
                    };
                    return Err(NotReady::new(Cause::StreamConflict, msg));
                }
                let wq = stream::RetentionPolicy::WorkQueue;
                let immutable = if live.storage != cfg.storage {
                    Some(format!(
                        "stream {name} has {:?} storage but the spec asks for {:?}; NATS cannot change storage in place",
                        live.storage, cfg.storage
                    ))
                } else if (live.retention == wq) != (cfg.retention == wq) {
                    Some(format!(
                        "stream {name} has {:?} retention but the spec asks for {:?}; NATS cannot change to or from WorkQueue in place",
                        live.retention, cfg.retention
                    ))
                } else {
                    None
                };
                if let Some(why) = immutable {
                    if !p.spec.stream.recreate_on_immutable_change {
                        return Err(NotReady::new(
                            Cause::StreamIncompatible,
                            format!(
                                "{why}: set spec.stream.recreateOnImmutableChange: true to delete and recreate it (its messages are lost), or recreate it by hand"
                            ),
                        ));
                    }
                    js.delete_stream(&name)
                        .await
                        .map_err(|e| api_err(&format!("deleting stream {name}"), &e))?;
                    js.create_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("recreating stream {name}"), &e))?;
                    ctx.event(
                        p,
                        EventType::Warning,
                        "StreamRecreated",
                        "Recreate",
                        format!("{why}; recreated it (spec.stream.recreateOnImmutableChange)"),
                    )
                    .await;
                    continue;
                }
                if adopt {
                    js.update_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("adopting stream {name}"), &e))?;
                    ctx.event(
                        p,
                        EventType::Normal,
                        "Adopted",
                        "Adopt",
                        format!("adopted existing stream {name} (managementPolicy Adopt)"),
                    )
                    .await;
                } else if let Some(field) = drift::stream_differs(&live, &cfg) {
                    js.update_stream(cfg.clone())
                        .await
                        .map_err(|e| api_err(&format!("updating stream {name}"), &e))?;
                    report(
                        &format!("{what}Updated"),
                        "Update",
                        format!("updated stream {name} ({field} changed)"),
                    )
                    .await;
                }
            }
            Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
                js.create_stream(cfg.clone())
                    .await
                    .map_err(|e| api_err(&format!("creating stream {name}"), &e))?;
                created(
                    &format!("{what}Created"),
                    format!("stream {name}"),
                    format!("created stream {name} on {:?}", cfg.subjects),
                )
                .await;
            }
            Err(e) => return Err(api_err(&format!("reading stream {name}"), &e)),
        }
    }
    // The bucket's settings (TTL, replicas) follow the spec like the streams'.
    let bucket_stream = format!("KV_{}", t.bucket);
    match js.get_stream(&bucket_stream).await {
        Ok(mut s) => {
            let live = s
                .info()
                .await
                .map_err(|e| api_err(&format!("reading KV bucket {}", t.bucket), &e))?
                .config
                .clone();
            let want = t.kv_config();
            if let Some(field) = drift::bucket_differs(&live, &want) {
                js.update_key_value(want)
                    .await
                    .map_err(|e| api_err(&format!("updating KV bucket {}", t.bucket), &e))?;
                report(
                    "BucketUpdated",
                    "Update",
                    format!("updated KV bucket {} ({field} changed)", t.bucket),
                )
                .await;
            }
        }
        Err(e) if !orderpipeline_common::nats::is_not_found(&e) => {
            return Err(api_err(&format!("reading KV bucket {}", t.bucket), &e));
        }
        Err(_) => {
            js.create_or_update_key_value(t.kv_config())
                .await
                .map_err(|e| api_err(&format!("creating KV bucket {}", t.bucket), &e))?;
            created(
                "BucketCreated",
                format!("KV bucket {}", t.bucket),
                format!("created KV bucket {}", t.bucket),
            )
            .await;
        }
    }
    let mut desired = t.consumer_config();
    if p.spec.paused {
        // Keep a paused consumer paused when its config is rewritten.
        desired.pause_until =
            Some(time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100));
    }
    let s = js
        .get_stream(&t.stream)
        .await
        .map_err(|e| api_err(&format!("reading stream {}", t.stream), &e))?;
    match s.consumer_info(&t.consumer).await {
        Ok(info) => {
            if let Some(field) = drift::consumer_differs(&info.config, &desired) {
                s.create_consumer(desired.clone())
                    .await
                    .map_err(|e| api_err(&format!("updating consumer {}", t.consumer), &e))?;
                report(
                    "ConsumerUpdated",
                    "Update",
                    format!(
                        "updated consumer {} ({field} changed; max ack pending {}, ack wait {:?})",
                        t.consumer, desired.max_ack_pending, desired.ack_wait
                    ),
                )
                .await;
            }
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
            s.create_consumer(desired.clone())
                .await
                .map_err(|e| api_err(&format!("creating consumer {}", t.consumer), &e))?;
            created(
                "ConsumerCreated",
                format!("consumer {}", t.consumer),
                format!(
                    "created durable consumer {} filtering {}",
                    t.consumer, t.filter_subject
                ),
            )
            .await;
        }
        Err(e) => return Err(api_err(&format!("reading consumer {}", t.consumer), &e)),
    }
    Ok(())
}

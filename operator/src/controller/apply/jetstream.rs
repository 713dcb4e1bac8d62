use async_nats::jetstream::{self, stream};
use orderpipeline_common::topology::Topology;

use crate::crd::{ManagementPolicy, OrderPipeline};
use crate::drift;
use crate::events::{Kind, Object};

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
        s.pause_consumer(&t.consumer, pause_forever())
            .await
            .map_err(|e| {
                NotReady::new(
                    Cause::JetStreamError,
                    format!("pausing consumer {}: {e}", t.consumer),
                )
            })?;
        // The workers' scale to zero has its own Event, once the Deployment
        // has been patched.
        ctx.event(
            p,
            Kind::Paused,
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
        ctx.event(p, Kind::Resumed, format!("resumed consumer {}", t.consumer))
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
    let r = Reporter { p, ctx, drift };
    ensure_stream(&r, js, t, t.stream_config(), Object::Stream).await?;
    ensure_stream(&r, js, t, t.dlq_stream_config(), Object::DeadLetterStream).await?;
    ensure_bucket(&r, js, t).await?;
    ensure_consumer(&r, js, t).await
}

/// How this reconcile reports what it changes. Drift (a change made behind the
/// operator's back) is reported as such, as a Warning whatever the object: the
/// Event for a change is `reason` (Normal), or DriftCorrected (Warning).
struct Reporter<'a> {
    p: &'a OrderPipeline,
    ctx: &'a Context,
    drift: bool,
}

impl Reporter<'_> {
    async fn changed(&self, object: Object, message: String) {
        if self.drift {
            let note = format!("{message} (it had been changed outside the operator)");
            self.warn("Update", note).await;
        } else {
            self.ctx.event(self.p, Kind::Updated(object), message).await;
        }
    }

    /// The same for a creation: under drift the object had been deleted.
    async fn created(&self, object: Object, name: String, message: String) {
        if self.drift {
            let note = format!("recreated {name}: it had been deleted outside the operator");
            self.warn("Create", note).await;
        } else {
            self.ctx.event(self.p, Kind::Created(object), message).await;
        }
    }

    async fn warn(&self, action: &'static str, note: String) {
        let kind = Kind::DriftCorrected { action };
        self.ctx.event(self.p, kind, note).await;
    }

    /// A failed JetStream request: NATS not answering, or an API error.
    fn api_err(&self, what: &str, e: &dyn std::fmt::Display) -> NotReady {
        let s = e.to_string();
        if s.contains("timed out") || s.contains("no responders") || s.contains("disconnected") {
            NotReady::new(
                Cause::NatsUnreachable,
                format!(
                    "{what}: NATS did not answer ({s}); check that nats-server (with JetStream) runs at {}",
                    self.p.spec.nats.url
                ),
            )
        } else {
            NotReady::new(Cause::JetStreamError, format!("{what}: {s}"))
        }
    }
}

/// One stream (the input or the dead-letter stream): created when missing,
/// else checked and brought to the spec.
async fn ensure_stream(
    r: &Reporter<'_>,
    js: &jetstream::Context,
    t: &Topology,
    cfg: stream::Config,
    what: Object,
) -> Result<(), NotReady> {
    let name = cfg.name.clone();
    match js.get_stream(&name).await {
        Ok(mut s) => {
            let live = s
                .info()
                .await
                .map_err(|e| r.api_err(&format!("reading stream {name}"), &e))?
                .config
                .clone();
            update_stream(r, js, t, live, cfg, what).await
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
            js.create_stream(cfg.clone())
                .await
                .map_err(|e| r.api_err(&format!("creating stream {name}"), &e))?;
            let note = format!("created stream {name} on {:?}", cfg.subjects);
            r.created(what, format!("stream {name}"), note).await;
            Ok(())
        }
        Err(e) => Err(r.api_err(&format!("reading stream {name}"), &e)),
    }
}

/// An existing stream: refused when another owns it; recreated (only when the
/// spec allows) when NATS cannot change it in place; else adopted or updated.
async fn update_stream(
    r: &Reporter<'_>,
    js: &jetstream::Context,
    t: &Topology,
    live: stream::Config,
    cfg: stream::Config,
    what: Object,
) -> Result<(), NotReady> {
    let (p, name) = (r.p, cfg.name.clone());
    let adopt_allowed = p.spec.management_policy == ManagementPolicy::Adopt;
    let adopt = drift::ownership(&name, &live, t.owner.as_deref(), adopt_allowed)
        .map_err(|msg| NotReady::new(Cause::StreamConflict, msg))?;
    if let Some(why) = drift::immutable_change(&live, &cfg) {
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
            .map_err(|e| r.api_err(&format!("deleting stream {name}"), &e))?;
        js.create_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("recreating stream {name}"), &e))?;
        let note = format!("{why}; recreated it (spec.stream.recreateOnImmutableChange)");
        r.ctx.event(p, Kind::StreamRecreated, note).await;
    } else if adopt {
        js.update_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("adopting stream {name}"), &e))?;
        let note = format!("adopted existing stream {name} (managementPolicy Adopt)");
        r.ctx.event(p, Kind::Adopted, note).await;
    } else if let Some(field) = drift::stream_differs(&live, &cfg) {
        js.update_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("updating stream {name}"), &e))?;
        let note = format!("updated stream {name} ({field} changed)");
        r.changed(what, note).await;
    }
    Ok(())
}

/// The KV bucket (left from the protocol before v2): its settings (TTL,
/// replicas) follow the spec like the streams'.
async fn ensure_bucket(
    r: &Reporter<'_>,
    js: &jetstream::Context,
    t: &Topology,
) -> Result<(), NotReady> {
    let bucket = &t.bucket;
    match js.get_stream(format!("KV_{bucket}")).await {
        Ok(mut s) => {
            let live = s
                .info()
                .await
                .map_err(|e| r.api_err(&format!("reading KV bucket {bucket}"), &e))?
                .config
                .clone();
            let want = t.kv_config();
            if let Some(field) = drift::bucket_differs(&live, &want) {
                js.update_key_value(want)
                    .await
                    .map_err(|e| r.api_err(&format!("updating KV bucket {bucket}"), &e))?;
                let note = format!("updated KV bucket {bucket} ({field} changed)");
                r.changed(Object::Bucket, note).await;
            }
            Ok(())
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
            js.create_or_update_key_value(t.kv_config())
                .await
                .map_err(|e| r.api_err(&format!("creating KV bucket {bucket}"), &e))?;
            let note = format!("created KV bucket {bucket}");
            r.created(Object::Bucket, format!("KV bucket {bucket}"), note)
                .await;
            Ok(())
        }
        Err(e) => Err(r.api_err(&format!("reading KV bucket {bucket}"), &e)),
    }
}

/// The durable consumer: created when missing, rewritten when a field the
/// operator sets differs (a paused one stays paused).
async fn ensure_consumer(
    r: &Reporter<'_>,
    js: &jetstream::Context,
    t: &Topology,
) -> Result<(), NotReady> {
    let mut desired = t.consumer_config();
    if r.p.spec.paused {
        desired.pause_until = Some(pause_forever());
    }
    let consumer = &t.consumer;
    let s = js
        .get_stream(&t.stream)
        .await
        .map_err(|e| r.api_err(&format!("reading stream {}", t.stream), &e))?;
    match s.consumer_info(consumer).await {
        Ok(info) => {
            if let Some(field) = drift::consumer_differs(&info.config, &desired) {
                s.create_consumer(desired.clone())
                    .await
                    .map_err(|e| r.api_err(&format!("updating consumer {consumer}"), &e))?;
                let note = format!(
                    "updated consumer {consumer} ({field} changed; max ack pending {}, ack wait {:?})",
                    desired.max_ack_pending, desired.ack_wait
                );
                r.changed(Object::Consumer, note).await;
            }
            Ok(())
        }
        Err(e) if orderpipeline_common::nats::is_not_found(&e) => {
            s.create_consumer(desired)
                .await
                .map_err(|e| r.api_err(&format!("creating consumer {consumer}"), &e))?;
            let note = format!(
                "created durable consumer {consumer} filtering {}",
                t.filter_subject
            );
            r.created(Object::Consumer, format!("consumer {consumer}"), note)
                .await;
            Ok(())
        }
        Err(e) => Err(r.api_err(&format!("reading consumer {consumer}"), &e)),
    }
}

/// A consumer pause that lasts until `spec.paused` is set back to false.
fn pause_forever() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(365 * 100)
}

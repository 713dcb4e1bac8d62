use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::stream;
use orderpipeline_common::topology::Topology;

use crate::crd::{ManagementPolicy, OrderPipeline};
use crate::drift;
use crate::events::{Kind, Object};

use super::super::jetstream_api::{ConsumerView, JetStream, JsError, StreamView, pause_forever};
use super::super::*;

/// Pauses or resumes the consumer to match `spec.paused`.
pub(crate) async fn ensure_paused(
    p: &OrderPipeline,
    ctx: &Context,
    js: &dyn JetStream,
    t: &Topology,
    figures: &Result<Figures, String>,
) -> Result<(), NotReady> {
    let Ok(f) = figures else { return Ok(()) };
    if f.consumer_paused == p.spec.paused {
        return Ok(());
    }
    let what = if p.spec.paused { "pausing" } else { "resuming" };
    js.set_paused(&t.stream, &t.consumer, p.spec.paused)
        .await
        .map_err(|e| {
            NotReady::new(
                Cause::JetStreamError,
                format!("{what} consumer {}: {e}", t.consumer),
            )
        })?;
    if p.spec.paused {
        // The workers' scale to zero has its own Event, once the Deployment
        // has been patched.
        let note = format!(
            "paused consumer {}; the stream keeps accepting orders",
            t.consumer
        );
        ctx.event(p, Kind::Paused, note).await;
    } else {
        let note = format!("resumed consumer {}", t.consumer);
        ctx.event(p, Kind::Resumed, note).await;
    }
    Ok(())
}

/// What [`ensure_topology`] read of the objects it left as they were: the
/// status figures come from these reads instead of a second request each
/// (`None`: created or changed, or not read, so it is read again).
#[derive(Clone, Debug, Default)]
pub(crate) struct Seen {
    pub(crate) stream: Option<StreamView>,
    pub(crate) dlq: Option<StreamView>,
    /// `Some(None)`: read, and there is no bucket (a pipeline not from v1).
    pub(crate) bucket: Option<Option<StreamView>>,
    pub(crate) consumer: Option<ConsumerView>,
}

/// Creates or updates the stream, DLQ stream, KV bucket and consumer; refuses a
/// stream that belongs to something else or that NATS cannot change in place.
pub(crate) async fn ensure_topology(
    p: &OrderPipeline,
    ctx: &Context,
    js: &dyn JetStream,
    t: &Topology,
    drift: bool,
    old: &crate::crd::OrderPipelineStatus,
) -> Result<Seen, NotReady> {
    let r = Reporter {
        p,
        ctx,
        drift,
        old,
        created: Default::default(),
    };
    let seen = async {
        Ok(Seen {
            stream: ensure_stream(&r, js, t, t.stream_config(), Object::Stream).await?,
            dlq: ensure_stream(&r, js, t, t.dlq_stream_config(), Object::DeadLetterStream).await?,
            bucket: ensure_bucket(&r, js, t).await?,
            consumer: ensure_consumer(&r, js, t).await?,
        })
    }
    .await;
    // What was created before a step failed is reported too.
    r.report_created().await;
    seen
}

/// How this reconcile reports what it changes. Drift (a change made behind the
/// operator's back) is reported as such, as a Warning whatever the object: the
/// Event for a change is `reason` (Normal), or DriftCorrected (Warning).
struct Reporter<'a> {
    p: &'a OrderPipeline,
    ctx: &'a Context,
    drift: bool,
    /// The status before this reconcile (where a lost consumer resumes).
    old: &'a crate::crd::OrderPipelineStatus,
    /// What this reconcile created, for one Event naming all of it.
    created: std::sync::Mutex<Vec<String>>,
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

    /// The same for a creation: under drift the object had been deleted (one
    /// Warning each); else `what` joins one Event for all the objects created.
    async fn created(&self, name: String, what: String) {
        if self.drift {
            let note = format!("recreated {name}: it had been deleted outside the operator");
            self.warn("Create", note).await;
        } else {
            self.created.lock().unwrap().push(what);
        }
    }

    /// A consumer the pipeline had and NATS no longer has (deleted by someone,
    /// or lost by the server), recreated: a Warning, drift or not.
    async fn lost(&self, name: String, from: String) {
        let note = format!(
            "recreated {name}, which NATS no longer had (deleted outside the operator, or lost by the server), {from}"
        );
        self.warn("Create", note).await;
    }

    /// One Event naming every JetStream object this reconcile created (a new
    /// pipeline: its stream, dead-letter stream and consumer).
    async fn report_created(&self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap());
        if let Some(note) = created_note(&created) {
            self.ctx.event(self.p, Kind::JetStreamCreated, note).await;
        }
    }

    async fn warn(&self, action: &'static str, note: String) {
        let kind = Kind::DriftCorrected { action };
        self.ctx.event(self.p, kind, note).await;
    }

    /// A failed JetStream request: NATS not answering, or an API error.
    fn api_err(&self, what: &str, e: JsError) -> NotReady {
        match e {
            JsError::Unreachable(s) => NotReady::new(
                Cause::NatsUnreachable,
                format!(
                    "{what}: NATS did not answer ({s}); check that nats-server (with JetStream) runs at {}",
                    self.p.spec.nats.url
                ),
            ),
            JsError::Api(s) => NotReady::new(Cause::JetStreamError, format!("{what}: {s}")),
        }
    }
}

/// One stream (the input or the dead-letter stream): created when missing,
/// else checked and brought to the spec. The stream as read when it was left
/// as it was.
async fn ensure_stream(
    r: &Reporter<'_>,
    js: &dyn JetStream,
    t: &Topology,
    cfg: stream::Config,
    what: Object,
) -> Result<Option<StreamView>, NotReady> {
    let name = cfg.name.clone();
    let live = js
        .stream(&name)
        .await
        .map_err(|e| r.api_err(&format!("reading stream {name}"), e))?;
    if let Some(live) = live {
        let changed = update_stream(r, js, t, &live.config, cfg, what).await?;
        return Ok((!changed).then_some(live));
    }
    let note = format!("stream {name} on {:?}", cfg.subjects);
    js.create_stream(cfg)
        .await
        .map_err(|e| r.api_err(&format!("creating stream {name}"), e))?;
    r.created(format!("stream {name}"), note).await;
    Ok(None)
}

/// An existing stream: refused when another owns it; recreated (only when the
/// spec allows) when NATS cannot change it in place; else adopted or updated.
/// Whether it changed anything.
async fn update_stream(
    r: &Reporter<'_>,
    js: &dyn JetStream,
    t: &Topology,
    live: &stream::Config,
    cfg: stream::Config,
    what: Object,
) -> Result<bool, NotReady> {
    let (p, name) = (r.p, cfg.name.clone());
    let cfg = drift::pin_scope(live, cfg, &key_of(p));
    let adopt_allowed = p.spec.management_policy == ManagementPolicy::Adopt;
    let adopt = drift::ownership(&name, live, t.owner.as_deref(), adopt_allowed)
        .map_err(|msg| NotReady::new(Cause::StreamConflict, msg))?;
    if let Some(why) = drift::immutable_change(live, &cfg) {
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
            .map_err(|e| r.api_err(&format!("deleting stream {name}"), e))?;
        js.create_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("recreating stream {name}"), e))?;
        let note = format!("{why}; recreated it (spec.stream.recreateOnImmutableChange)");
        r.ctx.event(p, Kind::StreamRecreated, note).await;
    } else if adopt {
        js.update_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("adopting stream {name}"), e))?;
        let note = format!("adopted existing stream {name} (managementPolicy Adopt)");
        r.ctx.event(p, Kind::Adopted, note).await;
    } else if let Some(field) = drift::stream_differs(live, &cfg) {
        js.update_stream(cfg)
            .await
            .map_err(|e| r.api_err(&format!("updating stream {name}"), e))?;
        let note = format!("updated stream {name} ({field} changed)");
        r.changed(what, note).await;
    } else {
        return Ok(false);
    }
    Ok(true)
}

/// The KV bucket of the protocol before v2, on a pipeline upgraded from v1:
/// while it exists its settings (TTL, replicas) follow the spec like the
/// streams'. It is never created: v2 keeps each order's outcome in the stream,
/// so a new pipeline has no bucket.
async fn ensure_bucket(
    r: &Reporter<'_>,
    js: &dyn JetStream,
    t: &Topology,
) -> Result<Option<Option<StreamView>>, NotReady> {
    let bucket = &t.bucket;
    let want = t.kv_config();
    let live = js
        .stream(&format!("KV_{bucket}"))
        .await
        .map_err(|e| r.api_err(&format!("reading KV bucket {bucket}"), e))?;
    let Some(live) = live else {
        return Ok(Some(None));
    };
    let Some(field) = drift::bucket_differs(&live.config, &want) else {
        return Ok(Some(Some(live)));
    };
    js.put_bucket(want)
        .await
        .map_err(|e| r.api_err(&format!("updating KV bucket {bucket}"), e))?;
    let note = format!("updated KV bucket {bucket} ({field} changed)");
    r.changed(Object::Bucket, note).await;
    Ok(None)
}

/// The durable consumer: created when missing, rewritten when a field the
/// operator sets differs (a paused one stays paused).
async fn ensure_consumer(
    r: &Reporter<'_>,
    js: &dyn JetStream,
    t: &Topology,
) -> Result<Option<ConsumerView>, NotReady> {
    let mut desired = t.consumer_config();
    if r.p.spec.paused {
        desired.pause_until = Some(pause_forever());
    }
    let consumer = &t.consumer;
    let live = js
        .consumer(&t.stream, consumer)
        .await
        .map_err(|e| r.api_err(&format!("reading consumer {consumer}"), e))?;
    match live {
        Some(live) => {
            let Some(field) = drift::consumer_differs(&live.config, &desired) else {
                return Ok(Some(live));
            };
            let note = format!(
                "updated consumer {consumer} ({field} changed; max ack pending {}, ack wait {:?})",
                desired.max_ack_pending, desired.ack_wait
            );
            js.put_consumer(&t.stream, desired)
                .await
                .map_err(|e| r.api_err(&format!("updating consumer {consumer}"), e))?;
            r.changed(Object::Consumer, note).await;
        }
        None => {
            // A consumer this pipeline had (its status shows it) resumes after
            // the ack floor last read, not from the start of the stream.
            let lost = match r.old.consumer.is_some() {
                true => lost_consumer(r, js, t).await?,
                false => None,
            };
            let resume = lost.flatten();
            if let Some(start) = resume {
                desired.deliver_policy = DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                };
            }
            js.put_consumer(&t.stream, desired)
                .await
                .map_err(|e| r.api_err(&format!("creating consumer {consumer}"), e))?;
            let from = match resume {
                Some(s) => format!(
                    "from stream sequence {s}: every input up to {} was acknowledged when last read, so none is delivered again",
                    s - 1
                ),
                None => "from the start of the stream".into(),
            };
            match lost {
                Some(_) => r.lost(format!("consumer {consumer}"), from).await,
                None => {
                    let note =
                        format!("durable consumer {consumer} filtering {}", t.filter_subject);
                    r.created(format!("consumer {consumer}"), note).await;
                }
            }
        }
    }
    Ok(None)
}

/// A missing consumer that this pipeline had on the same stream (not a new
/// stream's first consumer): `Some(where it resumes)`, see
/// [`stall::resume_from`]. One read of the stream, on this rare path only.
async fn lost_consumer(
    r: &Reporter<'_>,
    js: &dyn JetStream,
    t: &Topology,
) -> Result<Option<Option<u64>>, NotReady> {
    let live = js
        .stream(&t.stream)
        .await
        .map_err(|e| r.api_err(&format!("reading stream {}", t.stream), e))?;
    Ok(live
        .filter(|live| stall::same_stream(r.old, live))
        .map(|live| stall::resume_from(r.old, &live)))
}

/// "created a, b and c", or nothing when nothing was created.
fn created_note(created: &[String]) -> Option<String> {
    let (last, rest) = created.split_last()?;
    Some(match rest {
        [] => format!("created {last}"),
        _ => format!("created {} and {last}", rest.join(", ")),
    })
}

#[cfg(test)]
mod tests {
    use super::created_note;

    #[test]
    fn one_note_names_every_object_created() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(created_note(&[]), None);
        assert_eq!(
            created_note(&s(&["stream A on [\"a\"]"])).as_deref(),
            Some("created stream A on [\"a\"]")
        );
        assert_eq!(
            created_note(&s(&["stream A", "stream A_DLQ", "durable consumer c"])).as_deref(),
            Some("created stream A, stream A_DLQ and durable consumer c")
        );
    }
}

use std::sync::Arc;

use kube::ResourceExt as _;
use kube::runtime::controller::Action;
use orderpipeline_common::topology::OWNER_METADATA_KEY;

use crate::crd::{DeletionPolicy, ManagementPolicy, OrderPipeline};
use crate::events::Kind;

use super::jetstream_api::StreamView;
use super::*;

/// Deletion: `Retain` keeps the JetStream objects; `Delete` removes them. If NATS
/// stays unreachable for CLEANUP_GIVE_UP after the deletion was requested (or
/// the pipeline carries `orderpipeline.dev/skip-cleanup: "true"`), the finalizer
/// gives up so the pipeline can still be deleted, and says so in an Event.
pub(crate) async fn cleanup(p: Arc<OrderPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = key_of(&p);
    let observe = p.spec.management_policy == ManagementPolicy::Observe;
    if p.spec.stream.deletion_policy == DeletionPolicy::Retain || observe {
        let why = if observe {
            "managementPolicy Observe"
        } else {
            "deletionPolicy Retain"
        };
        ctx.release_nats(&key).await;
        ctx.event(
            &p,
            Kind::Retained,
            format!(
                "{why}: kept streams {} and {} (and bucket {}, if a pipeline upgraded from v1 still has it)",
                p.spec.stream.name,
                p.spec.dlq_stream(),
                p.spec.state_bucket()
            ),
        )
        .await;
        ctx.metrics.forget(&key);
        return Ok(Action::await_change());
    }
    let skip = p
        .annotations()
        .get(SKIP_CLEANUP_ANNOTATION)
        .is_some_and(|v| v == "true");
    let waited = p
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| {
            k8s_openapi::jiff::Timestamp::now()
                .duration_since(t.0)
                .unsigned_abs()
        })
        .unwrap_or_default();
    let outcome = if skip {
        Err("skip-cleanup annotation set".to_string())
    } else {
        delete_topology(&p, &ctx).await
    };
    match outcome {
        Ok(Removal { kept, bucket }) => {
            ctx.release_nats(&key).await;
            ctx.metrics.forget(&key);
            let note = if kept.is_empty() {
                format!(
                    "deleted consumer {}, streams {} and {}{}",
                    p.spec.consumer.name,
                    p.spec.stream.name,
                    p.spec.dlq_stream(),
                    bucket.map_or_else(String::new, |b| format!(", bucket {b}"))
                )
            } else {
                format!(
                    "deleted what this pipeline owned; kept {} (not created by this pipeline)",
                    kept.join(", ")
                )
            };
            ctx.event(&p, Kind::Deleted, note).await;
            Ok(Action::await_change())
        }
        Err(e) if skip || waited >= CLEANUP_GIVE_UP => {
            ctx.release_nats(&key).await;
            ctx.metrics.forget(&key);
            ctx.event(&p, Kind::CleanupAbandoned, format!("gave up deleting the JetStream objects ({e}); delete them by hand: nats stream rm {}; nats stream rm {}; nats kv del {}", p.spec.stream.name, p.spec.dlq_stream(), p.spec.state_bucket())).await;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.event(&p, Kind::CleanupFailed, format!("cannot delete the JetStream objects yet ({e}); retrying, giving up after {}s (or set annotation {SKIP_CLEANUP_ANNOTATION}=true)", CLEANUP_GIVE_UP.as_secs())).await;
            Err(Error::Nats(e))
        }
    }
}

/// What a `Delete` cleanup did.
pub(crate) struct Removal {
    /// What was kept (not this pipeline's).
    pub kept: Vec<String>,
    /// The bucket of the protocol before v2 it deleted, if there was one.
    pub bucket: Option<String>,
}

/// Deletes the pipeline's streams and, on a pipeline upgraded from v1, its KV
/// bucket, but only what it owns: a stream whose owner metadata names another
/// pipeline (or none: it was never created or adopted by this one) is kept, and
/// so is the bucket unless the input stream is this pipeline's.
pub(crate) async fn delete_topology(p: &OrderPipeline, ctx: &Context) -> Result<Removal, String> {
    let key = key_of(p);
    // The same Secrets, TLS files and shared connection as a reconcile.
    let js = dereference::world(p, ctx).await.map_err(|b| b.message)?.js;
    let owned = |s: Option<StreamView>| {
        s.map(|s| {
            s.config
                .metadata
                .get(OWNER_METADATA_KEY)
                .map(String::as_str)
                == Some(&key)
        })
    };
    let read = |name: String| {
        let js = js.clone();
        async move {
            js.stream(&name)
                .await
                .map_err(|e| format!("reading stream {name}: {e}"))
        }
    };
    let input = owned(read(p.spec.stream.name.clone()).await?);
    let dlq = owned(read(p.spec.dlq_stream()).await?);
    let bucket = p.spec.state_bucket();
    let has_bucket = read(format!("KV_{bucket}")).await?.is_some();
    let mut kept = Vec::new();
    let mut deleted_bucket = None;
    // Already gone is what a deletion wants (`false` from a delete).
    if has_bucket && input == Some(true) {
        js.delete_bucket(&bucket).await.map_err(|e| e.to_string())?;
        deleted_bucket = Some(bucket);
    } else if has_bucket {
        kept.push(format!("bucket {bucket}"));
    }
    for (name, owned) in [(&p.spec.stream.name, input), (&p.spec.dlq_stream(), dlq)] {
        match owned {
            Some(true) => {
                js.delete_stream(name).await.map_err(|e| e.to_string())?;
            }
            Some(false) => kept.push(format!("stream {name}")),
            None => {}
        }
    }
    Ok(Removal {
        kept,
        bucket: deleted_bucket,
    })
}

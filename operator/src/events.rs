//! Kubernetes Events (`events.k8s.io/v1`) about the pipelines.
//!
//! A repeat of the same event within six minutes grows a series (one Event whose
//! `series.count` goes up; kubectl shows "(x3 over 2m)"), as client-go's recorder
//! does. "The same" means the same object, type, reason, action, related object
//! *and note*. kube-runtime 5's `Recorder` leaves the note out of that key, so a
//! later event with another message (the next dead-letter count, a second
//! `DriftCorrected` object in the same resync) only bumped the first Event's count
//! and kept its stale message.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType};
use tokio::sync::Mutex;

/// An object of the pipeline that Events are about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Stream,
    DeadLetterStream,
    Bucket,
    Consumer,
    Deployment,
}

/// Every Event the operator publishes: its reason, action and type in one
/// place (the reasons are what alerts and `kubectl get events` filter on).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every JetStream object one reconcile created, in one Event.
    JetStreamCreated,
    DeploymentCreated,
    Updated(Object),
    /// A change made outside the operator, undone (`action`: Create, Update).
    DriftCorrected {
        action: &'static str,
    },
    /// Deleted and recreated because NATS cannot change it in place.
    StreamRecreated,
    Adopted,
    Paused,
    Resumed,
    Scaled,
    WindowTooShort,
    DeadLettersGrew,
    /// The input stream's limits removed orders before they were processed.
    InputsRemovedUnprocessed,
    /// The oldest unprocessed order reached half the input stream's maxAge.
    OldestUnprocessedAging,
    /// The consumer delivers nothing while orders wait (see `controller::stall`).
    Stalled,
    /// A Stalled consumer moves again (or has nothing left to do).
    StallEnded,
    Retained,
    Deleted,
    CleanupAbandoned,
    CleanupFailed,
    /// A reconcile that cannot go on, with the Ready condition's reason.
    NotReady {
        reason: &'static str,
    },
}

impl Kind {
    pub fn reason(self) -> &'static str {
        use Object::*;
        match self {
            Kind::JetStreamCreated => "JetStreamCreated",
            Kind::DeploymentCreated => "DeploymentCreated",
            Kind::Updated(Stream) => "StreamUpdated",
            Kind::Updated(DeadLetterStream) => "DeadLetterStreamUpdated",
            Kind::Updated(Bucket) => "BucketUpdated",
            Kind::Updated(Consumer) => "ConsumerUpdated",
            Kind::Updated(Deployment) => "DeploymentUpdated",
            Kind::DriftCorrected { .. } => crate::conditions::reasons::DRIFT_CORRECTED,
            Kind::StreamRecreated => "StreamRecreated",
            Kind::Adopted => "Adopted",
            Kind::Paused => "Paused",
            Kind::Resumed => "Resumed",
            Kind::Scaled => "Scaled",
            Kind::WindowTooShort => crate::conditions::reasons::WINDOW_TOO_SHORT,
            Kind::DeadLettersGrew => "DeadLettersGrew",
            Kind::InputsRemovedUnprocessed => {
                crate::conditions::reasons::INPUTS_REMOVED_UNPROCESSED
            }
            Kind::OldestUnprocessedAging => crate::conditions::reasons::OLDEST_UNPROCESSED_AGING,
            Kind::Stalled => crate::conditions::reasons::CONSUMER_STALLED,
            Kind::StallEnded => "StallEnded",
            Kind::Retained => "Retained",
            Kind::Deleted => "Deleted",
            Kind::CleanupAbandoned => "CleanupAbandoned",
            Kind::CleanupFailed => "CleanupFailed",
            Kind::NotReady { reason } => reason,
        }
    }

    pub fn action(self) -> &'static str {
        match self {
            Kind::JetStreamCreated | Kind::DeploymentCreated => "Create",
            Kind::Updated(_) => "Update",
            Kind::DriftCorrected { action } => action,
            Kind::StreamRecreated => "Recreate",
            Kind::Adopted => "Adopt",
            Kind::Paused => "Pause",
            Kind::Resumed => "Resume",
            Kind::Scaled => "Scale",
            Kind::WindowTooShort => "Validate",
            Kind::DeadLettersGrew
            | Kind::InputsRemovedUnprocessed
            | Kind::OldestUnprocessedAging
            | Kind::Stalled
            | Kind::StallEnded => "Observe",
            Kind::Retained | Kind::Deleted | Kind::CleanupAbandoned | Kind::CleanupFailed => {
                "Delete"
            }
            Kind::NotReady { .. } => "Reconcile",
        }
    }

    /// Warning for what a person should look at: drift, data loss, growing
    /// dead letters, failures.
    pub fn type_(self) -> EventType {
        match self {
            Kind::DriftCorrected { .. }
            | Kind::StreamRecreated
            | Kind::WindowTooShort
            | Kind::DeadLettersGrew
            | Kind::InputsRemovedUnprocessed
            | Kind::OldestUnprocessedAging
            | Kind::Stalled
            | Kind::CleanupAbandoned
            | Kind::CleanupFailed
            | Kind::NotReady { .. } => EventType::Warning,
            _ => EventType::Normal,
        }
    }
}

/// How long after its last occurrence an Event can still grow a series.
const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// What makes two events "the same": everything a person reads in them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    regarding: String,
    type_: &'static str,
    reason: String,
    action: String,
    note: Option<String>,
    related: Option<String>,
}

impl SeriesKey {
    fn of(ev: &Event, regarding: &ObjectReference) -> Self {
        Self {
            regarding: reference_id(regarding),
            type_: type_name(ev.type_),
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
            related: ev.secondary.as_ref().map(reference_id),
        }
    }
}

fn reference_id(r: &ObjectReference) -> String {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    format!(
        "{}/{}/{}/{}/{}@{}",
        s(&r.api_version),
        s(&r.kind),
        s(&r.namespace),
        s(&r.name),
        s(&r.uid),
        s(&r.resource_version)
    )
}

fn type_name(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// An Event this recorder created, and how often it has occurred.
struct Published {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events for one controller instance, grouping repeats into series.
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    published: Mutex<HashMap<SeriesKey, Published>>,
}

impl Recorder {
    pub fn new(client: Client, controller: impl Into<String>, instance: impl Into<String>) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance: instance.into(),
            published: Mutex::new(HashMap::new()),
        }
    }

    /// Creates the Event, or grows the series of an identical one published in
    /// the last six minutes. Events go to the namespace of `regarding`.
    pub async fn publish(&self, ev: &Event, regarding: &ObjectReference) -> kube::Result<()> {
        let now = Timestamp::now();
        let key = SeriesKey::of(ev, regarding);
        let repeat = {
            let mut published = self.published.lock().await;
            published.retain(|_, p| p.last + SERIES_WINDOW > now);
            published.get(&key).map(|p| (p.name.clone(), p.count + 1))
        };
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        if let Some((name, count)) = repeat {
            let patch = serde_json::json!({
                "series": {"count": count, "lastObservedTime": MicroTime(now)},
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count, now).await;
                    return Ok(());
                }
                // Expired or deleted by someone: start a new Event.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let created = api
            .create(&PostParams::default(), &self.new_event(ev, regarding, now))
            .await?;
        self.remember(key, created.metadata.name.unwrap_or_default(), 1, now)
            .await;
        Ok(())
    }

    async fn remember(&self, key: SeriesKey, name: String, count: i32, last: Timestamp) {
        self.published
            .lock()
            .await
            .insert(key, Published { name, count, last });
    }

    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let object = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(type_name(ev.type_).into()),
            reason: Some(ev.reason.clone()),
            action: Some(ev.action.clone()),
            note: ev.note.as_deref().map(fit_note),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        }
    }
}

/// The API server refuses an Event whose note is longer than 1 kB (a stream
/// with many subjects): the note is cut at a character boundary, marked "...".
const NOTE_MAX: usize = 1024;

fn fit_note(note: &str) -> String {
    if note.len() <= NOTE_MAX {
        return note.to_string();
    }
    let mut end = NOTE_MAX - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_note_is_cut_to_what_the_api_server_accepts() {
        assert_eq!(fit_note("short"), "short");
        let long = "é".repeat(700);
        let cut = fit_note(&long);
        assert!(cut.len() <= NOTE_MAX, "{}", cut.len());
        assert!(cut.ends_with("..."));
        assert!(long.starts_with(cut.trim_end_matches("...")));
    }

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Observe".into(),
            secondary: None,
        }
    }

    fn pipeline(uid: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("OrderPipeline".into()),
            namespace: Some("shop".into()),
            name: Some("orders".into()),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_repeat_is_the_same_series_and_another_note_is_not() {
        let p = pipeline("u1");
        let first = SeriesKey::of(&event("DeadLettersGrew", "1 new (total 1)"), &p);
        assert_eq!(
            first,
            SeriesKey::of(&event("DeadLettersGrew", "1 new (total 1)"), &p)
        );
        assert_ne!(
            first,
            SeriesKey::of(&event("DeadLettersGrew", "4 new (total 5)"), &p)
        );
        assert_ne!(
            first,
            SeriesKey::of(
                &event("DeadLettersGrew", "1 new (total 1)"),
                &pipeline("u2")
            )
        );
        let mut related = event("DeadLettersGrew", "1 new (total 1)");
        related.secondary = Some(pipeline("u3"));
        assert_ne!(first, SeriesKey::of(&related, &p));
    }

    #[test]
    fn every_kind_has_its_own_reason_and_drift_and_failures_are_warnings() {
        use Object::*;
        let kinds = [
            Kind::JetStreamCreated,
            Kind::DeploymentCreated,
            Kind::Updated(Stream),
            Kind::Updated(DeadLetterStream),
            Kind::Updated(Bucket),
            Kind::Updated(Consumer),
            Kind::Updated(Deployment),
            Kind::DriftCorrected { action: "Create" },
            Kind::StreamRecreated,
            Kind::Adopted,
            Kind::Paused,
            Kind::Resumed,
            Kind::Scaled,
            Kind::WindowTooShort,
            Kind::DeadLettersGrew,
            Kind::Retained,
            Kind::Deleted,
            Kind::CleanupAbandoned,
            Kind::CleanupFailed,
        ];
        let reasons: std::collections::BTreeSet<_> = kinds.iter().map(|k| k.reason()).collect();
        assert_eq!(reasons.len(), kinds.len());
        let warnings: Vec<_> = kinds
            .iter()
            .filter(|k| k.type_() == EventType::Warning)
            .map(|k| k.reason())
            .collect();
        assert_eq!(
            warnings,
            [
                "DriftCorrected",
                "StreamRecreated",
                "WindowShorterThanRedelivery",
                "DeadLettersGrew",
                "CleanupAbandoned",
                "CleanupFailed"
            ]
        );
        let not_ready = Kind::NotReady {
            reason: "NatsUnreachable",
        };
        assert_eq!(
            (not_ready.reason(), not_ready.action(), not_ready.type_()),
            ("NatsUnreachable", "Reconcile", EventType::Warning)
        );
    }
}

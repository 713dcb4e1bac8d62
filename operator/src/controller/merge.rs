//! Several namespaces' watches as one (`--namespace a,b`): RBAC then needs a
//! Role in each watched namespace only, never a cluster-wide list.
//!
//! A reflector's store replaces its whole content at the end of each re-list
//! (`Init` .. `InitDone`), so the watch streams of several namespaces cannot
//! simply be interleaved into one store: one namespace's re-list would drop
//! the others' objects. [`merged`] keeps each namespace's objects and turns a
//! re-list of one into a re-list of all (the others from what it kept); it
//! starts with one re-list once every namespace has listed.

use std::collections::HashMap;

use futures::stream::{BoxStream, StreamExt as _};
use kube::Resource;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{Error, Event};

pub(crate) type Watch<K> = BoxStream<'static, Result<Event<K>, Error>>;

/// The objects of each source, and the re-list in progress per source.
struct Merge<K: Resource<DynamicType = ()>> {
    objects: Vec<HashMap<ObjectRef<K>, K>>,
    listing: Vec<Option<HashMap<ObjectRef<K>, K>>>,
    /// Whether every source has completed its first list.
    started: bool,
    listed: Vec<bool>,
}

impl<K: Resource<DynamicType = ()> + Clone> Merge<K> {
    fn new(n: usize) -> Self {
        Self {
            objects: (0..n).map(|_| HashMap::new()).collect(),
            listing: (0..n).map(|_| None).collect(),
            started: false,
            listed: vec![false; n],
        }
    }

    /// The events to pass on for `event` of source `i`.
    fn on(&mut self, i: usize, event: Event<K>) -> Vec<Event<K>> {
        match event {
            Event::Apply(k) => {
                self.objects[i].insert(ObjectRef::from_obj(&k), k.clone());
                self.pass(Event::Apply(k))
            }
            Event::Delete(k) => {
                self.objects[i].remove(&ObjectRef::from_obj(&k));
                self.pass(Event::Delete(k))
            }
            Event::Init => {
                self.listing[i] = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(k) => {
                let r = ObjectRef::from_obj(&k);
                self.listing[i]
                    .get_or_insert_with(HashMap::new)
                    .insert(r, k);
                Vec::new()
            }
            Event::InitDone => {
                self.objects[i] = self.listing[i].take().unwrap_or_default();
                self.listed[i] = true;
                self.started = self.listed.iter().all(|l| *l);
                match self.started {
                    true => self.relist(),
                    false => Vec::new(),
                }
            }
        }
    }

    /// Before every source has listed, nothing passes: the first re-list
    /// brings all.
    fn pass(&self, e: Event<K>) -> Vec<Event<K>> {
        match self.started {
            true => vec![e],
            false => Vec::new(),
        }
    }

    fn relist(&self) -> Vec<Event<K>> {
        let all = self.objects.iter().flat_map(|m| m.values().cloned());
        std::iter::once(Event::Init)
            .chain(all.map(Event::InitApply))
            .chain(std::iter::once(Event::InitDone))
            .collect()
    }
}

/// The watch streams of several sources as one coherent watch stream (errors
/// pass through; each source's watcher retries by itself).
pub(crate) fn merged<K>(sources: Vec<Watch<K>>) -> Watch<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + 'static,
{
    let mut state = Merge::<K>::new(sources.len());
    let tagged = sources
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.map(move |e| (i, e)).boxed());
    futures::stream::select_all(tagged)
        .flat_map(move |(i, e)| {
            let out: Vec<Result<Event<K>, Error>> = match e {
                Ok(e) => state.on(i, e).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(ns: &str, name: &str, v: &str) -> ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "data": {"v": v}
        }))
        .unwrap()
    }

    /// Feeds `events` (source, event) through a merge into a real reflector
    /// store; returns the store's objects as `ns/name=v`, sorted.
    async fn store_after(n: usize, events: Vec<(usize, Event<ConfigMap>)>) -> Vec<String> {
        let mut txs = Vec::new();
        let mut sources = Vec::new();
        for _ in 0..n {
            let (tx, rx) = futures::channel::mpsc::unbounded();
            txs.push(tx);
            sources.push(rx.map(Ok).boxed());
        }
        for (i, e) in events {
            txs[i].unbounded_send(e).unwrap();
        }
        drop(txs);
        let (reader, writer) = kube::runtime::reflector::store();
        use kube::runtime::WatchStreamExt as _;
        merged(sources).reflect(writer).for_each(|_| async {}).await;
        let mut out: Vec<String> = reader
            .state()
            .iter()
            .map(|c| {
                let m = &c.metadata;
                let v = c.data.as_ref().and_then(|d| d.get("v")).cloned();
                format!(
                    "{}/{}={}",
                    m.namespace.clone().unwrap_or_default(),
                    m.name.clone().unwrap_or_default(),
                    v.unwrap_or_default()
                )
            })
            .collect();
        out.sort();
        out
    }

    fn list(i: usize, objects: &[ConfigMap]) -> Vec<(usize, Event<ConfigMap>)> {
        std::iter::once((i, Event::Init))
            .chain(objects.iter().map(|o| (i, Event::InitApply(o.clone()))))
            .chain(std::iter::once((i, Event::InitDone)))
            .collect()
    }

    #[tokio::test]
    async fn a_relist_of_one_namespace_keeps_the_others_objects() {
        let mut events = list(0, &[cm("a", "p1", "1")]);
        events.extend(list(1, &[cm("b", "p2", "1"), cm("b", "p3", "1")]));
        events.push((1, Event::Delete(cm("b", "p3", "1"))));
        events.push((0, Event::Apply(cm("a", "p1", "2"))));
        // b re-lists (e.g. after its watch expired): a's object stays.
        events.extend(list(1, &[cm("b", "p2", "3")]));
        let got = store_after(2, events).await;
        assert_eq!(got, ["a/p1=2", "b/p2=3"]);
    }

    #[tokio::test]
    async fn nothing_is_stored_until_every_namespace_has_listed_once() {
        let mut events = list(0, &[cm("a", "p1", "1")]);
        events.push((0, Event::Apply(cm("a", "p4", "1"))));
        assert!(store_after(2, events.clone()).await.is_empty());
        events.extend(list(1, &[]));
        assert_eq!(store_after(2, events).await, ["a/p1=1", "a/p4=1"]);
    }

    #[tokio::test]
    async fn an_interleaved_relist_of_two_namespaces_loses_nothing() {
        let mut events = list(0, &[cm("a", "p1", "1")]);
        events.extend(list(1, &[cm("b", "p2", "1")]));
        events.push((0, Event::Init));
        events.push((1, Event::Init));
        events.push((1, Event::InitApply(cm("b", "p2", "2"))));
        events.push((0, Event::InitApply(cm("a", "p1", "2"))));
        events.push((1, Event::InitDone));
        events.push((0, Event::InitDone));
        assert_eq!(store_after(2, events).await, ["a/p1=2", "b/p2=2"]);
    }
}

//! How a pipeline's workers meet node maintenance: spread over the nodes
//! (topology spread constraints in their pod template) and bounded in what a
//! drain may take at once (a PodDisruptionBudget), both from
//! `spec.workers` with defaults that suit a multi-node cluster.

use crate::crd::OrderPipeline;
use crate::render::selector_labels;
use k8s_openapi::api::core::v1::TopologySpreadConstraint;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The node label the default spread is over.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

fn workers_selector(p: &OrderPipeline) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(p)),
        match_expressions: None,
    }
}

/// The workers' topology spread constraints: the spec's (each without a
/// label selector given the workers'), or by default one that keeps the
/// workers within one of each other per node, preferred (`ScheduleAnyway`: a
/// single node, or nodes that cannot take more, still run them all). `None`
/// for `[]`.
pub fn worker_spread(p: &OrderPipeline) -> Option<Vec<TopologySpreadConstraint>> {
    let list = match &p.spec.workers.topology_spread_constraints {
        Some(list) => list.clone(),
        None => vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: HOSTNAME_KEY.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            ..Default::default()
        }],
    };
    let list: Vec<_> = list
        .into_iter()
        .map(|mut c| {
            if c.label_selector.is_none() {
                c.label_selector = Some(workers_selector(p));
            }
            c
        })
        .collect();
    (!list.is_empty()).then_some(list)
}

/// The workers' PodDisruptionBudget, `None` when the spec turns it off.
pub fn worker_budget(p: &OrderPipeline) -> Option<PodDisruptionBudget> {
    let spec = &p.spec.workers.disruption_budget;
    if !spec.enabled {
        return None;
    }
    Some(PodDisruptionBudget {
        metadata: crate::render::workers_object_meta(p),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(spec.max_unavailable.clone()),
            selector: Some(workers_selector(p)),
            // A worker that is not Ready yet (starting, or its NATS down) may
            // go: it holds nothing, and keeping it would block the drain.
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..Default::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn sample() -> OrderPipeline {
        let mut p: OrderPipeline =
            serde_yaml::from_str(include_str!("../../manifests/samples/orderpipeline.yaml"))
                .unwrap();
        p.metadata.namespace = Some("shop".into());
        p.metadata.uid = Some("1234".into());
        p
    }

    #[test]
    fn by_default_one_worker_more_per_node_at_most_preferred() {
        let p = sample();
        let spread = worker_spread(&p).unwrap();
        assert_eq!(spread.len(), 1);
        let c = &spread[0];
        assert_eq!((c.max_skew, c.topology_key.as_str()), (1, HOSTNAME_KEY));
        assert_eq!(c.when_unsatisfiable, "ScheduleAnyway");
        let labels = c.label_selector.as_ref().unwrap().match_labels.clone();
        assert_eq!(labels, Some(selector_labels(&p)));
    }

    #[test]
    fn the_specs_constraints_replace_the_default_and_an_empty_list_removes_it() {
        let mut p = sample();
        p.spec.workers.topology_spread_constraints = Some(vec![TopologySpreadConstraint {
            max_skew: 2,
            topology_key: "topology.kubernetes.io/zone".into(),
            when_unsatisfiable: "DoNotSchedule".into(),
            ..Default::default()
        }]);
        let spread = worker_spread(&p).unwrap();
        assert_eq!(spread[0].topology_key, "topology.kubernetes.io/zone");
        assert!(
            spread[0].label_selector.is_some(),
            "given the workers' selector"
        );
        p.spec.workers.topology_spread_constraints = Some(Vec::new());
        assert_eq!(worker_spread(&p), None);
    }

    #[test]
    fn the_budget_lets_one_worker_go_at_a_time_unless_told_otherwise() {
        let mut p = sample();
        let b = worker_budget(&p).unwrap();
        assert_eq!(b.metadata.name.as_deref(), Some("orders-workers"));
        let spec = b.spec.unwrap();
        assert_eq!(spec.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(selector_labels(&p))
        );
        let labels = b.metadata.labels.unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "order-operator");
        assert!(b.metadata.owner_references.is_some());
        p.spec.workers.disruption_budget.max_unavailable = IntOrString::String("25%".into());
        let spec = worker_budget(&p).unwrap().spec.unwrap();
        assert_eq!(
            spec.max_unavailable,
            Some(IntOrString::String("25%".into()))
        );
        p.spec.workers.disruption_budget.enabled = false;
        assert!(worker_budget(&p).is_none());
    }
}

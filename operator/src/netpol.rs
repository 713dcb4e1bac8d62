//! The workers' NetworkPolicy, rendered from the pipeline's spec (pure).
//!
//! Ingress: the workers' HTTP port only (probes, `/metrics`). Egress: DNS, and
//! each endpoint the spec names (every NATS URL, the downstream, the OTLP
//! endpoint) on its port, to the narrowest peer a NetworkPolicy can state for
//! its host: an IP address is that address; a cluster Service name
//! (`svc`, `svc.ns.svc`, `svc.ns.svc.<domain>`, a StatefulSet Pod's
//! `pod.svc.ns.svc…`) is the Pods of its namespace, on the URL's port (the
//! Service's `targetPort` must be the same number: policies see Pod ports);
//! any other name is resolved by DNS, which a NetworkPolicy cannot follow, so
//! that endpoint is allowed on its port to any address. NetworkPolicies add
//! up: another policy selecting the workers (their
//! `orderpipeline.dev/pipeline` label) allows more.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource as _;

use crate::crd::OrderPipeline;
use crate::render::{WORKER_HTTP_PORT, selector_labels};

/// Where a worker's connection goes, as a NetworkPolicy can say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// One address (`ipBlock` of one host).
    Ip(IpAddr),
    /// The Pods of one namespace (a cluster Service's name).
    Namespace(String),
    /// Any address: a DNS name outside the cluster.
    Any,
}

/// One endpoint the workers dial: its peer and TCP port, and why (for the
/// policy's annotation and the docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub what: &'static str,
    pub peer: Peer,
    pub port: u16,
}

/// The peer for `host`, as seen from a Pod in `namespace`.
pub fn peer(host: &str, namespace: &str) -> Peer {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Peer::Ip(ip);
    }
    let labels: Vec<&str> = host.trim_end_matches('.').split('.').collect();
    if let [one] = labels.as_slice() {
        return match one.is_empty() || one.eq_ignore_ascii_case("localhost") {
            true => Peer::Any,
            false => Peer::Namespace(namespace.to_string()),
        };
    }
    // `svc.ns.svc…` or a StatefulSet Pod's `pod.svc.ns.svc…`: the namespace is
    // the label before the first `svc` from the third on.
    let svc = (2..labels.len()).find(|&i| labels[i].eq_ignore_ascii_case("svc"));
    match svc.map(|i| labels[i - 1]) {
        Some(ns) if !ns.is_empty() => Peer::Namespace(ns.to_ascii_lowercase()),
        _ => Peer::Any,
    }
}

/// The endpoints of `p`'s spec: each NATS server, the downstream, the OTLP
/// endpoint (the spec's, else a literal `OTEL_EXPORTER_OTLP_ENDPOINT` in
/// `workers.env`). A URL that does not parse adds nothing (the spec's checks
/// and the worker report it).
pub fn endpoints(p: &OrderPipeline) -> Vec<Endpoint> {
    let ns = p.meta().namespace.clone().unwrap_or_default();
    let s = &p.spec;
    let mut out = Vec::new();
    for server in orderpipeline_common::nats::servers(&s.nats.url) {
        if let Ok(a) = server.parse::<async_nats::ServerAddr>() {
            let peer = peer(a.host(), &ns);
            out.push(Endpoint {
                what: "NATS",
                peer,
                port: a.port(),
            });
        }
    }
    let otlp = s.telemetry.otlp_endpoint.clone().or_else(|| {
        s.workers
            .env
            .iter()
            .find(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
            .and_then(|e| e.value.clone())
    });
    let urls = [
        ("downstream", s.workers.downstream_url.as_deref()),
        ("OTLP", otlp.as_deref()),
    ];
    for (what, url) in urls {
        let Some(u) = url.and_then(|u| url::Url::parse(u.trim()).ok()) else {
            continue;
        };
        if let (Some(host), Some(port)) = (u.host_str(), u.port_or_known_default()) {
            let peer = peer(host, &ns);
            out.push(Endpoint { what, peer, port });
        }
    }
    out.dedup();
    out
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        end_port: None,
    }
}

fn to(peer: &Peer) -> Option<Vec<NetworkPolicyPeer>> {
    let one = match peer {
        Peer::Any => return None,
        Peer::Ip(ip) => NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: match ip {
                    IpAddr::V4(_) => format!("{ip}/32"),
                    IpAddr::V6(_) => format!("{ip}/128"),
                },
                except: None,
            }),
            ..Default::default()
        },
        Peer::Namespace(ns) => NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    ns.clone(),
                )])),
                match_expressions: None,
            }),
            ..Default::default()
        },
    };
    Some(vec![one])
}

/// The workers' NetworkPolicy (named like their Deployment, owned by the
/// pipeline).
pub fn worker_policy(p: &OrderPipeline) -> NetworkPolicy {
    let dns = NetworkPolicyEgressRule {
        to: None,
        ports: Some(vec![
            NetworkPolicyPort {
                protocol: Some("UDP".into()),
                port: Some(IntOrString::Int(53)),
                end_port: None,
            },
            tcp(53),
        ]),
    };
    let mut egress = vec![dns];
    for e in endpoints(p) {
        egress.push(NetworkPolicyEgressRule {
            to: to(&e.peer),
            ports: Some(vec![tcp(i32::from(e.port))]),
        });
    }
    NetworkPolicy {
        metadata: crate::render::workers_object_meta(p),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(p)),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: None,
                ports: Some(vec![tcp(WORKER_HTTP_PORT)]),
            }]),
            egress: Some(egress),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(spec: &str) -> OrderPipeline {
        let mut p: OrderPipeline = serde_yaml::from_str(&format!(
            "apiVersion: orderpipeline.dev/v1alpha1
kind: OrderPipeline
metadata: {{name: orders, namespace: shop}}
spec: {spec}"
        ))
        .unwrap();
        p.metadata.uid = Some("1234".into());
        p
    }

    #[test]
    fn a_host_becomes_the_narrowest_peer_a_policy_can_state() {
        assert_eq!(
            peer("10.0.0.7", "shop"),
            Peer::Ip("10.0.0.7".parse().unwrap())
        );
        assert_eq!(
            peer("[fd00::1]", "shop"),
            Peer::Ip("fd00::1".parse().unwrap())
        );
        assert_eq!(peer("nats", "shop"), Peer::Namespace("shop".into()));
        assert_eq!(
            peer("nats.messaging.svc", "shop"),
            Peer::Namespace("messaging".into())
        );
        let fqdn = peer("nats.Messaging.svc.cluster.local.", "shop");
        assert_eq!(fqdn, Peer::Namespace("messaging".into()));
        let pod = peer("nats-0.nats.messaging.svc.cluster.local", "shop");
        assert_eq!(pod, Peer::Namespace("messaging".into()));
        assert_eq!(peer("nats.example.com", "shop"), Peer::Any);
        assert_eq!(
            peer("nats.messaging", "shop"),
            Peer::Any,
            "not a Service name"
        );
        assert_eq!(peer("localhost", "shop"), Peer::Any);
    }

    #[test]
    fn the_policy_allows_the_http_port_in_and_dns_and_the_specs_endpoints_out() {
        let p = pipeline(
            "{nats: {url: 'nats://nats-0.nats.messaging.svc:4222, tls://10.1.2.3'},
  workers: {downstreamUrl: 'https://payments.example.com/charge'},
  telemetry: {otlpEndpoint: 'http://otel-collector:4317'}}",
        );
        let np = worker_policy(&p);
        let y = serde_yaml::to_string(&np).unwrap();
        assert_eq!(np.metadata.name.as_deref(), Some("orders-workers"), "{y}");
        assert_eq!(np.metadata.owner_references.as_ref().map(Vec::len), Some(1));
        let spec = np.spec.unwrap();
        let sel = spec.pod_selector.unwrap().match_labels.unwrap();
        assert_eq!(sel, selector_labels(&p));
        let ingress = serde_json::to_value(spec.ingress.unwrap()).unwrap();
        assert_eq!(
            ingress,
            serde_json::json!([{"ports": [{"protocol": "TCP", "port": 8080}]}])
        );
        let egress = serde_json::to_value(spec.egress.unwrap()).unwrap();
        let ns = |n: &str| serde_json::json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": n}}}]);
        let port = |p: u16| serde_json::json!([{"protocol": "TCP", "port": p}]);
        assert_eq!(
            egress,
            serde_json::json!([
                {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                {"to": ns("messaging"), "ports": port(4222)},
                {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": port(4222)},
                {"ports": port(443)},
                {"to": ns("shop"), "ports": port(4317)},
            ]),
            "{y}"
        );
    }

    #[test]
    fn without_a_downstream_or_otlp_endpoint_only_nats_and_dns_are_allowed_out() {
        let p = pipeline("{nats: {url: 'nats://127.0.0.1:4333'}}");
        let egress = worker_policy(&p).spec.unwrap().egress.unwrap();
        assert_eq!(egress.len(), 2);
        let rule = serde_json::to_value(&egress[1]).unwrap();
        assert_eq!(
            rule,
            serde_json::json!({"to": [{"ipBlock": {"cidr": "127.0.0.1/32"}}],
                "ports": [{"protocol": "TCP", "port": 4333}]})
        );
        // An OTLP endpoint given in workers.env instead of spec.telemetry.
        let p = pipeline(
            "{nats: {url: 'nats://127.0.0.1:4333'},
  workers: {env: [{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: 'http://10.9.9.9:4318'}]}}",
        );
        let egress = worker_policy(&p).spec.unwrap().egress.unwrap();
        let last = serde_json::to_value(egress.last().unwrap()).unwrap();
        assert_eq!(last["ports"][0]["port"], 4318);
    }
}

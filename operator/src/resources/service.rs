//! The Service in front of the gateways.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{HTTP_PORT, Identity, METRICS_PORT};
use crate::crd::{ServiceType, WsCluster};
use crate::names;

/// A Service exposing the WebSocket/HTTP port and the metrics port.
#[must_use]
pub fn service(wsc: &WsCluster, id: &Identity) -> Service {
    let port = |name: &str, number: i32| ServicePort {
        name: Some(name.into()),
        port: number,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    };
    Service {
        metadata: id.child_meta(&id.name),
        spec: Some(ServiceSpec {
            type_: Some(
                wsc.spec
                    .service_type
                    .unwrap_or(ServiceType::ClusterIP)
                    .as_str()
                    .into(),
            ),
            selector: Some(names::selector_labels(&id.name)),
            ports: Some(vec![port("http", HTTP_PORT), port("metrics", METRICS_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::WsClusterSpec;
    use crate::resources::testing::{assert_owned_and_labelled, cluster, id};

    #[test]
    fn service_selects_the_gateway_pods_and_exposes_websocket_and_metrics_ports() {
        let wsc = cluster(WsClusterSpec::default());
        let svc = service(&wsc, &id(&wsc));
        assert_eq!(svc.metadata.name.as_deref(), Some("chat"));
        assert_owned_and_labelled(&svc.metadata);
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector, Some(names::selector_labels("chat")));
        let ports: Vec<_> = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.port, p.target_port))
            .collect();
        assert_eq!(
            ports,
            vec![
                (
                    "http".into(),
                    8080,
                    Some(IntOrString::String("http".into()))
                ),
                (
                    "metrics".into(),
                    9090,
                    Some(IntOrString::String("metrics".into()))
                ),
            ]
        );
    }

    #[test]
    fn service_type_follows_the_spec() {
        let wsc = cluster(WsClusterSpec {
            service_type: Some(ServiceType::LoadBalancer),
            ..WsClusterSpec::default()
        });
        let svc = service(&wsc, &id(&wsc));
        assert_eq!(
            svc.spec.and_then(|s| s.type_).as_deref(),
            Some("LoadBalancer")
        );
    }
}

//! The generated CRD: the committed copy in `crds/` is current, and its schema (OpenAPI + CEL)
//! accepts every example under `examples/` and rejects every one under `examples/invalid/` with
//! the message its `# expect:` line names.

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use serde_json::Value;
use wsgate_operator::crd::WsCluster;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema() -> Value {
    let crd = WsCluster::crd();
    let version = crd.spec.versions.first().expect("one version");
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref());
    serde_json::to_value(schema.expect("openAPIV3Schema")).expect("schema to json")
}

/// Every document of every `.yaml` file directly in `dir`, with its path.
fn yaml_docs(dir: &Path) -> Vec<(PathBuf, String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("examples dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read example");
        let values: Vec<Value> = serde_saphyr::from_multiple(&text).expect("parse example yaml");
        docs.extend(values.into_iter().map(|v| (file.clone(), text.clone(), v)));
    }
    docs
}

fn is_wscluster(doc: &Value) -> bool {
    doc["kind"] == "WsCluster"
}

/// Errors an API server would report: OpenAPI schema first, then CEL rules.
fn admission_errors(schema: &Value, object: &Value) -> Vec<String> {
    let validator = jsonschema::draft4::new(schema).expect("schema compiles");
    let mut errors: Vec<String> = validator
        .iter_errors(object)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty()
        && let Err(cel) = kube::core::cel::Validator::new().validate(schema, object, None)
    {
        errors.push(cel.to_string());
    }
    errors
}

#[test]
fn committed_crd_matches_what_crdgen_prints() {
    let committed = std::fs::read_to_string(repo_root().join("crds/wsgate.io_wsclusters.yaml"))
        .expect("crds/wsgate.io_wsclusters.yaml exists");
    let generated = wsgate_operator::crd_yaml().expect("crd yaml");
    assert!(
        committed == generated,
        "crds/ is stale: run `cargo run -p wsgate-operator --bin crdgen > crds/wsgate.io_wsclusters.yaml`"
    );
}

#[test]
fn crd_has_short_name_scale_and_status_subresources_and_printer_columns() {
    let crd = WsCluster::crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["wsc".to_owned()]));
    assert_eq!(crd.spec.names.plural, "wsclusters");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let sub = version.subresources.clone().expect("subresources");
    assert!(sub.status.is_some());
    let scale = sub.scale.expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let columns: Vec<String> = version
        .additional_printer_columns
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(
        columns,
        [
            "Replicas",
            "Ready",
            "Connections",
            "Prefix",
            "Status",
            "Age"
        ]
    );
}

#[test]
fn spec_fields_carry_user_documentation_for_kubectl_explain() {
    let schema = schema();
    let spec = &schema["properties"]["spec"]["properties"];
    for field in [
        "replicas",
        "image",
        "redis",
        "keyPrefix",
        "autoscaling",
        "drainTimeoutSeconds",
    ] {
        let description = spec[field]["description"].as_str().unwrap_or_default();
        assert!(
            description.len() > 20,
            "spec.{field} needs a description, has {description:?}"
        );
    }
}

#[test]
fn schema_defaults_match_the_gateway_defaults() {
    let schema = schema();
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(spec["replicas"]["default"], 1);
    assert_eq!(spec["connectTimeoutMs"]["default"], 2000);
    assert_eq!(spec["drainTimeoutSeconds"]["default"], 30);
    assert_eq!(
        spec["autoscaling"]["properties"]["scaleDownStabilizationSeconds"]["default"],
        600
    );
}

#[test]
fn every_valid_example_is_accepted_by_the_schema_and_its_cel_rules() {
    let schema = schema();
    let docs = yaml_docs(&repo_root().join("examples"));
    let wscs: Vec<_> = docs.iter().filter(|(_, _, d)| is_wscluster(d)).collect();
    assert!(wscs.len() >= 3, "expected at least three valid examples");
    for (path, _, doc) in wscs {
        let errors = admission_errors(&schema, doc);
        assert!(errors.is_empty(), "{} rejected: {errors:?}", path.display());
        // The operator agrees with the API server.
        let wsc: WsCluster = serde_json::from_value(doc.clone()).expect("example deserializes");
        assert_eq!(
            wsgate_operator::validate::validate_spec(&wsc.spec),
            Ok(()),
            "{}",
            path.display()
        );
    }
}

#[test]
fn every_invalid_example_is_rejected_with_its_expected_message() {
    let schema = schema();
    let docs = yaml_docs(&repo_root().join("examples/invalid"));
    assert!(docs.len() >= 8, "expected the invalid examples");
    for (path, text, doc) in docs {
        let expected = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", path.display()));
        let errors = admission_errors(&schema, &doc);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{}: expected an error containing {expected:?}, got {errors:?}",
            path.display()
        );
    }
}

#[test]
fn cross_field_rules_are_enforced_by_the_operator_too_where_cel_is_unavailable() {
    let docs = yaml_docs(&repo_root().join("examples/invalid"));
    for name in [
        "autoscaling-min-above-max",
        "autoscaling-without-target",
        "replicas-without-redis",
        "redis-url-and-secret",
    ] {
        let (_, _, doc) = docs
            .iter()
            .find(|(p, _, _)| p.file_stem().is_some_and(|s| s == name))
            .unwrap_or_else(|| panic!("examples/invalid/{name}.yaml"));
        let wsc: WsCluster = serde_json::from_value(doc.clone()).expect("deserializes");
        assert!(
            wsgate_operator::validate::validate_spec(&wsc.spec).is_err(),
            "{name}"
        );
    }
}

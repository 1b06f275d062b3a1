#!/usr/bin/env bash
# Checks the chart's Grafana dashboard (charts/wsgate-operator/dashboards/wsgate.json) and the
# ConfigMap that ships it: rendered only when dashboards.enabled, with the sidecar label, the
# namespace and annotations asked for, the JSON intact; every panel has a query on the selected
# data source, namespace and WsCluster; every query is valid PromQL (promtool check rules, with
# Grafana's variables filled in). That each metric name is one the gateway exports is checked
# against a live gateway by tests/tests/dashboard.rs (cargo test), and that each query
# evaluates on a real Prometheus by e2e/tests/prometheus.rs (make e2e).
#
#   tests/grafana/check-dashboard.sh HELM PYTHON     # PYTHON: an interpreter with PyYAML
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HELM="${1:?usage: check-dashboard.sh HELM PYTHON}"
PYTHON="${2:?usage: check-dashboard.sh HELM PYTHON}"
CHART="$ROOT/charts/wsgate-operator"
command -v promtool >/dev/null || { echo "FAIL: promtool is required (Debian package prometheus)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$HELM" template wsgate-operator "$CHART" --namespace wsgate-system >"$WORK/default.yaml"
"$HELM" template wsgate-operator "$CHART" --namespace wsgate-system \
  --set dashboards.enabled=true >"$WORK/enabled.yaml"
"$HELM" template wsgate-operator "$CHART" --namespace wsgate-system \
  --set dashboards.enabled=true --set dashboards.label=dashboards.example.com/grafana \
  --set dashboards.labelValue=wsgate --set dashboards.namespace=monitoring \
  --set dashboards.annotations.grafana_folder=wsgate --set dashboards.clusterLabel=service \
  >"$WORK/custom.yaml"

"$PYTHON" - "$CHART/dashboards/wsgate.json" "$WORK" <<'PY'
import json
import re
import sys
import yaml

source, work = sys.argv[1:]
failures = []
def check(ok, message):
    if not ok:
        failures.append(message)

def configmaps(name):
    docs = [d for d in yaml.safe_load_all(open(f"{work}/{name}.yaml")) if d]
    return [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboards")]

check(configmaps("default") == [], "the dashboard ConfigMap renders although dashboards.enabled is false")

dashboard = json.load(open(source))
(enabled,) = configmaps("enabled")
check(enabled["metadata"]["labels"].get("grafana_dashboard") == "1", "default sidecar label grafana_dashboard: \"1\" missing")
check(enabled["metadata"]["namespace"] == "wsgate-system", "the ConfigMap is not in the release namespace by default")
check(json.loads(enabled["data"]["wsgate.json"]) == dashboard, "the ConfigMap's JSON differs from dashboards/wsgate.json")

(custom,) = configmaps("custom")
check(custom["metadata"]["labels"].get("dashboards.example.com/grafana") == "wsgate", "dashboards.label/labelValue not applied")
check(custom["metadata"]["namespace"] == "monitoring", "dashboards.namespace not applied")
check(custom["metadata"].get("annotations") == {"grafana_folder": "wsgate"}, "dashboards.annotations not applied")
relabelled = custom["data"]["wsgate.json"]
json.loads(relabelled)
check("app_kubernetes_io_instance" not in relabelled and 'service=~\\"$wscluster\\"' in relabelled,
      "dashboards.clusterLabel not applied to every query")

variables = {v["name"]: v for v in dashboard["templating"]["list"]}
check(variables.get("datasource", {}).get("type") == "datasource", "no data source variable")
check({"namespace", "wscluster"} <= variables.keys(), "namespace and wscluster variables missing")

def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))

exprs = []
for p in panels(dashboard["panels"]):
    if p["type"] == "row":
        continue
    title = p.get("title", p.get("id"))
    targets = [t for t in p.get("targets", []) if t.get("expr", "").strip()]
    check(targets, f"panel {title!r} has no query")
    check(p.get("datasource", {}).get("uid") == "${datasource}", f"panel {title!r} ignores the data source variable")
    for t in targets:
        expr = t["expr"]
        exprs.append((title, expr))
        # Every selector of a gateway metric is filtered by the namespace and WsCluster variables.
        for selector in re.findall(r"wsgate_\w+(\{[^}]*\})?", expr):
            check('namespace=~"$namespace"' in selector and 'app_kubernetes_io_instance=~"$wscluster"' in selector,
                  f"panel {title!r}: a selector is not filtered by $namespace and $wscluster: {expr}")
for v in ("namespace", "wscluster"):
    exprs.append((f"variable {v}", variables[v]["query"]["query"]))

# Grafana's variables filled in as Grafana would, for promtool.
def concrete(expr):
    return (expr.replace("$__rate_interval", "1m").replace("$namespace", "apps").replace("$wscluster", "chat"))
rules = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:expr{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs) if not e.startswith("label_values(")
]}]}
yaml.safe_dump(rules, open(f"{work}/exprs.yaml", "w"), sort_keys=False)
# label_values(metric{…}, label) queries: their selector must parse too.
selectors = [re.fullmatch(r"label_values\((.*),\s*\w+\)", e) for _, e in exprs if e.startswith("label_values(")]
check(all(selectors), "a variable query is not label_values(selector, label)")
rules["groups"][0]["rules"] += [{"record": f"dashboard:variable{i}", "expr": concrete(m.group(1))} for i, m in enumerate(selectors) if m]
yaml.safe_dump(rules, open(f"{work}/exprs.yaml", "w"), sort_keys=False)

if failures:
    sys.exit("FAIL: " + "\nFAIL: ".join(failures))
print(f"{sum(1 for p in panels(dashboard['panels']) if p['type'] != 'row')} panels, {len(exprs)} queries")
PY
promtool check rules "$WORK/exprs.yaml"

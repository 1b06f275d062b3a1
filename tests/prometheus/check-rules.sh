#!/usr/bin/env bash
# Renders the alert rules of the chart's PrometheusRule (helm template) into a Prometheus rules
# file, then runs `promtool check rules` and `promtool test rules` on alerts.test.yaml, which
# must give every alert of the chart a case where it fires and one where it does not.
#
#   tests/prometheus/check-rules.sh HELM PYTHON     # PYTHON: an interpreter with PyYAML
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HELM="${1:?usage: check-rules.sh HELM PYTHON}"
PYTHON="${2:?usage: check-rules.sh HELM PYTHON}"
command -v promtool >/dev/null || { echo "FAIL: promtool is required (Debian package prometheus)" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$HELM" template wsgate-operator "$ROOT/charts/wsgate-operator" --namespace wsgate-system \
  --set metrics.prometheusRule.enabled=true --show-only templates/prometheusrule.yaml \
  >"$WORK/prometheusrule.yaml"
cp "$HERE/alerts.test.yaml" "$WORK/"
"$PYTHON" - "$WORK/prometheusrule.yaml" "$WORK/alerts.test.yaml" "$WORK/rules.yaml" <<'PY'
import sys
import yaml
rendered, tests_path, out = sys.argv[1:]
doc = yaml.safe_load(open(rendered))
assert doc["kind"] == "PrometheusRule", doc["kind"]
# A PrometheusRule's spec is a Prometheus rules file.
open(out, "w").write(yaml.safe_dump(doc["spec"], sort_keys=False))
alerts = {r["alert"] for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r}
fires, quiet = set(), set()
for test in yaml.safe_load(open(tests_path))["tests"]:
    for case in test.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
missing = sorted((alerts - fires) | (alerts - quiet))
if missing:
    sys.exit("FAIL: alerts without a firing and a non-firing promtool case: " + ", ".join(missing))
unknown = sorted((fires | quiet) - alerts)
if unknown:
    sys.exit("FAIL: promtool cases for alerts the chart does not ship: " + ", ".join(unknown))
print(f"{len(alerts)} alerts, each with a firing and a non-firing case")
PY
promtool check rules "$WORK/rules.yaml"
(cd "$WORK" && promtool test rules alerts.test.yaml)

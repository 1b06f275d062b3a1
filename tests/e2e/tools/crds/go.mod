// Pins prometheus-operator, whose module carries the ServiceMonitor and PrometheusRule CRDs the
// e2e suite installs (verified against go.sum, never copied into the repository).
module wsgate.io/e2e-tools/crds

go 1.26.0

require github.com/prometheus-operator/prometheus-operator v0.85.0

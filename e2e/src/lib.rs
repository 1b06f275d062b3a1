//! Harness of the end-to-end suite (`make e2e`): the tests run against the real control plane
//! that `tests/e2e/control-plane/control-plane.sh` starts (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kwok), through the real `kubectl` and `helm` built by
//! `tests/e2e/tools/build.sh`, with the operator as a local process authenticated by the
//! chart's ServiceAccount token.
//!
//! - [`Env`]: where the control plane and the tools are (from the environment `make e2e` sets).
//! - [`kubectl`] / [`helm`]: the real command-line tools, with clear failures.
//! - [`install_chart`]: the operator chart, installed once per test process.
//! - [`TestNamespace`]: a namespace per test, deleted on drop.
//! - [`Operator`]: `wsgate-operator` as a child process with the ServiceAccount's token, killed
//!   on drop; [`audit`] reads what it did from the API server's audit log.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

pub mod audit;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Namespace the chart is installed into (as the README says).
pub const OPERATOR_NAMESPACE: &str = "wsgate-system";
/// Helm release name of the operator chart.
pub const RELEASE: &str = "wsgate-operator";
/// ServiceAccount (and lease) name the chart creates for that release.
pub const SERVICE_ACCOUNT: &str = "wsgate-operator";
/// Gateway image the test operators are configured with.
pub const GATEWAY_IMAGE: &str = "wsgate:e2e";
/// Generous deadline for the control plane to react (controllers, kwok, the operator).
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Where the control plane and the tools are.
pub struct Env {
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// Folder with kubectl, helm and the control-plane binaries.
    pub bin: PathBuf,
    /// The control plane's state folder.
    pub dir: PathBuf,
    /// The API server's audit log (the operator ServiceAccount's requests only).
    pub audit_log: PathBuf,
    /// The repository root.
    pub root: PathBuf,
}

/// The environment `make e2e` sets up; panics with the command to run when it is missing.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let var = |name: &str| {
            std::env::var_os(name).map(PathBuf::from).unwrap_or_else(|| {
                panic!("{name} is not set: the e2e tests run against the control plane `make e2e` starts")
            })
        };
        Env {
            kubeconfig: var("KUBECONFIG"),
            bin: var("E2E_BIN"),
            dir: var("E2E_DIR"),
            audit_log: var("E2E_AUDIT_LOG"),
            root: Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        }
    })
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "`{}` exited with {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tool(name: &str, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let e = env();
    let mut cmd = Command::new(e.bin.join(name));
    cmd.args(args)
        .env("KUBECONFIG", kubeconfig)
        .current_dir(&e.root)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    child.wait_with_output().expect("wait for the tool")
}

/// Runs kubectl as the cluster admin; returns its output whatever the exit status.
pub fn kubectl_output(args: &[&str]) -> Output {
    tool("kubectl", &env().kubeconfig, args, None)
}

/// Runs kubectl as the cluster admin and returns stdout; panics (with stderr) on failure.
pub fn kubectl(args: &[&str]) -> String {
    let out = kubectl_output(args);
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kubectl with `input` on stdin (e.g. `apply -f -`); returns its output.
pub fn kubectl_stdin(args: &[&str], input: &str) -> Output {
    tool("kubectl", &env().kubeconfig, args, Some(input))
}

/// `kubectl apply -f -` of `yaml` in `namespace`; panics on failure.
pub fn apply(namespace: &str, yaml: &str) {
    let args = ["apply", "-n", namespace, "-f", "-"];
    let out = kubectl_stdin(&args, yaml);
    assert!(out.status.success(), "{}", describe(&args, &out));
}

/// `kubectl get ... -o json`, or `None` when the object does not exist.
pub fn get(namespace: &str, what: &str) -> Option<Value> {
    let out = kubectl_output(&["get", "-n", namespace, what, "-o", "json"]);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("NotFound"), "kubectl get {what}: {stderr}");
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).expect("kubectl json"))
}

/// Runs helm as the cluster admin and returns stdout; panics (with stderr) on failure.
pub fn helm(args: &[&str]) -> String {
    let out = tool("helm", &env().kubeconfig, args, None);
    assert!(out.status.success(), "{}", describe(args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `check` every 250 ms until it returns `Some`, or panics naming `what` after `deadline`.
/// This waits for an event the control plane makes happen; it is not a sleep.
pub fn wait_until<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Path to the chart in the repository.
pub fn chart_dir() -> PathBuf {
    env().root.join("charts/wsgate-operator")
}

/// Installs the operator chart into `wsgate-system` once per test process (its CRD with it).
/// The chart's own operator Deployment runs on a kwok node, where nothing executes; the operator
/// that works is [`Operator`], a local process using the chart's ServiceAccount.
pub fn install_chart() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let chart = chart_dir();
        helm(&[
            "upgrade",
            "--install",
            RELEASE,
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "--set",
            &format!("gateway.image={GATEWAY_IMAGE}"),
            "--wait",
            "--timeout",
            "180s",
        ]);
        kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/wsclusters.wsgate.io",
            "--timeout=120s",
        ]);
    });
}

/// A namespace of the test's own, deleted (without waiting) on drop.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Creates `e2e-{prefix}-{random}`.
    pub fn new(prefix: &str) -> Self {
        let name = format!("e2e-{prefix}-{:04x}", rand::random::<u16>());
        kubectl(&["create", "namespace", &name]);
        // Pods need the namespace's default ServiceAccount, which a controller creates.
        wait_until("the default ServiceAccount", DEADLINE, || {
            get(&name, "serviceaccount/default")
        });
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl_output(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

/// A kubeconfig that authenticates as the chart's ServiceAccount (a bound token from the
/// TokenRequest API), made once per test process.
pub fn operator_kubeconfig() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        install_chart();
        let token = kubectl(&[
            "create",
            "token",
            SERVICE_ACCOUNT,
            "-n",
            OPERATOR_NAMESPACE,
            "--duration=6h",
        ]);
        let server = kubectl(&[
            "config",
            "view",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ]);
        let ca = env().dir.join("pki/ca.crt");
        let path = env().dir.join("operator.kubeconfig");
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: operator\n  user:\n    token: {}\ncontexts:\n- name: e2e\n  context: {{ cluster: e2e, user: operator, namespace: {OPERATOR_NAMESPACE} }}\ncurrent-context: e2e\n",
            ca.display(),
            token.trim()
        );
        std::fs::write(&path, config).expect("write operator kubeconfig");
        path
    })
    .clone()
}

/// Path of the `wsgate-operator` binary: `$WSGATE_OPERATOR_BIN`, or the one in the cargo target
/// directory this test was built into (`make e2e` builds it).
pub fn operator_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WSGATE_OPERATOR_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .join("wsgate-operator");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build -p wsgate-operator`",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `wsgate-operator` running as a local process with the chart's ServiceAccount token; stopped
/// with SIGTERM (then SIGKILL) on drop.
pub struct Operator {
    child: Option<Child>,
    /// Its identity (the Lease holder name when electing).
    pub identity: String,
    /// Its `/metrics`, `/healthz`, `/readyz` address.
    pub http: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Starts an operator without leader election (one per test).
    pub fn start(identity: &str) -> Self {
        Self::start_with(identity, &["--leader-election=false"])
    }

    /// Starts an operator with extra flags.
    pub fn start_with(identity: &str, extra: &[&str]) -> Self {
        let kubeconfig = operator_kubeconfig();
        let port = free_port();
        let log = env().dir.join(format!("logs/operator-{identity}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let err = file.try_clone().expect("log handle");
        let child = Command::new(operator_bin())
            .args([
                "--http-listen",
                &format!("127.0.0.1:{port}"),
                "--gateway-image",
                GATEWAY_IMAGE,
                "--lease-namespace",
                OPERATOR_NAMESPACE,
                "--lease-name",
                SERVICE_ACCOUNT,
                "--pod-name",
                identity,
                "--log-format",
                "text",
            ])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .expect("spawn wsgate-operator");
        let op = Self {
            child: Some(child),
            identity: identity.to_owned(),
            http: format!("127.0.0.1:{port}"),
            log,
        };
        wait_until("the operator's /healthz", DEADLINE, || {
            op.assert_running();
            std::net::TcpStream::connect(&op.http).ok()
        });
        op
    }

    /// The sum of the samples in its `/metrics` whose series starts with `series`
    /// (`name` or `name{labels}`).
    pub fn metric(&self, series: &str) -> f64 {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&self.http).expect("connect to the operator");
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.http).expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Panics (with the log's tail) if the process has exited.
    pub fn assert_running(&self) {
        let child = self.child.as_ref().expect("child");
        let status = Command::new("kill")
            .args(["-0", &child.id().to_string()])
            .status()
            .expect("kill -0");
        assert!(
            status.success(),
            "operator {} exited:\n{}",
            self.identity,
            self.log_tail()
        );
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills it at once (SIGKILL): no Lease release, no clean shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it with SIGTERM and waits for it to exit (it releases its Lease).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The condition of `type_` in an object's `status.conditions`.
pub fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Waits until WsCluster `name` has `Ready=True` and returns it.
pub fn wait_ready(namespace: &str, name: &str) -> Value {
    wait_until(&format!("WsCluster {name} Ready"), DEADLINE, || {
        let wsc = get(namespace, &format!("wsc/{name}"))?;
        let ready = condition(&wsc, "Ready")?;
        (ready["status"] == "True"
            && wsc["status"]["observedGeneration"] == wsc["metadata"]["generation"])
            .then_some(wsc)
    })
}

/// Names of the pods of WsCluster `name` that are Running, sorted.
pub fn running_pods(namespace: &str, name: &str) -> Vec<String> {
    let out = kubectl(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        &format!("app.kubernetes.io/instance={name}"),
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&out).expect("pod list");
    let mut names: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// A WsCluster with Redis (so it may have several pods), as YAML.
pub fn wscluster(name: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: wsgate.io/v1alpha1\nkind: WsCluster\nmetadata:\n  name: {name}\nspec:\n  redis:\n    url: redis://redis.example:6379\n{extra_spec}"
    )
}

/// Waits until WsCluster `name` has exactly `count` Running pods.
pub fn wait_running_pods(ns: &str, name: &str, count: usize) {
    wait_until(&format!("{count} running pods"), DEADLINE, || {
        (running_pods(ns, name).len() == count).then_some(())
    });
}

/// `kubectl scale wsc` (the scale subresource).
pub fn scale_wsc(ns: &str, name: &str, replicas: u32) {
    kubectl(&[
        "scale",
        "wsc",
        name,
        "-n",
        ns,
        &format!("--replicas={replicas}"),
    ]);
}

/// A JSON merge patch of a WsCluster.
pub fn patch_wsc(ns: &str, name: &str, patch: &str) {
    kubectl(&["patch", "wsc", name, "-n", ns, "--type=merge", "-p", patch]);
}

//! The live fleet on the real control plane (`make e2e`): the operator reads real gateway
//! processes' metrics into the WsCluster status and each pod's deletion cost, and the real
//! ReplicaSet controller then removes the emptiest pods on scale-down.
//!
//! kwok pods run nothing and all sit at 127.0.0.1, so the test plays the kubelet: for each pod
//! it starts a real gateway on a free loopback port, connects real WebSocket clients to it, and
//! points the pod's `prometheus.io/port` annotation (where the operator reads) at that gateway.

use std::collections::BTreeMap;

use serde_json::Value;
use wsgate_e2e::{
    DEADLINE, Operator, TestNamespace, apply, audit, get, install_chart, kubectl, running_pods,
    scale_wsc, wait_running_pods, wait_until, wscluster,
};
use wsgate_tests::{Client, ProcessGateway, Received};

/// A pod's stand-in: a gateway process and its open WebSocket clients.
struct PodGateway {
    gateway: ProcessGateway,
    clients: Vec<Client>,
}

async fn serve_pod(ns: &str, pod: &str, connections: usize, args: &[&str]) -> PodGateway {
    let gateway = ProcessGateway::spawn(args).await;
    let mut clients = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut client = gateway.client().await;
        client.join(&format!("topic-{}", i % 3)).await;
        clients.push(client);
    }
    gateway
        .http()
        .wait_stats("the clients", |s| s["connections"] == connections)
        .await;
    kubectl(&[
        "annotate",
        "-n",
        ns,
        &format!("pod/{pod}"),
        &format!("prometheus.io/port={}", gateway.addr.port()),
        "--overwrite",
    ]);
    PodGateway { gateway, clients }
}

/// `status.pods` as name → (ready, connections, error).
fn pod_figures(wsc: &Value) -> BTreeMap<String, (bool, Option<i64>, Option<String>)> {
    wsc["status"]["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_owned(),
                (
                    p["ready"].as_bool()?,
                    p["connections"].as_i64(),
                    p["error"].as_str().map(str::to_owned),
                ),
            ))
        })
        .collect()
}

fn deletion_cost(ns: &str, pod: &str) -> Option<String> {
    get(ns, &format!("pod/{pod}"))?["metadata"]["annotations"]
        ["controller.kubernetes.io/pod-deletion-cost"]
        .as_str()
        .map(str::to_owned)
}

/// A test namespace and an operator reading the fleet every second.
fn namespace_and_operator(name: &str) -> (TestNamespace, Operator) {
    install_chart();
    let ns = TestNamespace::new(name);
    let op = Operator::start_with(name, &["--leader-election=false", "--fleet-poll-secs=1"]);
    (ns, op)
}

/// Waits until every pod's deletion cost is its connection count.
fn wait_deletion_costs(ns: &str, wanted: &BTreeMap<String, i64>) {
    wait_until("the deletion costs", DEADLINE, || {
        wanted
            .iter()
            .all(|(pod, c)| deletion_cost(ns, pod) == Some(c.to_string()))
            .then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the control plane of `make e2e`"]
async fn live_status_and_deletion_costs_make_scale_down_remove_the_emptiest_pods() {
    let (ns, op) = namespace_and_operator("fleet");
    apply(&ns.name, &wscluster("chat", "  replicas: 4\n"));
    wait_running_pods(&ns.name, "chat", 4);
    let pods = running_pods(&ns.name, "chat");

    // Four pods with 30, 5, 20 and 10 connections.
    let wanted: BTreeMap<String, i64> = pods.iter().cloned().zip([30, 5, 20, 10]).collect();
    let mut gateways = BTreeMap::new();
    for (pod, connections) in &wanted {
        let served = serve_pod(&ns.name, pod, usize::try_from(*connections).unwrap(), &[]).await;
        gateways.insert(pod.clone(), served);
    }

    // The status shows the live figures, per pod and in total, and `kubectl get` prints them.
    let wsc = wait_until("the live status", DEADLINE, || {
        let wsc = get(&ns.name, "wsc/chat")?;
        let figures = pod_figures(&wsc);
        let exact = wanted
            .iter()
            .all(|(pod, c)| figures.get(pod) == Some(&(true, Some(*c), None)));
        (exact && figures.len() == 4 && wsc["status"]["connections"] == 65).then_some(wsc)
    });
    assert_eq!(wsc["status"]["topics"], 3, "{}", wsc["status"]);
    let table = kubectl(&["get", "wsc", "chat", "-n", &ns.name]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let column = header
        .iter()
        .position(|h| *h == "CONNECTIONS")
        .expect(&table);
    assert_eq!(row[column], "65", "{table}");

    // Every pod's deletion cost is its connection count.
    wait_deletion_costs(&ns.name, &wanted);

    // A steady fleet costs no writes: over five more reads of all four pods, the operator writes
    // neither the status nor any pod.
    let mark = audit::mark();
    let reads = op.metric("wsgate_operator_fleet_reads_total{result=\"ok\"}");
    wait_until("five more polls", DEADLINE, || {
        (op.metric("wsgate_operator_fleet_reads_total{result=\"ok\"}") >= reads + 20.0)
            .then_some(())
    });
    let writes = audit::writes_in(&audit::since(mark), &ns.name);
    assert!(writes.is_empty(), "a steady fleet was written: {writes:#?}");

    // Scale down by two: the ReplicaSet controller removes the two emptiest pods (5 and 10).
    scale_wsc(&ns.name, "chat", 2);
    wait_running_pods(&ns.name, "chat", 2);
    let mut kept: Vec<String> = wanted
        .iter()
        .filter(|(_, c)| **c >= 20)
        .map(|(p, _)| p.clone())
        .collect();
    kept.sort();
    assert_eq!(running_pods(&ns.name, "chat"), kept);
    wait_until("the status of the two pods left", DEADLINE, || {
        let wsc = get(&ns.name, "wsc/chat")?;
        (pod_figures(&wsc).len() == 2 && wsc["status"]["connections"] == 50).then_some(())
    });

    // A pod that stops answering is marked, and the total counts the pods that answer.
    let silent = kept[0].clone();
    let survivor = kept[1].clone();
    drop(gateways.remove(&silent));
    let wsc = wait_until("the silent pod marked", DEADLINE, || {
        let wsc = get(&ns.name, "wsc/chat")?;
        let figures = pod_figures(&wsc);
        let (ready, connections, error) = figures.get(&silent)?.clone();
        (ready && connections.is_none() && error.is_some()).then_some(wsc)
    });
    assert_eq!(
        wsc["status"]["connections"], wanted[&survivor],
        "{}",
        wsc["status"]
    );
    assert!(gateways[&survivor].gateway.pid > 0);
    audit::assert_nothing_forbidden();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the control plane of `make e2e`"]
async fn a_paced_scale_down_drains_one_real_gateway_at_a_time_emptiest_first() {
    let (ns, _op) = namespace_and_operator("paced");
    // A step is the 5 s preStop pause plus the 3 s drain window.
    let step = 8;
    apply(
        &ns.name,
        &wscluster(
            "chat",
            "  replicas: 3\n  drainTimeoutSeconds: 3\n  drain:\n    maxReconnectsPerSecond: 50\n",
        ),
    );
    wait_running_pods(&ns.name, "chat", 3);
    let deployment = get(&ns.name, "deployment/chat").expect("deployment");
    assert_eq!(deployment["spec"]["minReadySeconds"], step);
    assert_eq!(
        deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
        1
    );

    // The test is the kubelet: each pod's gateway runs with the drain settings of the pod's
    // environment, as the operator wrote it.
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let var = |name: &str| {
        env.as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("{name} in {env}"))
            .to_owned()
    };
    let (rate, window) = (var("WSGATE_DRAIN_RATE"), var("WSGATE_DRAIN_TIMEOUT_SECS"));
    assert_eq!((rate.as_str(), window.as_str()), ("50", "3"));
    let pods = running_pods(&ns.name, "chat");
    let wanted: BTreeMap<String, i64> = pods.iter().cloned().zip([40, 10, 20]).collect();
    let mut gateways = BTreeMap::new();
    for (pod, n) in &wanted {
        let args = [
            "--drain-rate",
            rate.as_str(),
            "--drain-timeout-secs",
            window.as_str(),
        ];
        let served = serve_pod(&ns.name, pod, usize::try_from(*n).unwrap(), &args).await;
        gateways.insert(pod.clone(), served);
    }
    wait_deletion_costs(&ns.name, &wanted);

    // 3 → 1: the Deployment goes 3, 2, 1 — never straight to 1 — a step apart; when a pod goes,
    // its gateway gets SIGTERM and its clients' close frames are timed.
    scale_wsc(&ns.name, "chat", 1);
    let mut seen = vec![3];
    let mut stamps = Vec::new();
    let mut removed = Vec::new();
    let mut drains = Vec::new();
    wait_until("the paced scale-down to finish", DEADLINE, || {
        let d = get(&ns.name, "deployment/chat")?;
        let replicas = d["spec"]["replicas"].as_i64()?;
        if seen.last() != Some(&replicas) {
            seen.push(replicas);
            stamps.push(
                d["metadata"]["annotations"]["wsgate.io/scale-down-step-at"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        let running = running_pods(&ns.name, "chat");
        let gone: Vec<String> = gateways
            .keys()
            .filter(|p| !running.contains(p))
            .cloned()
            .collect();
        for pod in gone {
            let served = gateways.remove(&pod).expect("served");
            let sigterm = tokio::time::Instant::now();
            served.gateway.signal("-TERM");
            let watchers: Vec<_> = served
                .clients
                .into_iter()
                .map(|mut c| {
                    tokio::spawn(async move {
                        let got = c.next().await;
                        (tokio::time::Instant::now(), got)
                    })
                })
                .collect();
            removed.push(pod);
            drains.push((sigterm, watchers, served.gateway));
        }
        (replicas == 1 && removed.len() == 2).then_some(())
    });
    assert_eq!(seen, [3, 2, 1]);
    let gap = epoch_seconds(&stamps[1]) - epoch_seconds(&stamps[0]);
    assert!(
        gap >= step,
        "steps {stamps:?} are {gap} s apart, less than {step} s"
    );

    // The emptiest pod went first, then the next emptiest; the busiest stayed.
    let by_cost: Vec<&String> = {
        let mut v: Vec<(&String, &i64)> = wanted.iter().collect();
        v.sort_by_key(|(_, c)| **c);
        v.into_iter().map(|(p, _)| p).collect()
    };
    assert_eq!(removed.iter().collect::<Vec<_>>(), by_cost[..2]);
    assert_eq!(running_pods(&ns.name, "chat"), [by_cost[2].clone()]);

    // Every client of a removed pod got 1001, and the two drains did not overlap.
    let mut spans = Vec::new();
    for (sigterm, watchers, _gateway) in drains {
        let mut last = sigterm;
        for w in watchers {
            let (at, got) = w.await.expect("client watcher");
            assert!(matches!(got, Received::Close(Some(1001), _)), "{got:?}");
            last = last.max(at);
        }
        spans.push((sigterm, last));
    }
    assert!(
        spans[0].1 < spans[1].0,
        "the second pod started draining before the first had finished"
    );
    audit::assert_nothing_forbidden();
}

/// Seconds since the epoch of an RFC 3339 time.
fn epoch_seconds(rfc3339: &str) -> i64 {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", rfc3339, "+%s"])
        .output()
        .expect("date");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a time: {rfc3339:?}"))
}

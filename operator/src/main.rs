//! wsgate-operator: parse config, start logging and the HTTP endpoints, win the leader Lease,
//! run the controller until SIGTERM or until leadership is lost.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::Reporter;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{error, info, warn};
use wsgate_operator::config::{Config, LogFormat};
use wsgate_operator::controller::{self, Context};
use wsgate_operator::crd::WsCluster;
use wsgate_operator::http::{self, Health};
use wsgate_operator::leader::LeaderElector;
use wsgate_operator::metrics::Metrics;
use wsgate_operator::resources::Defaults;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Before any TLS connection: the process-level rustls provider is ring (no aws-lc).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::parse();
    init_logging(config.log_format);

    let metrics = Metrics::new().context("metrics registry")?;
    let health = Health::new(metrics.clone());
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("--http-listen {}: cannot bind", config.http_listen))?;

    // One shutdown signal for everything: SIGTERM/SIGINT or losing the Lease.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(http::serve(
        listener,
        health.clone(),
        wait_for(stop_rx.clone()),
    ));
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown signal received");
            let _ = stop_tx.send(true);
        });
    }

    let client = Client::try_default()
        .await
        .context("kubernetes client configuration")?;
    client
        .apiserver_version()
        .await
        .context("kubernetes API server unreachable")?;
    health.set_ready(true);

    let elector = config.leader_election.then(|| {
        LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &config.lease_namespace),
            &config.lease_name,
            &config.pod_name,
            config.lease_duration(),
        )
    });
    if let Some(elector) = &elector {
        if !acquire(elector, stop_rx.clone()).await {
            return Ok(());
        }
        metrics.leader.set(1);
        info!(identity = %config.pod_name, "became leader");
        tokio::spawn(keep_leadership(
            elector.clone(),
            config.lease_duration(),
            stop_tx.clone(),
        ));
    } else {
        metrics.leader.set(1);
    }

    let reporter = Reporter {
        controller: "wsgate-operator".into(),
        instance: Some(config.pod_name.clone()),
    };
    let defaults = Defaults {
        gateway_image: config.gateway_image.clone(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        defaults,
        metrics.clone(),
        reporter,
    ));
    run_controller(client, ctx, metrics.clone(), stop_rx.clone()).await;

    metrics.leader.set(0);
    if let Some(elector) = &elector
        && let Err(e) = elector.release().await
    {
        warn!(error = %e, "cannot release the leader lease; it will expire");
    }
    info!("stopped");
    Ok(())
}

async fn run_controller(
    client: Client,
    ctx: Arc<Context>,
    metrics: Metrics,
    stop: watch::Receiver<bool>,
) {
    let owned =
        || watcher::Config::default().labels("app.kubernetes.io/managed-by=wsgate-operator");
    let controller = Controller::new(
        Api::<WsCluster>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Deployment>::all(client.clone()), owned())
    .owns(Api::<Service>::all(client.clone()), owned())
    .owns(Api::<HorizontalPodAutoscaler>::all(client.clone()), owned())
    .owns(Api::<PodDisruptionBudget>::all(client.clone()), owned());
    let store = controller.store();
    controller
        .graceful_shutdown_on(wait_for(stop))
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|result| {
            metrics
                .managed
                .set(i64::try_from(store.state().len()).unwrap_or(i64::MAX));
            if let Err(e) = result {
                // Reconcile errors are already logged by the error policy; these are watch and
                // queue errors, retried by the runtime.
                warn!(error = %e, "controller event");
            }
            futures::future::ready(())
        })
        .await;
}

/// Waits until this replica holds the Lease. Returns false if asked to stop first.
async fn acquire(elector: &LeaderElector, mut stop: watch::Receiver<bool>) -> bool {
    loop {
        match elector.try_acquire_or_renew(Timestamp::now()).await {
            Ok(true) => return true,
            Ok(false) => {}
            Err(e) => warn!(error = %e, "leader election attempt failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(elector.renew_interval()) => {}
            _ = stop.changed() => return false,
        }
    }
}

/// Renews the Lease; if renewal has not succeeded for most of the Lease duration, stops the
/// controller before another replica may legitimately take over.
async fn keep_leadership(
    elector: LeaderElector,
    lease_duration: Duration,
    stop: watch::Sender<bool>,
) {
    let mut last_renewed = tokio::time::Instant::now();
    let deadline = lease_duration.mul_f32(2.0 / 3.0);
    loop {
        tokio::time::sleep(elector.renew_interval()).await;
        if *stop.borrow() {
            return;
        }
        // A hung request must not outlive the lease: bound each attempt by the renew interval.
        let attempt = tokio::time::timeout(
            elector.renew_interval(),
            elector.try_acquire_or_renew(Timestamp::now()),
        );
        match attempt.await {
            Ok(Ok(true)) => last_renewed = tokio::time::Instant::now(),
            Ok(Ok(false)) => {
                error!("lost the leader lease to another replica; stopping");
                let _ = stop.send(true);
                return;
            }
            Ok(Err(e)) => warn!(error = %e, "lease renewal failed"),
            Err(_) => warn!("lease renewal timed out"),
        }
        if last_renewed.elapsed() > deadline {
            error!("could not renew the leader lease in time; stopping");
            let _ = stop.send(true);
            return;
        }
    }
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

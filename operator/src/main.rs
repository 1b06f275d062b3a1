//! wsgate-operator: parse config, start logging and the HTTP endpoints, win the leader Lease,
//! run the controller until SIGTERM or until leadership is lost.

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};
use wsgate_operator::config::{Config, LogFormat};
use wsgate_operator::controller::{self, Context};
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
        if !elector.acquire(stop_rx.clone()).await {
            return Ok(());
        }
        metrics.leader.set(1);
        info!(identity = %config.pod_name, "became leader");
        let (elector, stop_tx) = (elector.clone(), stop_tx.clone());
        tokio::spawn(async move { elector.keep_leadership(stop_tx).await });
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
    controller::run(client, ctx, config.fleet(), wait_for(stop_rx.clone())).await;

    metrics.leader.set(0);
    if let Some(elector) = &elector
        && let Err(e) = elector.release().await
    {
        warn!(error = %e, "cannot release the leader lease; it will expire");
    }
    info!("stopped");
    Ok(())
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

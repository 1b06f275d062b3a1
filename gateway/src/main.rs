//! The `wsgate` binary: parse configuration, start logging, bind, serve until SIGTERM/SIGINT,
//! drain, exit.

use std::process::ExitCode;

use tokio::net::TcpListener;
use wsgate::config::{self, Config, LogFormat};
use wsgate::{Gateway, serve_gateway};

fn main() -> ExitCode {
    // One process-wide TLS provider (ring) for rediss:// connections.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match Config::parse_args(std::env::args_os()) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wsgate: {}", config::one_line(&e));
            return ExitCode::from(2);
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("wsgate: {e}");
        return ExitCode::from(2);
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    use anyhow::Context;
    let listener = bind(config.listen).with_context(|| {
        format!(
            "cannot listen on {} (--listen / WSGATE_LISTEN)",
            config.listen
        )
    })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(bind(addr).with_context(|| {
            format!("cannot listen on {addr} (--metrics-listen / WSGATE_METRICS_LISTEN)")
        })?),
        None => None,
    };
    let gateway = Gateway::start(config).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = ?metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        broker = gateway.hub().broker().kind(),
        key_prefix = %gateway.key_prefix(),
        "wsgate listening"
    );
    serve_gateway(gateway, listener, metrics_listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Accept-queue length: a burst of connections (a reconnect storm after another replica
/// drained) must not overflow it, or clients wait a full SYN retry (1 s) to get in. The kernel
/// caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

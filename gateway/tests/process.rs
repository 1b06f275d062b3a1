//! The `wsgate` binary as a child process: slow consumers, memory bound, SIGTERM drain.
#![allow(clippy::unwrap_used)]

use wsgate_tests as common;

use std::time::Duration;

use common::{DEADLINE, ProcessGateway, Received, metric};

const MESSAGE: usize = 256 * 1024;
const MESSAGES: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_while_others_receive_everything() {
    let gw = ProcessGateway::spawn_bin(
        env!("CARGO_BIN_EXE_wsgate"),
        &[
            "--outbound-queue-messages",
            "128",
            "--outbound-queue-bytes",
            "33554432",
            "--idle-timeout-secs",
            "0",
            // The slow client is read only after every publish: give its close frame time.
            "--close-timeout-ms",
            "120000",
        ],
    )
    .await;
    let http = gw.http();
    let mut slow = gw.client().await;
    let mut fast = gw.client().await;
    slow.join("firehose").await;
    fast.join("firehose").await;

    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        while got < MESSAGES {
            match fast.next().await {
                Received::Binary(b) => {
                    assert_eq!(b.len(), MESSAGE);
                    assert_eq!(&b[..8], &(got as u64).to_be_bytes(), "out of order");
                    got += 1;
                }
                other => panic!("fast client got {other:?} after {got}"),
            }
        }
        // Handed back so that it stays connected: a dropped client is cleaned up at once.
        (got, fast)
    });

    let rss_before = gw.rss_kib();
    let mut rss_max = rss_before;
    for i in 0..MESSAGES {
        let mut body = vec![0x5Au8; MESSAGE];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let r = http
            .post("/api/publish?topic=firehose")
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        rss_max = rss_max.max(gw.rss_kib());
    }
    let (got, _fast) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, MESSAGES);

    // The gateway gave up on the slow client: counted as a slow-consumer drop and close.
    let scrape = http.metrics().await;
    assert!(
        metric(
            &scrape,
            "wsgate_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .unwrap()
            > 0.0
    );
    // The slow client, reading at last, finds some messages and then a policy close.
    let mut received = 0;
    loop {
        match slow.next().await {
            Received::Binary(_) => received += 1,
            Received::Close(code, reason) => {
                assert_eq!(code, Some(1008), "{reason}");
                assert!(reason.contains("slow consumer"), "{reason}");
                break;
            }
            Received::Ended => {
                panic!("connection cut without a close frame after {received} messages")
            }
            Received::Text(t) => panic!("unexpected text {t}"),
        }
    }
    assert!(received < MESSAGES, "the slow client was never cut off");
    // Reading on sends the client's answer to the close; the gateway then closes the stream.
    assert_eq!(slow.next().await, Received::Ended);
    http.wait_stats("slow client gone", |s| s["connections"] == 1)
        .await;
    let scrape = http.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"slow_consumer\"}"
        ),
        Some(1.0)
    );

    // Memory stayed near the queue bound (32 MiB), far below the 150 MiB published.
    let growth_mib = (rss_max.saturating_sub(rss_before)) / 1024;
    assert!(growth_mib < 80, "RSS grew by {growth_mib} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flips_readiness_closes_clients_with_1001_and_exits_within_the_grace_period() {
    let mut gw =
        // A 9 s window: 3 s of draining before the first close leaves a loaded CI machine
        // ample time to observe readiness and the refused upgrade.
        ProcessGateway::spawn_bin(env!("CARGO_BIN_EXE_wsgate"), &["--drain-timeout-secs", "9"])
            .await;
    let http = gw.http();
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    assert_eq!(http.get("/readyz").send().await.unwrap().status(), 200);

    gw.signal("-TERM");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = http.get("/readyz").send().await.unwrap().status();
        if status == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never flipped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New upgrades are refused while draining.
    match tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("upgrade during drain: {other:?}"),
    }
    for c in [&mut a, &mut b] {
        assert!(matches!(c.next().await, Received::Close(Some(1001), _)));
    }
    let status = tokio::time::timeout(Duration::from_secs(9 + 10), gw.child.wait())
        .await
        .expect("wsgate did not exit after the drain window")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// SIGTERMs a gateway started with `args` and holding `clients` connections; returns how long
/// it took until every client had its 1001 close frame, after checking the process exited
/// cleanly.
async fn drain(args: &[&str], clients: usize) -> Duration {
    let mut gw = ProcessGateway::spawn_bin(env!("CARGO_BIN_EXE_wsgate"), args).await;
    let mut held = Vec::with_capacity(clients);
    for _ in 0..clients {
        held.push(gw.client().await);
    }
    gw.http()
        .wait_stats("the clients", |s| s["connections"] == clients)
        .await;
    let start = tokio::time::Instant::now();
    gw.signal("-TERM");
    for c in &mut held {
        match c.next().await {
            Received::Close(Some(1001), _) => {}
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
    let took = start.elapsed();
    let status = tokio::time::timeout(DEADLINE, gw.child.wait())
        .await
        .expect("wsgate did not exit after its drain")
        .unwrap();
    assert!(status.success(), "{status:?}");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_rate_paces_the_closes_and_a_short_window_still_closes_everyone_cleanly() {
    // 60 clients at 20 closes/s: the 60th close cannot be sent before 59/20 s after SIGTERM
    // (a lower bound the pacing guarantees, whatever the machine's speed).
    let took = drain(&["--drain-timeout-secs", "60", "--drain-rate", "20"], 60).await;
    assert!(
        took >= Duration::from_millis(2950),
        "paced drain took {took:?}"
    );

    // At 1 close/s, 60 clients do not fit in a 3 s window: the window wins, and every client
    // still gets its close frame before the process exits.
    drain(&["--drain-timeout-secs", "3", "--drain-rate", "1"], 60).await;
}

#[tokio::test]
async fn invalid_configuration_fails_at_start_with_one_line_naming_the_setting() {
    for (args, env, setting) in [
        (vec!["--listen", "not-an-address"], None, "--listen"),
        (vec!["--key-prefix", "bad prefix"], None, "--key-prefix"),
        (
            vec![],
            Some(("WSGATE_CONNECT_TIMEOUT_MS", "soon")),
            "--connect-timeout-ms",
        ),
        (
            vec![],
            Some(("WSGATE_MAX_TOPICS_PER_CONNECTION", "0")),
            "--max-topics-per-connection",
        ),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.env_clear().args(&args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(setting), "{stderr}");
    }
}

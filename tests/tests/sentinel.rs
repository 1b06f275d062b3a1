//! Redis Sentinel: one master, one replica and three sentinels, all real redis-server
//! processes on loopback. The master is killed while two gateways publish steadily: delivery
//! resumes on the promoted replica without any client action, and every message answered 2xx
//! reaches every subscriber.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use wsgate_tests::hostile::{expect_rejected_then_good, forged_announcements, hostile_envelopes};
use wsgate_tests::{Client, SentinelGroup, info_field};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_loses_no_acknowledged_message() {
    let group = SentinelGroup::start();
    let gws = vec![
        group.gateway("sent", &[]).await,
        group.gateway("sent", &[]).await,
    ];
    let SentinelGroup {
        mut master,
        replica,
        sentinels: _sentinels,
    } = group;
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            let mut c = gw.client().await;
            c.join("t").await;
            clients.push(c);
        }
    }

    // Publish steadily, alternating replicas; kill the master after 20 messages; stop once
    // 20 messages were accepted after the kill (bounded by count and time).
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut killed_at = None;
    let mut resumed_after = None;
    let limit = Instant::now() + Duration::from_secs(60);
    let mut n = 0u32;
    while Instant::now() < limit {
        if n == 20 && killed_at.is_none() {
            master.kill();
            killed_at = Some(Instant::now());
        }
        let text = format!("m{n}");
        let status = gws[(n % 2) as usize]
            .http()
            .publish_status("t", &text)
            .await;
        match status {
            200 => {
                accepted.push(text);
                if let Some(k) = killed_at
                    && resumed_after.is_none()
                {
                    resumed_after = Some(k.elapsed());
                }
            }
            503 | 504 => refused += 1,
            other => panic!("publish answered {other}"),
        }
        n += 1;
        if resumed_after.is_some() && accepted.len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed_after.expect("publishing never resumed after the failover");
    println!(
        "failover: publishes accepted again {resumed:?} after the master was killed; {refused} \
         refused (503/504) meanwhile, {} accepted in all",
        accepted.len()
    );
    // Every message answered 2xx reaches every subscriber; nothing twice.
    let want: BTreeSet<String> = accepted.iter().cloned().collect();
    for c in &mut clients {
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            let text = c.next_text().await;
            assert!(got.insert(text.clone()), "{text} twice");
        }
    }
    // The promoted replica holds exactly the gateways' subscriptions.
    assert_eq!(replica.numsub("sent:t"), 2);
    assert_eq!(
        info_field(&replica, "replication", "role").as_deref(),
        Some("master")
    );
    let _: Vec<Client> = clients;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_through_sentinel_are_counted_and_good_messages_keep_flowing() {
    let group = SentinelGroup::start();
    let gw = group.gateway("bad", &["--max-message-bytes", "1000"]).await;
    let mut c = gw.client().await;
    c.join("t").await;
    let bad = hostile_envelopes();
    for p in &bad {
        assert_eq!(group.master.publish("bad:t", p), 1);
    }
    let forged = forged_announcements();
    for p in &forged {
        assert_eq!(group.master.publish("bad:__replicas__", p), 1);
    }
    group.master.publish(
        "bad:t",
        br#"{"topic":"t","message":"good","isBinary":false}"#,
    );
    expect_rejected_then_good(&gw.http(), &mut c, bad.len() + forged.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master_is_left_as_soon_as_the_sentinels_switch() {
    let group = SentinelGroup::start();
    let gws = [
        group.gateway("frozen", &[]).await,
        group.gateway("frozen", &[]).await,
    ];
    // The subscriber is on the replica that never publishes: its connections to the old
    // master are idle, so only the sentinels' announcement can tell it to leave.
    let mut c = gws[1].client().await;
    c.join("t").await;
    // Frozen, not dead: its connections stay open and silent.
    group.master.signal("-STOP");
    let replica_port = group.replica.port();
    let deadline = Instant::now() + Duration::from_secs(30);
    while group.named_master_port() != Some(replica_port) {
        assert!(Instant::now() < deadline, "the sentinels never switched");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let switched = Instant::now();
    let mut accepted = Vec::new();
    let mut n = 0;
    while accepted.len() < 20 {
        assert!(
            switched.elapsed() < Duration::from_secs(30),
            "publishing never resumed"
        );
        let text = format!("m{n}");
        n += 1;
        match gws[0].http().publish_status("t", &text).await {
            200 => accepted.push(text),
            503 | 504 => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("publish answered {other}"),
        }
    }
    // Every message answered 2xx reached the subscriber on the other replica.
    let want: BTreeSet<String> = accepted.into_iter().collect();
    let mut got = BTreeSet::new();
    while !want.is_subset(&got) {
        got.insert(c.next_text().await);
    }
    assert_eq!(group.replica.numsub("frozen:t"), 1);
    group.master.signal("-CONT");
}

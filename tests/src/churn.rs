//! Random join/leave/disconnect churn over gateway processes, and what the channels should be
//! afterwards: the bookkeeping tests of every Redis topology share it.

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::{Client, ProcessGateway};

/// The socket tag of each gateway: the first 32 bits of its socket ids, naming its direct
/// channel.
pub async fn socket_tags(gws: &[ProcessGateway]) -> Vec<String> {
    let mut tags = Vec::new();
    for gw in gws {
        let stats = gw.http().stats().await;
        tags.push(stats["broker"]["socketTag"].as_str().unwrap().to_owned());
    }
    tags
}

/// The channels each gateway should hold: its topics, its direct channel, the broadcast
/// channel, and with `per_socket` one channel per connection.
pub fn expected_numsub(
    prefix: &str,
    per_gateway: &[(BTreeSet<String>, BTreeSet<String>)],
    tags: &[String],
    per_socket: bool,
) -> HashMap<String, i64> {
    let mut want: HashMap<String, i64> = HashMap::new();
    for ((topics, sockets), tag) in per_gateway.iter().zip(tags) {
        for t in topics {
            *want.entry(format!("{prefix}:{t}")).or_default() += 1;
        }
        for s in sockets {
            assert!(
                s.starts_with(tag.as_str()),
                "socket {s} of the replica tagged {tag}"
            );
            if per_socket {
                *want.entry(format!("{prefix}:__socket__:{s}")).or_default() += 1;
            }
        }
        // Every replica listens on the replicas channel and its direct channel, whatever its
        // clients do.
        *want.entry(format!("{prefix}:__replicas__")).or_default() += 1;
        *want
            .entry(format!("{prefix}:__direct__:{tag}"))
            .or_default() += 1;
        if !sockets.is_empty() {
            *want.entry(format!("{prefix}:__broadcast__")).or_default() += 1;
        }
    }
    want
}

pub struct Churn {
    pub rng: StdRng,
    pub topics: Vec<String>,
}

/// One simulated client: which gateway, its socket and its joined topics.
pub struct Sim {
    pub gw: usize,
    pub client: Option<Client>,
    pub joined: BTreeSet<String>,
}

impl Churn {
    pub async fn step(&mut self, sims: &mut [Sim], gws: &[ProcessGateway], acked: bool) {
        let i = self.rng.random_range(0..sims.len());
        let sim = &mut sims[i];
        let roll = self.rng.random_range(0..100);
        let Some(client) = sim.client.as_mut() else {
            sim.client = Some(gws[sim.gw].client().await);
            return;
        };
        if roll < 55 {
            let t = self.topics[self.rng.random_range(0..self.topics.len())].clone();
            if acked {
                client.join(&t).await;
            } else {
                client
                    .send_text(&json!({"type": "room.join", "room": t}).to_string())
                    .await;
            }
            sim.joined.insert(t);
        } else if roll < 90 {
            if let Some(t) = sim.joined.iter().next().cloned() {
                if acked {
                    client.leave(&t).await;
                } else {
                    client
                        .send_text(&json!({"type": "room.leave", "room": t}).to_string())
                        .await;
                }
                sim.joined.remove(&t);
            }
        } else {
            // Disconnect abruptly (no close handshake) and come back later.
            sim.client = None;
            sim.joined.clear();
        }
    }
}

/// `clients` simulated clients spread over `gateways`, churning over `topics` topics with a
/// seeded random generator (the same seed replays the same operations).
pub fn simulation(clients: usize, gateways: usize, topics: usize, seed: u64) -> (Vec<Sim>, Churn) {
    let sims = (0..clients)
        .map(|i| Sim {
            gw: i % gateways,
            client: None,
            joined: BTreeSet::new(),
        })
        .collect();
    let churn = Churn {
        rng: StdRng::seed_from_u64(seed),
        topics: (0..topics).map(|i| format!("topic-{i}")).collect(),
    };
    (sims, churn)
}

pub fn expected_state(sims: &[Sim], n_gws: usize) -> Vec<(BTreeSet<String>, BTreeSet<String>)> {
    let mut per = vec![(BTreeSet::new(), BTreeSet::new()); n_gws];
    for s in sims {
        if let Some(c) = &s.client {
            per[s.gw].0.extend(s.joined.iter().cloned());
            per[s.gw].1.insert(c.socket_id.clone());
        }
    }
    per
}

pub async fn wait_local_counts(
    gws: &[ProcessGateway],
    per: &[(BTreeSet<String>, BTreeSet<String>)],
) {
    for (gw, (_, sockets)) in gws.iter().zip(per) {
        let n = sockets.len() as u64;
        gw.http()
            .wait_stats("connections settle", |s| s["connections"] == n)
            .await;
    }
}

/// The same expectation with cluster channel names: `prefix:{rest}` (the hash tag).
pub fn sharded(prefix: &str, want: HashMap<String, i64>) -> HashMap<String, i64> {
    let head = format!("{prefix}:");
    want.into_iter()
        .map(|(ch, n)| match ch.strip_prefix(&head) {
            Some(rest) => (format!("{prefix}:{{{rest}}}"), n),
            None => (ch, n),
        })
        .collect()
}

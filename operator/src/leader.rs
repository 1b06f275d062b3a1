//! Lease-based leader election (`coordination.k8s.io/v1`).
//!
//! Only the replica holding the Lease reconciles. Every write carries the `resourceVersion` it
//! read, so when two candidates race for an expired Lease the API server lets exactly one win
//! (the other gets 409 Conflict). A leader that cannot renew in time stops reconciling before
//! the Lease can expire (see `main`), so two replicas never reconcile at once.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{error, warn};

use crate::error::Result;

/// Wall-clock source for Lease timestamps; tests inject their own.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// What a candidate should do with the Lease as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder's time ran out): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a valid Lease.
    Follow {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the Lease spec (if the Lease exists) at time `now`.
#[must_use]
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    match holder {
        None => Decision::Acquire,
        Some(holder) if holder == me => Decision::Renew,
        Some(holder) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|renewed| renewed.0 + duration < now);
            if expired {
                Decision::Acquire
            } else {
                Decision::Follow { holder }
            }
        }
    }
}

/// One candidate in the election.
#[derive(Clone)]
pub struct LeaderElector {
    api: Api<Lease>,
    lease_name: String,
    identity: String,
    lease_duration: Duration,
    clock: Clock,
}

impl LeaderElector {
    /// A candidate called `identity` competing for Lease `lease_name` through `api`.
    #[must_use]
    pub fn new(
        api: Api<Lease>,
        lease_name: &str,
        identity: &str,
        lease_duration: Duration,
    ) -> Self {
        Self {
            api,
            lease_name: lease_name.to_owned(),
            identity: identity.to_owned(),
            lease_duration,
            clock: Arc::new(Timestamp::now),
        }
    }

    /// Uses `clock` instead of the system clock for Lease timestamps.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Waits until this candidate holds the Lease, retrying every renew interval. Returns false
    /// if `stop` is set first.
    pub async fn acquire(&self, mut stop: watch::Receiver<bool>) -> bool {
        loop {
            if *stop.borrow() {
                return false;
            }
            match self.try_acquire_or_renew((self.clock)()).await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election attempt failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.renew_interval()) => {}
                changed = stop.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// Renews the Lease every renew interval while leading. Sets `stop` (so the controller
    /// shuts down) as soon as another candidate holds the Lease, or when no renewal has
    /// succeeded for two thirds of the Lease duration: the leader steps down before anyone else
    /// may legitimately take over. Returns once `stop` is set.
    pub async fn keep_leadership(&self, stop: watch::Sender<bool>) {
        let mut last_renewed = tokio::time::Instant::now();
        let deadline = self.lease_duration.mul_f64(2.0 / 3.0);
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            if *stop.borrow() {
                return;
            }
            // A hung request must not outlive the lease: bound each attempt.
            let attempt = tokio::time::timeout(
                self.renew_interval(),
                self.try_acquire_or_renew((self.clock)()),
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
            if last_renewed.elapsed() >= deadline {
                error!("could not renew the leader lease in time; stopping");
                let _ = stop.send(true);
                return;
            }
        }
    }

    /// How often the leader renews: a third of the Lease duration, so two renewals can fail
    /// before the Lease runs out.
    #[must_use]
    pub fn renew_interval(&self) -> Duration {
        self.lease_duration / 3
    }

    /// Tries to acquire or renew the Lease at time `now`. Returns whether this candidate is the
    /// leader afterwards. Losing a race (409 Conflict) is not an error: it means "not leader".
    ///
    /// # Errors
    /// Other API failures.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool> {
        let current = self.api.get_opt(&self.lease_name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        let duration_secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let result = match (decision, current) {
            (Decision::Follow { .. }, _) => return Ok(false),
            (Decision::Acquire, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.lease_name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(duration_secs),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (decision, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if decision == Decision::Acquire {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(MicroTime(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.lease_duration_seconds = Some(duration_secs);
                spec.renew_time = Some(MicroTime(now));
                // `replace` sends the resourceVersion we read: a concurrent writer makes it 409.
                self.api
                    .replace(&self.lease_name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Decision::Renew, None) => return Ok(false),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once instead of waiting
    /// for it to expire. Only clears it if this candidate still holds it.
    ///
    /// # Errors
    /// API failures.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.lease_name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid timestamp")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_missing_or_unheld_lease_is_acquired() {
        assert_eq!(decide(None, "a", at(0)), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", at(0)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_valid_lease_held_by_another_is_followed_until_it_expires() {
        let lease = held_by("b", 0);
        assert_eq!(
            decide(Some(&lease), "a", at(10)),
            Decision::Follow { holder: "b".into() }
        );
        assert_eq!(decide(Some(&lease), "a", at(16)), Decision::Acquire);
    }

    #[test]
    fn the_holder_renews_its_own_lease() {
        assert_eq!(
            decide(Some(&held_by("a", 0)), "a", at(100)),
            Decision::Renew
        );
    }
}

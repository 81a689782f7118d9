//! Leader election for the controllers, over a `coordination.k8s.io/v1` [`Lease`], the way
//! client-go's `leaderelection` does it: every replica serves the webhook, and only the one holding
//! the Lease runs the controllers.
//!
//! - [`LeaderElector::try_acquire_or_renew`] reads the Lease and creates it (when missing), renews it
//!   (when we hold it) or takes it over (when its holder is empty or its lease expired); each write
//!   is conditional on the `resourceVersion` read, so of two replicas racing for it one gets a
//!   `409 Conflict` and stays a follower.
//! - Whether another holder's lease has expired is judged on this replica's monotonic clock, as
//!   client-go does, never by comparing its `renewTime` with our wall clock: the lease is live
//!   while its record has changed within its `leaseDurationSeconds`, as we saw it. Clock skew
//!   between nodes cannot make two leaders; the price is that a replica starting next to a dead
//!   holder's lease waits one lease duration before it takes it over.
//! - [`LeaderElector::hold`] renews every `retry_period` and returns as soon as another holder took
//!   the Lease, or when no renewal succeeded within `renew_deadline` of the start of the last
//!   successful one (a hanging request included). The deadline counts from when that renewal was
//!   sent, not from when its answer came, so the leader stops before any other replica can see its
//!   lease expire (`renew_deadline` < `lease_duration`, which [`LeaderElector::new`] checks).
//! - [`LeaderElector::release`], on a graceful shutdown, empties the holder (client-go's
//!   `ReleaseOnCancel`) so that the next replica takes over at once.
//!
//! The process is expected to stop the controllers and exit when [`LeaderElector::hold`] returns:
//!
//! ```no_run
//! use kybernate_operator::leader::{LeaderElector, LeaseConfig};
//!
//! async fn controllers_when_leading(
//!     client: kube::Client,
//!     controllers: impl std::future::Future<Output = ()>,
//!     shutdown: impl std::future::Future<Output = ()>,
//! ) -> anyhow::Result<()> {
//!     let config = LeaseConfig::new(client.default_namespace());
//!     let elector = LeaderElector::new(client, config)?;
//!     tokio::select! {
//!         () = elector.acquire() => {}
//!         () = shutdown => return Ok(()),
//!     }
//!     tokio::select! {
//!         lost = elector.hold() => Err(anyhow::Error::new(lost)),
//!         // The controllers stop on the shutdown signal: hand the lease on.
//!         () = controllers => {
//!             elector.release().await?;
//!             Ok(())
//!         }
//!     }
//! }
//! ```

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

use crate::status::MANAGER;

/// The Lease's name unless configured otherwise.
pub const DEFAULT_LEASE_NAME: &str = "kybernate-operator";

/// Which Lease, who we are, and the timing (client-go's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (the operator's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// Our `holderIdentity`: unique to this process (see [`default_identity`]).
    pub identity: String,
    /// How long a holder's lease lasts after its last renewal (written as whole seconds); others
    /// wait this long after they last saw it change before they take it over.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up; shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// How long between two tries (to acquire, to renew).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Lease [`DEFAULT_LEASE_NAME`] in `namespace`, as [`default_identity`], for 15 s, renewed every
    /// 2 s, given up after 10 s without a renewal.
    pub fn new(namespace: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: DEFAULT_LEASE_NAME.to_string(),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// This process's identity: `$POD_NAME` (else the hostname, which in a pod is its name), then `_`
/// and 16 random hex digits, so that a restarted container is never taken for its predecessor (it
/// waits for the old lease to expire, or for its release, instead of carrying it on).
pub fn default_identity() -> String {
    let non_empty = |s: String| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let base = std::env::var("POD_NAME")
        .ok()
        .and_then(non_empty)
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().and_then(non_empty))
        .or_else(|| std::env::var("HOSTNAME").ok().and_then(non_empty))
        .unwrap_or_else(|| DEFAULT_LEASE_NAME.to_string());
    // RandomState's keys are random per process and differ at each call.
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{base}_{:016x}", RandomState::new().hash_one((std::process::id(), nanos)))
}

/// Settings [`LeaderElector::new`] refuses: their timing cannot keep two replicas from leading at
/// once, or would never retry.
#[derive(Debug, thiserror::Error)]
#[error("leader election settings: {0}")]
pub struct ConfigError(String);

/// Why a request on the Lease failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the Lease failed (other than it not existing).
    #[error("reading Lease {namespace}/{name}: {source}")]
    Read {
        /// The namespace.
        namespace: String,
        /// The Lease.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// Creating the Lease failed (other than another replica creating it first).
    #[error("creating Lease {namespace}/{name}: {source}")]
    Create {
        /// The namespace.
        namespace: String,
        /// The Lease.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// Writing the Lease failed (other than another writer changing it first).
    #[error("updating Lease {namespace}/{name}: {source}")]
    Update {
        /// The namespace.
        namespace: String,
        /// The Lease.
        name: String,
        /// The API server's error.
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("Lease {namespace}/{name}: no answer within {after:?}")]
    TimedOut {
        /// The namespace.
        namespace: String,
        /// The Lease.
        name: String,
        /// How long it waited.
        after: Duration,
    },
}

/// Why [`LeaderElector::hold`] returned: this replica is no longer the leader and must stop its
/// controllers.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// Another replica holds the Lease now.
    #[error("the lease was taken over by {holder}")]
    Taken {
        /// Its holder.
        holder: String,
    },
    /// No renewal succeeded within the renew deadline.
    #[error("the lease could not be renewed within {after:?}")]
    NotRenewed {
        /// The renew deadline.
        after: Duration,
        /// The last renewal's error, if it failed with one (not after a mere conflict).
        #[source]
        last: Option<Error>,
    },
    /// It was not held in the first place ([`LeaderElector::acquire`] did not return before).
    #[error("the lease was not held")]
    NotLeader,
}

/// What one try came to.
enum Attempt {
    /// We hold the Lease (created, renewed or taken over).
    Leader,
    /// Another replica holds it and its lease is live.
    Follower { holder: String },
    /// Someone else wrote it between our read and our write.
    Conflict,
}

/// A request on the Lease, for its error.
enum Op {
    Read,
    Create,
    Update,
}

/// What the elector knows of the Lease.
struct State {
    /// The Lease as last read or written.
    lease: Option<Lease>,
    /// When we saw its record (spec) change last.
    observed_at: Instant,
    /// While we hold it: when the last successful try was sent.
    renewed_at: Option<Instant>,
}

/// Acquires, renews and releases the Lease of [`LeaseConfig`] for this replica.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    now: fn() -> MicroTime,
    state: Mutex<State>,
}

impl LeaderElector {
    /// An elector for `config`'s Lease through `client`; refuses timing that could let two replicas
    /// lead at once (a renew deadline not shorter than the lease duration) or never retry.
    pub fn new(client: Client, config: LeaseConfig) -> Result<Self, ConfigError> {
        let seconds = config.lease_duration.as_secs();
        if seconds == 0 || i32::try_from(seconds).is_err() {
            return Err(ConfigError(format!(
                "the lease duration ({:?}) must be a whole number of seconds from 1 s",
                config.lease_duration
            )));
        }
        if config.renew_deadline >= Duration::from_secs(seconds) {
            return Err(ConfigError(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({seconds} s)",
                config.renew_deadline
            )));
        }
        if config.retry_period.is_zero() || config.retry_period >= config.renew_deadline {
            return Err(ConfigError(format!(
                "the retry period ({:?}) must be more than 0 and shorter than the renew deadline ({:?})",
                config.retry_period, config.renew_deadline
            )));
        }
        Ok(LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            now: || MicroTime(Utc::now()),
            state: Mutex::new(State { lease: None, observed_at: Instant::now(), renewed_at: None }),
        })
    }

    /// The same with another clock (the `acquireTime` and `renewTime` written: tests fix them).
    pub fn with_clock(mut self, now: fn() -> MicroTime) -> Self {
        self.now = now;
        self
    }

    /// Our `holderIdentity`.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// One try: reads the Lease, then creates it, renews it or takes it over when it may. True when
    /// we hold it now; false when another replica does (its lease is live, or it wrote the Lease
    /// between our read and our write).
    pub async fn try_acquire_or_renew(&self) -> Result<bool, Error> {
        Ok(matches!(self.attempt().await?, Attempt::Leader))
    }

    /// Returns once this replica holds the Lease, trying every retry period; failures are logged and
    /// retried.
    pub async fn acquire(&self) {
        let mut waiting_for = None;
        loop {
            match tokio::time::timeout(self.config.renew_deadline, self.attempt()).await {
                Ok(Ok(Attempt::Leader)) => {
                    tracing::info!(lease = %self.key(), identity = %self.config.identity, "leading");
                    return;
                }
                Ok(Ok(Attempt::Follower { holder })) => {
                    if waiting_for.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.key(), %holder, "waiting for the lease");
                        waiting_for = Some(holder);
                    }
                }
                Ok(Ok(Attempt::Conflict)) => {
                    tracing::debug!(lease = %self.key(), "another replica wrote the lease first")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "acquiring the lease failed; retrying"),
                Err(_) => tracing::warn!(error = %self.timed_out(self.config.renew_deadline), "retrying"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the Lease every retry period while this replica holds it; returns when it does not
    /// any more: another replica holds it, or no renewal succeeded within the renew deadline of the
    /// last successful one. Cancelling it (dropping the future) stops renewing.
    pub async fn hold(&self) -> Lost {
        let mut last = None;
        loop {
            let Some(renewed_at) = self.state().renewed_at else { return Lost::NotLeader };
            let deadline = renewed_at + self.config.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.config.retry_period).min(deadline)).await;
            if Instant::now() >= deadline {
                return self.lost(Lost::NotRenewed { after: self.config.renew_deadline, last });
            }
            match tokio::time::timeout_at(deadline, self.attempt()).await {
                Ok(Ok(Attempt::Leader)) => last = None,
                Ok(Ok(Attempt::Follower { holder })) => return self.lost(Lost::Taken { holder }),
                Ok(Ok(Attempt::Conflict)) => {
                    tracing::debug!(lease = %self.key(), "the lease changed while renewing it; retrying");
                    last = None;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "renewing the lease failed; retrying");
                    last = Some(e);
                }
                Err(_) => last = Some(self.timed_out(deadline - renewed_at)),
            }
        }
    }

    /// When this replica holds the Lease (as last read or written), empties its holder, with a
    /// lease of 1 s, so that the next replica takes it over at once. True when it was released;
    /// false when it was not ours, or changed since (a conflict: it is not ours then either).
    /// Waits at most the renew deadline.
    pub async fn release(&self) -> Result<bool, Error> {
        let lease = {
            let state = self.state();
            match &state.lease {
                Some(lease) if self.holds(lease) => lease.clone(),
                _ => return Ok(false),
            }
        };
        let now = (self.now)();
        let mut released = lease;
        let spec = released.spec.take().unwrap_or_default();
        released.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            ..spec
        });
        let params = post_params();
        let write = self.api.replace(&self.config.name, &params, &released);
        let result = match tokio::time::timeout(self.config.renew_deadline, write).await {
            Ok(result) => result,
            Err(_) => return Err(self.timed_out(self.config.renew_deadline)),
        };
        match result {
            Ok(written) => {
                let mut state = self.state();
                state.lease = Some(written);
                state.observed_at = Instant::now();
                state.renewed_at = None;
                tracing::info!(lease = %self.key(), "released the lease");
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                self.state().renewed_at = None;
                Ok(false)
            }
            Err(source) => Err(self.error(Op::Update, source)),
        }
    }

    /// One try (see [`Self::try_acquire_or_renew`]).
    async fn attempt(&self) -> Result<Attempt, Error> {
        let sent = Instant::now();
        let now = (self.now)();
        let read = self.api.get_opt(&self.config.name).await.map_err(|source| self.error(Op::Read, source))?;
        let Some(mut lease) = read else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&post_params(), &lease).await {
                Ok(created) => Ok(self.won(created, sent)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
                Err(source) => Err(self.error(Op::Create, source)),
            };
        };

        let old = lease.spec.clone().unwrap_or_default();
        let observed_at = self.observe(&lease);
        let ours = self.holds(&lease);
        let holder = old.holder_identity.clone().filter(|h| !h.is_empty());
        if let Some(holder) = holder.filter(|_| !ours) {
            let duration = old
                .lease_duration_seconds
                .map_or(self.config.lease_duration, |s| Duration::from_secs(u64::try_from(s).unwrap_or_default()));
            if Instant::now() < observed_at + duration {
                return Ok(Attempt::Follower { holder });
            }
            tracing::info!(lease = %self.key(), %holder, "the lease expired; taking it over");
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds()),
            acquire_time: if ours { old.acquire_time.clone() } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: if ours {
                old.lease_transitions
            } else {
                Some(old.lease_transitions.unwrap_or(0).saturating_add(1))
            },
            ..old
        });
        // The read resourceVersion goes with it: a write in between makes this a 409.
        match self.api.replace(&self.config.name, &post_params(), &lease).await {
            Ok(written) => Ok(self.won(written, sent)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Conflict),
            Err(source) => Err(self.error(Op::Update, source)),
        }
    }

    /// Records `lease` as read; when its record differs from the one seen before, it changed now.
    /// When it last changed.
    fn observe(&self, lease: &Lease) -> Instant {
        let mut state = self.state();
        if state.lease.as_ref().map(|l| &l.spec) != Some(&lease.spec) {
            state.observed_at = Instant::now();
        }
        state.lease = Some(lease.clone());
        state.observed_at
    }

    /// Records `lease` as written by us in a try sent at `sent`.
    fn won(&self, lease: Lease, sent: Instant) -> Attempt {
        let mut state = self.state();
        state.lease = Some(lease);
        state.observed_at = Instant::now();
        state.renewed_at = Some(sent);
        Attempt::Leader
    }

    /// Forgets that we hold the Lease.
    fn lost(&self, lost: Lost) -> Lost {
        self.state().renewed_at = None;
        tracing::error!(lease = %self.key(), reason = %lost, "no longer leading");
        lost
    }

    /// Whether `lease` names us its holder.
    fn holds(&self, lease: &Lease) -> bool {
        lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(self.config.identity.as_str())
    }

    /// The lease duration as written (whole seconds; [`Self::new`] checked that it fits).
    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// The state, locked (never across an await).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `namespace/name`.
    fn key(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.name)
    }

    /// The API server's `source` failing `op`, naming the Lease.
    fn error(&self, op: Op, source: kube::Error) -> Error {
        let (namespace, name) = (self.config.namespace.clone(), self.config.name.clone());
        match op {
            Op::Read => Error::Read { namespace, name, source },
            Op::Create => Error::Create { namespace, name, source },
            Op::Update => Error::Update { namespace, name, source },
        }
    }

    /// The error of a request on the Lease unanswered `after` that long.
    fn timed_out(&self, after: Duration) -> Error {
        Error::TimedOut { namespace: self.config.namespace.clone(), name: self.config.name.clone(), after }
    }
}

/// The parameters of every write: our field manager.
fn post_params() -> PostParams {
    PostParams { field_manager: Some(MANAGER.to_string()), ..PostParams::default() }
}

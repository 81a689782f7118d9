//! Leader election against a mocked API server (`tower-test`, as kube-rs documents it): for each
//! state of the Lease (missing, ours, another holder's live or expired lease, released) the exact
//! requests sent (method, path, query, body) and whether we lead; conflicts and API errors; the
//! release; and, on tokio's paused clock (no real sleeps), when `acquire` takes the Lease over and
//! when `hold` gives it up.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::chrono::{TimeZone as _, Utc};
use kube::client::Body;
use kube::Client;
use kybernate_operator::leader::{default_identity, Error, LeaderElector, LeaseConfig, Lost, DEFAULT_LEASE_NAME};
use serde_json::{json, Value};
use tokio::time::Instant;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The clock of every test: the time the elector writes (as a MicroTime serializes).
const NOW: &str = "2025-01-02T03:04:05.000000Z";
/// When the Leases of the tests were acquired and last renewed.
const EARLIER: &str = "2025-01-02T03:00:00.000000Z";

fn now() -> MicroTime {
    MicroTime(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).single().expect("a valid time"))
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kybernate-operator";
const LEASES_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases";
const WRITE_QUERY: &str = "&fieldManager=kybernate-operator";
/// Our identity.
const ME: &str = "kybernate-operator-7d9f-abcde_00000000000000aa";
/// Another replica's.
const OTHER: &str = "kybernate-operator-7d9f-fghij_00000000000000bb";

/// An elector for Lease `kube-system/kybernate-operator` as [`ME`], on a mocked API server.
fn elector() -> (LeaderElector, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = LeaseConfig { identity: ME.to_string(), ..LeaseConfig::new("kube-system") };
    (LeaderElector::new(client, config).expect("valid settings").with_clock(now), handle)
}

/// The Lease at `resource_version` with `spec`.
fn lease(resource_version: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": "kybernate-operator", "namespace": "kube-system", "uid": "u-1",
            "resourceVersion": resource_version,
        },
        "spec": spec,
    })
}

/// A lease of `holder` for `seconds`, acquired and renewed [`EARLIER`], after `transitions`.
fn held(holder: &str, seconds: i32, transitions: i32) -> Value {
    json!({
        "holderIdentity": holder, "leaseDurationSeconds": seconds,
        "acquireTime": EARLIER, "renewTime": EARLIER, "leaseTransitions": transitions,
    })
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

fn not_found() -> Value {
    status(404, "NotFound", "leases.coordination.k8s.io \"kybernate-operator\" not found")
}

fn conflict() -> Value {
    status(
        409,
        "Conflict",
        "Operation cannot be fulfilled on leases.coordination.k8s.io \"kybernate-operator\": \
         the object has been modified; please apply your changes to the latest version and try again",
    )
}

/// One request the API server expects, and its answer (none: it never answers).
struct Expect {
    method: Method,
    path: &'static str,
    query: &'static str,
    answer: Option<(StatusCode, Value)>,
}

impl Expect {
    /// A GET of the Lease.
    fn get(status: StatusCode, answer: Value) -> Self {
        Expect { method: Method::GET, path: LEASE_PATH, query: "", answer: Some((status, answer)) }
    }

    /// A GET of the Lease that is never answered.
    fn get_hanging() -> Self {
        Expect { method: Method::GET, path: LEASE_PATH, query: "", answer: None }
    }

    /// A POST creating the Lease; answered `status` with `answer` (the request's body when null).
    fn create(status: StatusCode, answer: Value) -> Self {
        Expect { method: Method::POST, path: LEASES_PATH, query: WRITE_QUERY, answer: Some((status, answer)) }
    }

    /// A PUT of the Lease; answered `status` with `answer` (the request's body when null).
    fn replace(status: StatusCode, answer: Value) -> Self {
        Expect { method: Method::PUT, path: LEASE_PATH, query: WRITE_QUERY, answer: Some((status, answer)) }
    }
}

/// Serves `expected` in order on `handle`, returning when each request came (since the start) and
/// its body; then asserts that no other request comes before the elector is dropped.
fn serve(mut handle: Handle, expected: Vec<Expect>) -> tokio::task::JoinHandle<Vec<(Duration, Value)>> {
    let start = Instant::now();
    tokio::spawn(async move {
        let mut requests = Vec::new();
        let mut unanswered = Vec::new();
        for expect in expected {
            let (request, send) = handle.next_request().await.expect("the elector sends a request");
            let at = start.elapsed();
            assert_eq!(request.method(), expect.method, "{} at {at:?}", request.uri());
            assert_eq!(request.uri().path(), expect.path, "at {at:?}");
            assert_eq!(request.uri().query().unwrap_or_default(), expect.query, "{}", request.uri());
            if expect.method != Method::GET {
                assert_eq!(request.headers()[http::header::CONTENT_TYPE], "application/json", "{}", request.uri());
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            match expect.answer {
                Some((status, answer)) => {
                    let answer = if answer.is_null() { body.clone() } else { answer };
                    let response = Response::builder()
                        .status(status)
                        .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                        .unwrap();
                    send.send_response(response);
                }
                None => unanswered.push(send),
            }
            requests.push((at, body));
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("an unexpected {} {}", request.method(), request.uri());
        }
        requests
    })
}

/// Awaits the mocked server once `elector` is dropped: the requests it served.
async fn served(
    elector: LeaderElector,
    server: tokio::task::JoinHandle<Vec<(Duration, Value)>>,
) -> Vec<(Duration, Value)> {
    drop(elector);
    tokio::time::timeout(Duration::from_secs(60), server).await.expect("the server finishes").unwrap()
}

/// The bodies of `requests`.
fn bodies(requests: &[(Duration, Value)]) -> Vec<Value> {
    requests.iter().map(|(_, body)| body.clone()).collect()
}

/// When `requests` came, in whole seconds.
fn seconds(requests: &[(Duration, Value)]) -> Vec<u64> {
    requests.iter().map(|(at, _)| at.as_secs()).collect()
}

/// One try, which must not hang.
async fn try_once(elector: &LeaderElector) -> Result<bool, Error> {
    tokio::time::timeout(Duration::from_secs(10), elector.try_acquire_or_renew()).await.expect("the try finishes")
}

#[tokio::test]
async fn a_missing_lease_is_created_and_held() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::NOT_FOUND, not_found()), Expect::create(StatusCode::CREATED, Value::Null)],
    );
    assert!(try_once(&elector).await.unwrap(), "leading");
    let requests = served(elector, server).await;
    assert_eq!(
        bodies(&requests),
        [
            Value::Null,
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "kybernate-operator", "namespace": "kube-system"},
                "spec": {
                    "holderIdentity": ME, "leaseDurationSeconds": 15,
                    "acquireTime": NOW, "renewTime": NOW, "leaseTransitions": 0,
                },
            }),
        ]
    );
}

#[tokio::test]
async fn our_own_lease_is_renewed_at_the_read_resource_version() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::OK, lease("41", held(ME, 15, 2))), Expect::replace(StatusCode::OK, Value::Null)],
    );
    assert!(try_once(&elector).await.unwrap(), "leading");
    let requests = served(elector, server).await;
    assert_eq!(
        requests[1].1,
        lease(
            "41",
            json!({
                "holderIdentity": ME, "leaseDurationSeconds": 15,
                // Acquired when it was; only the renewal is new.
                "acquireTime": EARLIER, "renewTime": NOW, "leaseTransitions": 2,
            })
        )
    );
}

#[tokio::test]
async fn a_live_lease_of_another_holder_is_left_alone() {
    let (elector, handle) = elector();
    let server = serve(handle, vec![Expect::get(StatusCode::OK, lease("41", held(OTHER, 15, 2)))]);
    assert!(!try_once(&elector).await.unwrap(), "following");
    let requests = served(elector, server).await;
    assert_eq!(requests.len(), 1, "no write");
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_of_another_holder_is_taken_over() {
    let (elector, handle) = elector();
    // Its holder asked for 20 s: that is what we wait, counted from when we saw it.
    let theirs = lease("41", held(OTHER, 20, 3));
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::OK, theirs.clone()),
            Expect::get(StatusCode::OK, theirs.clone()),
            Expect::get(StatusCode::OK, theirs),
            Expect::replace(StatusCode::OK, Value::Null),
        ],
    );
    assert!(!try_once(&elector).await.unwrap(), "live when first seen, however old its renewTime");
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(!try_once(&elector).await.unwrap(), "live for 20 s");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(try_once(&elector).await.unwrap(), "taken over");
    let requests = served(elector, server).await;
    assert_eq!(seconds(&requests), [0, 19, 20, 20]);
    assert_eq!(
        requests[3].1,
        lease(
            "41",
            json!({
                "holderIdentity": ME, "leaseDurationSeconds": 15,
                "acquireTime": NOW, "renewTime": NOW, "leaseTransitions": 4,
            })
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_renewing_holder_is_never_taken_over_whatever_its_clock_says() {
    let (elector, handle) = elector();
    // Its clock is years behind ours: only that its record changes counts.
    let at = |rv: &str, renew: &str| {
        lease(
            rv,
            json!({
                "holderIdentity": OTHER, "leaseDurationSeconds": 15,
                "acquireTime": "2020-01-01T00:00:00.000000Z", "renewTime": renew, "leaseTransitions": 1,
            }),
        )
    };
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::OK, at("41", "2020-01-01T00:00:00.000000Z")),
            Expect::get(StatusCode::OK, at("42", "2020-01-01T00:00:10.000000Z")),
            Expect::get(StatusCode::OK, at("42", "2020-01-01T00:00:10.000000Z")),
        ],
    );
    assert!(!try_once(&elector).await.unwrap());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!try_once(&elector).await.unwrap(), "renewed");
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!try_once(&elector).await.unwrap(), "24 s after it was first seen, 14 s after its renewal");
    let requests = served(elector, server).await;
    assert_eq!(requests.len(), 3, "no write");
}

#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let (elector, handle) = elector();
    let released = json!({
        "holderIdentity": "", "leaseDurationSeconds": 1,
        "acquireTime": EARLIER, "renewTime": EARLIER, "leaseTransitions": 4,
    });
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::OK, lease("41", released)), Expect::replace(StatusCode::OK, Value::Null)],
    );
    assert!(try_once(&elector).await.unwrap(), "leading");
    let requests = served(elector, server).await;
    assert_eq!(
        requests[1].1,
        lease(
            "41",
            json!({
                "holderIdentity": ME, "leaseDurationSeconds": 15,
                "acquireTime": NOW, "renewTime": NOW, "leaseTransitions": 5,
            })
        )
    );
}

#[tokio::test]
async fn a_conflict_on_takeover_is_not_an_error() {
    let (elector, handle) = elector();
    let released = json!({"holderIdentity": "", "leaseDurationSeconds": 1, "leaseTransitions": 4});
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::OK, lease("41", released)), Expect::replace(StatusCode::CONFLICT, conflict())],
    );
    assert!(!try_once(&elector).await.expect("not an error"), "another replica won");
    let requests = served(elector, server).await;
    assert_eq!(requests[1].1["metadata"]["resourceVersion"], "41");
    assert_eq!(requests[1].1["spec"]["holderIdentity"], ME);
}

#[tokio::test]
async fn a_conflict_on_create_is_not_an_error() {
    let (elector, handle) = elector();
    let exists = status(409, "AlreadyExists", "leases.coordination.k8s.io \"kybernate-operator\" already exists");
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::NOT_FOUND, not_found()), Expect::create(StatusCode::CONFLICT, exists)],
    );
    assert!(!try_once(&elector).await.expect("not an error"), "another replica created it first");
    served(elector, server).await;
}

#[tokio::test]
async fn an_api_error_names_the_lease() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![Expect::get(StatusCode::INTERNAL_SERVER_ERROR, status(500, "InternalError", "etcd timeout"))],
    );
    let err = try_once(&elector).await.expect_err("the Lease cannot be read");
    assert!(matches!(&err, Error::Read { source: kube::Error::Api(e), .. } if e.code == 500), "{err:?}");
    assert!(err.to_string().starts_with("reading Lease kube-system/kybernate-operator: "), "{err}");
    assert!(std::error::Error::source(&err).is_some(), "the API server's error is kept");
    served(elector, server).await;
}

#[tokio::test]
async fn release_empties_the_holder_of_our_lease() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::OK, lease("41", held(ME, 15, 2))),
            Expect::replace(StatusCode::OK, lease("42", held(ME, 15, 2))),
            Expect::replace(StatusCode::OK, Value::Null),
        ],
    );
    assert!(try_once(&elector).await.unwrap());
    assert!(elector.release().await.unwrap(), "released");
    assert!(!elector.release().await.unwrap(), "not ours any more: nothing sent");
    let requests = served(elector, server).await;
    assert_eq!(
        requests[2].1,
        lease(
            // The renewal's answer's: a write since makes the release a conflict.
            "42",
            json!({
                "holderIdentity": "", "leaseDurationSeconds": 1,
                "acquireTime": NOW, "renewTime": NOW, "leaseTransitions": 2,
            })
        )
    );
}

#[tokio::test]
async fn release_of_a_changed_lease_is_not_an_error() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::OK, lease("41", held(ME, 15, 2))),
            Expect::replace(StatusCode::OK, Value::Null),
            Expect::replace(StatusCode::CONFLICT, conflict()),
        ],
    );
    assert!(try_once(&elector).await.unwrap());
    assert!(!elector.release().await.expect("not an error"), "it was not ours any more");
    served(elector, server).await;
}

#[tokio::test]
async fn release_sends_nothing_when_another_replica_leads() {
    let (elector, handle) = elector();
    let server = serve(handle, vec![Expect::get(StatusCode::OK, lease("41", held(OTHER, 15, 2)))]);
    assert!(!try_once(&elector).await.unwrap());
    assert!(!elector.release().await.unwrap());
    let requests = served(elector, server).await;
    assert_eq!(requests.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn hold_returns_when_another_replica_took_the_lease() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::NOT_FOUND, not_found()),
            Expect::create(StatusCode::CREATED, lease("1", held(ME, 15, 0))),
            Expect::get(StatusCode::OK, lease("2", held(OTHER, 15, 1))),
        ],
    );
    assert!(try_once(&elector).await.unwrap());
    let start = Instant::now();
    let lost = elector.hold().await;
    assert!(matches!(&lost, Lost::Taken { holder } if holder == OTHER), "{lost:?}");
    assert_eq!(lost.to_string(), format!("the lease was taken over by {OTHER}"));
    assert_eq!(start.elapsed(), Duration::from_secs(2), "at the first renewal");
    let requests = served(elector, server).await;
    assert_eq!(seconds(&requests), [0, 0, 2]);
}

#[tokio::test(start_paused = true)]
async fn hold_renews_every_retry_period_and_gives_up_after_the_renew_deadline() {
    let (elector, handle) = elector();
    let error = || Expect::get(StatusCode::INTERNAL_SERVER_ERROR, status(500, "InternalError", "etcd timeout"));
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::NOT_FOUND, not_found()),
            Expect::create(StatusCode::CREATED, lease("1", held(ME, 15, 0))),
            // Renewed at 2 s; then it fails until 10 s after that renewal was sent.
            Expect::get(StatusCode::OK, lease("1", held(ME, 15, 0))),
            Expect::replace(StatusCode::OK, lease("2", held(ME, 15, 0))),
            error(),
            error(),
            error(),
            error(),
        ],
    );
    assert!(try_once(&elector).await.unwrap());
    let start = Instant::now();
    let lost = elector.hold().await;
    assert_eq!(start.elapsed(), Duration::from_secs(12));
    assert!(
        matches!(&lost, Lost::NotRenewed { after, last: Some(Error::Read { .. }) } if *after == Duration::from_secs(10)),
        "{lost:?}"
    );
    assert_eq!(lost.to_string(), "the lease could not be renewed within 10s");
    let requests = served(elector, server).await;
    assert_eq!(seconds(&requests), [0, 0, 2, 2, 4, 6, 8, 10]);
    assert_eq!(requests[3].1["spec"]["renewTime"], NOW);
    assert_eq!(requests[3].1["metadata"]["resourceVersion"], "1");
}

#[tokio::test(start_paused = true)]
async fn hold_gives_up_at_the_deadline_while_a_renewal_hangs() {
    let (elector, handle) = elector();
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::NOT_FOUND, not_found()),
            Expect::create(StatusCode::CREATED, lease("1", held(ME, 15, 0))),
            Expect::get_hanging(),
        ],
    );
    assert!(try_once(&elector).await.unwrap());
    let start = Instant::now();
    let lost = elector.hold().await;
    assert_eq!(start.elapsed(), Duration::from_secs(10), "not a moment past the renew deadline");
    assert!(matches!(&lost, Lost::NotRenewed { last: Some(Error::TimedOut { .. }), .. }), "{lost:?}");
    let requests = served(elector, server).await;
    assert_eq!(seconds(&requests), [0, 0, 2]);
}

#[tokio::test(start_paused = true)]
async fn hold_without_the_lease_returns_at_once() {
    let (elector, handle) = elector();
    let server = serve(handle, vec![]);
    assert!(matches!(elector.hold().await, Lost::NotLeader));
    served(elector, server).await;
}

#[tokio::test(start_paused = true)]
async fn acquire_retries_errors_and_waits_for_the_lease_to_expire() {
    let (elector, handle) = elector();
    let theirs = lease("41", held(OTHER, 5, 0));
    let server = serve(
        handle,
        vec![
            Expect::get(StatusCode::INTERNAL_SERVER_ERROR, status(500, "InternalError", "etcd timeout")),
            Expect::get(StatusCode::OK, theirs.clone()),
            Expect::get(StatusCode::OK, theirs.clone()),
            Expect::get(StatusCode::OK, theirs.clone()),
            Expect::get(StatusCode::OK, theirs),
            Expect::replace(StatusCode::OK, Value::Null),
        ],
    );
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), elector.acquire()).await.expect("leading within a minute");
    assert_eq!(start.elapsed(), Duration::from_secs(8), "5 s after the lease was first seen, at a retry");
    let requests = served(elector, server).await;
    assert_eq!(seconds(&requests), [0, 2, 4, 6, 8, 8]);
    assert_eq!(requests[5].1["spec"]["holderIdentity"], ME);
    assert_eq!(requests[5].1["spec"]["leaseTransitions"], 1);
}

#[tokio::test]
async fn timing_that_could_make_two_leaders_is_refused() {
    let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let defaults = LeaseConfig::new("kube-system");
    for config in [
        LeaseConfig { renew_deadline: Duration::from_secs(15), ..defaults.clone() },
        LeaseConfig { lease_duration: Duration::from_millis(500), ..defaults.clone() },
        LeaseConfig { retry_period: Duration::ZERO, ..defaults.clone() },
        LeaseConfig { retry_period: Duration::from_secs(10), ..defaults.clone() },
    ] {
        let err = LeaderElector::new(client.clone(), config.clone()).err().expect("refused");
        assert!(err.to_string().starts_with("leader election settings: "), "{config:?}: {err}");
    }
    assert!(LeaderElector::new(client, defaults).is_ok());
}

#[test]
fn the_defaults_are_client_gos_with_a_unique_identity() {
    let config = LeaseConfig::new("kube-system");
    assert_eq!(config.name, DEFAULT_LEASE_NAME);
    assert_eq!(DEFAULT_LEASE_NAME, "kybernate-operator");
    assert_eq!(
        (config.lease_duration, config.renew_deadline, config.retry_period),
        (Duration::from_secs(15), Duration::from_secs(10), Duration::from_secs(2))
    );
    let (a, b) = (default_identity(), default_identity());
    assert_ne!(a, b, "unique to each elector");
    let (base, suffix) = a.rsplit_once('_').expect("NAME_SUFFIX");
    assert!(!base.is_empty(), "{a}");
    assert_eq!(suffix.len(), 16, "{a}");
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
}

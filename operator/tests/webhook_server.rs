//! The webhook's HTTPS server over real sockets, with a self-signed certificate made for the test and
//! a client that trusts only it: a pod under a policy gets its JSON patch (base64, as the API server
//! reads it), a pod under none is allowed unchanged, garbage gets 400, an oversized body 413, plain
//! HTTP gets no HTTP answer, `/healthz` answers, and `/metrics` counts every admission by outcome.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use kybernate_api::CheckpointPolicy;
use kybernate_operator::identity::{PodCheckpointIndex, PodIdentity, PodMatch};
use kybernate_operator::metrics::Metrics;
use kybernate_operator::policies::StaticPolicies;
use kybernate_operator::webhook_server::{self, TlsError, Webhook, MAX_BODY};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

const REFERENCE: &str = "s3://checkpoints/cluster-a/ml/web-0#2026-12-01T10:00:00.000Z";

/// A store holding one pod checkpoint, of `ml/web-0`.
struct Index;

impl PodCheckpointIndex for Index {
    fn newest(&self, store: &str, identity: &PodIdentity) -> Result<Option<String>, String> {
        let web0 = PodIdentity { namespace: "ml".into(), pods: PodMatch::Named("web-0".into()) };
        Ok((store == "s3://checkpoints/cluster-a" && *identity == web0).then(|| REFERENCE.to_string()))
    }
}

fn policy(namespace: &str, name: &str, selector: Value) -> CheckpointPolicy {
    serde_json::from_value(json!({
        "apiVersion": "kybernate.io/v1alpha1", "kind": "CheckpointPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": selector, "store": "s3://checkpoints/cluster-a"}
    }))
    .unwrap()
}

/// The AdmissionReview the API server sends for the CREATE of StatefulSet pod `web-0` in `ml`.
fn review(labels: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web-0", "namespace": "ml", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": "web-0", "namespace": "ml", "labels": labels,
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web", "uid": "u1", "controller": true}]
                },
                "spec": {"containers": [{"name": "trainer", "image": "python:3"}]}
            },
            "oldObject": null, "dryRun": false
        }
    }))
    .unwrap()
}

/// A webhook serving over TLS on a free port, its metrics on another, and a client that trusts its
/// certificate.
struct Server {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    client: Arc<ClientConfig>,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// Writes a self-signed certificate for `localhost` and its key into `dir`; the certificate's DER.
fn certificate(dir: &Path) -> CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("tls.crt"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), made.key_pair.serialize_pem()).unwrap();
    made.cert.der().clone()
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let der = certificate(dir.path());
    let tls = webhook_server::load_tls_config(&dir.path().join("tls.crt"), &dir.path().join("tls.key")).unwrap();
    // `web` has a policy selecting every pod: it must not apply to a pod in `ml`
    let policies = StaticPolicies(vec![
        policy("ml", "trainers", json!({"matchLabels": {"app": "trainer"}})),
        policy("web", "everything", json!({})),
    ]);
    let metrics = Metrics::new().unwrap();
    let webhook = Arc::new(Webhook::new(Arc::new(policies), Arc::new(Index), metrics.clone()));
    // bound before the servers run: a connection waits in the backlog until they accept it
    let (listener, metrics_listener) =
        (TcpListener::bind("127.0.0.1:0").await.unwrap(), TcpListener::bind("127.0.0.1:0").await.unwrap());
    let (addr, metrics_addr) = (listener.local_addr().unwrap(), metrics_listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(metrics.serve(metrics_listener, std::future::pending()));
    let served = tokio::spawn(webhook_server::serve(listener, tls, webhook, async move { drop(stopped.await) }));
    let mut roots = RootCertStore::empty();
    roots.add(der).unwrap();
    let client = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Server { addr, metrics_addr, client: Arc::new(client), stop, served, _dir: dir }
}

impl Server {
    /// One HTTPS request on a fresh connection: the status and the body.
    async fn https(&self, method: Method, path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let localhost = ServerName::try_from("localhost").unwrap();
        let tls = TlsConnector::from(self.client.clone()).connect(localhost, tcp).await.unwrap();
        send(TokioIo::new(tls), method, path, body).await.unwrap()
    }

    async fn metrics(&self) -> String {
        let tcp = TcpStream::connect(self.metrics_addr).await.unwrap();
        let (status, body) = send(TokioIo::new(tcp), Method::GET, "/metrics", Vec::new()).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        String::from_utf8(body).unwrap()
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.served.await.unwrap();
    }
}

/// One HTTP/1.1 request over `io`.
async fn send<I>(io: I, method: Method, path: &str, body: Vec<u8>) -> Result<(StatusCode, Vec<u8>), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await?;
    let status = response.status();
    Ok((status, response.into_body().collect().await?.to_bytes().to_vec()))
}

/// The AdmissionReview answered, checked for what every answer has.
fn answered(status: StatusCode, body: &[u8]) -> Value {
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(body));
    let review: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        (review["apiVersion"].as_str(), review["kind"].as_str()),
        (Some("admission.k8s.io/v1"), Some("AdmissionReview"))
    );
    assert_eq!(review["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(review["response"]["allowed"], true);
    review["response"].clone()
}

#[tokio::test]
async fn a_pod_under_a_policy_gets_its_json_patch_in_base64() {
    let server = start().await;
    let (status, body) = server.https(Method::POST, "/mutate", review(json!({"app": "trainer"}))).await;
    let response = answered(status, &body);
    assert_eq!(response["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD.decode(response["patch"].as_str().unwrap()).unwrap();
    let patch: Value = serde_json::from_slice(&patch).unwrap();
    assert_eq!(
        patch,
        json!([
            {"op": "add", "path": "/spec/runtimeClassName", "value": "kybernate"},
            {"op": "add", "path": "/metadata/annotations", "value": {}},
            {"op": "add", "path": "/metadata/annotations/kybernate.io~1checkpoint-on-stop", "value": "true"},
            {"op": "add", "path": "/metadata/annotations/kybernate.io~1restore-from", "value": REFERENCE},
            {"op": "add", "path": "/metadata/annotations/kybernate.io~1restore-policy", "value": "fallback-fresh"}
        ])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_pod_under_no_policy_of_its_namespace_is_allowed_without_a_patch() {
    let server = start().await;
    let (status, body) = server.https(Method::POST, "/mutate", review(json!({"app": "web"}))).await;
    let response = answered(status, &body);
    assert_eq!(response.get("patch"), None, "{response}");
    assert_eq!(response.get("patchType"), None, "{response}");
    server.stop().await;
}

#[tokio::test]
async fn what_is_not_an_admission_review_gets_400_with_the_reason() {
    let server = start().await;
    let (status, body) = server.https(Method::POST, "/mutate", b"{not json".to_vec()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("the body is not an admission.k8s.io/v1 AdmissionReview of a pod: "), "{text}");

    let mut v1beta1: Value = serde_json::from_slice(&review(json!({}))).unwrap();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = server.https(Method::POST, "/mutate", serde_json::to_vec(&v1beta1).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "the body is not an admission.k8s.io/v1 AdmissionReview of a pod: apiVersion \"admission.k8s.io/v1beta1\", \
         kind \"AdmissionReview\"\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let server = start().await;
    let (status, body) = server.https(Method::POST, "/mutate", vec![b' '; MAX_BODY + 1]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(String::from_utf8(body).unwrap(), format!("the body is over the webhook's limit of {MAX_BODY} bytes\n"));
    server.stop().await;
}

#[tokio::test]
async fn plain_http_to_the_tls_port_gets_no_http_answer() {
    let server = start().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let answer = send(TokioIo::new(tcp), Method::GET, "/healthz", Vec::new()).await;
    assert!(answer.is_err(), "plain HTTP was answered: {answer:?}");
    // and the server serves TLS on
    assert_eq!(server.https(Method::GET, "/healthz", Vec::new()).await.0, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn healthz_answers_200_and_other_paths_and_methods_are_refused() {
    let server = start().await;
    assert_eq!(server.https(Method::GET, "/healthz", Vec::new()).await, (StatusCode::OK, b"ok\n".to_vec()));
    assert_eq!(server.https(Method::GET, "/mutate", Vec::new()).await.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(server.https(Method::GET, "/validate", Vec::new()).await.0, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_the_admissions_by_outcome() {
    let server = start().await;
    let counters = |text: &str| -> Vec<String> {
        text.lines().filter(|l| l.starts_with("kybernate_operator_admissions_total{")).map(str::to_string).collect()
    };
    let zero = [
        "kybernate_operator_admissions_total{outcome=\"error\"} 0",
        "kybernate_operator_admissions_total{outcome=\"patched\"} 0",
        "kybernate_operator_admissions_total{outcome=\"unchanged\"} 0",
    ];
    assert_eq!(counters(&server.metrics().await), zero);

    for (body, want) in [
        (review(json!({"app": "trainer"})), StatusCode::OK),
        (review(json!({"app": "trainer"})), StatusCode::OK),
        (review(json!({"app": "web"})), StatusCode::OK),
        (b"garbage".to_vec(), StatusCode::BAD_REQUEST),
        (vec![b' '; MAX_BODY + 1], StatusCode::PAYLOAD_TOO_LARGE),
    ] {
        assert_eq!(server.https(Method::POST, "/mutate", body).await.0, want);
    }
    // neither health checks nor plain HTTP are admissions
    server.https(Method::GET, "/healthz", Vec::new()).await;
    let plain = send(TokioIo::new(TcpStream::connect(server.addr).await.unwrap()), Method::GET, "/", Vec::new()).await;
    assert!(plain.is_err());

    let text = server.metrics().await;
    assert!(text.contains("# TYPE kybernate_operator_admissions_total counter"), "{text}");
    assert_eq!(
        counters(&text),
        [
            "kybernate_operator_admissions_total{outcome=\"error\"} 2",
            "kybernate_operator_admissions_total{outcome=\"patched\"} 2",
            "kybernate_operator_admissions_total{outcome=\"unchanged\"} 1",
        ]
    );
    server.stop().await;
}

#[test]
fn a_bad_certificate_or_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    certificate(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let missing = dir.path().join("missing.key");
    let err = webhook_server::load_tls_config(&cert, &missing).unwrap_err();
    assert!(matches!(err, TlsError::Read { ref path, .. } if *path == missing), "{err}");

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = webhook_server::load_tls_config(&not_pem, &key).unwrap_err();
    assert!(matches!(err, TlsError::Pem { ref path, .. } if *path == not_pem), "{err}");
    assert!(err.to_string().starts_with(&format!("{}: ", not_pem.display())), "{err}");

    // a key that is not the certificate's
    let other = tempfile::tempdir().unwrap();
    certificate(other.path());
    let err = webhook_server::load_tls_config(&cert, &other.path().join("tls.key")).unwrap_err();
    assert!(matches!(err, TlsError::Config(_)), "{err}");
}

//! [`GrpcAgents`] against an in-process `kybernate.agent.v1.Agent` server on the loopback: the
//! request arrives as the controller built it, a bundle comes back as [`CheckpointDone`], and an
//! agent's error status is a non-retryable [`AgentError::Failed`]; over mutual TLS (the agent's own
//! `tls::serve`), a client certificate of the agents' CA is served and one of another CA is not.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kybernate_operator::agents::{AgentAddresses, AgentError, AgentTls, CheckpointDone, GrpcAgents, NodeAgents};
use kybernate_proto::kybernate::agent::v1::agent_server::{Agent, AgentServer};
use kybernate_proto::kybernate::agent::v1::{
    checkpoint_request::Target, Bundle, CheckpointEvent, CheckpointRequest, CheckpointResponse, DeleteRequest,
    DeleteResponse, EventsRequest, ListRequest, ListResponse, PodTarget, StatusRequest, StatusResponse,
};
use tonic::codegen::tokio_stream;
use tonic::{Request, Response, Status};

/// An agent answering Checkpoint with `answer`, recording the requests; it keeps the bundles of
/// [`kept`], and deletes any but `/missing`.
struct FakeAgent {
    answer: Result<CheckpointResponse, Status>,
    asked: Arc<Mutex<Vec<CheckpointRequest>>>,
}

/// The bundles every fake agent keeps.
fn kept() -> Vec<Bundle> {
    ["web-0", "web-1"]
        .iter()
        .map(|pod| Bundle {
            path: format!("/var/lib/kybernate/checkpoints/ml/{pod}/app/2026-12-01T10:00:00.000Z"),
            namespace: "ml".into(),
            pod: pod.to_string(),
            container: "app".into(),
            time: "2026-12-01T10:00:00.000Z".into(),
            ..Bundle::default()
        })
        .collect()
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn checkpoint(&self, request: Request<CheckpointRequest>) -> Result<Response<CheckpointResponse>, Status> {
        self.asked.lock().unwrap().push(request.into_inner());
        self.answer.clone().map(Response::new)
    }
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let pod = request.into_inner().pod;
        Ok(Response::new(ListResponse { bundles: kept().into_iter().filter(|b| b.pod == pod).collect() }))
    }
    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        match request.into_inner().path {
            missing if missing == "/missing" => Err(Status::not_found("no bundle /missing")),
            path => Ok(Response::new(DeleteResponse { path })),
        }
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Err(Status::unimplemented("status"))
    }
    type EventsStream = tokio_stream::Empty<Result<CheckpointEvent, Status>>;
    async fn events(&self, _: Request<EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        Err(Status::unimplemented("events"))
    }
}

/// Serves a fake agent on 127.0.0.1; the agents of every node dial it. Returns what it was asked.
async fn agent(answer: Result<CheckpointResponse, Status>) -> (GrpcAgents, Arc<Mutex<Vec<CheckpointRequest>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::default());
    let service = AgentServer::new(FakeAgent { answer, asked: Arc::clone(&asked) });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let addresses = AgentAddresses::new("unused:1").with_node("gpu-1", format!("127.0.0.1:{port}"));
    (GrpcAgents::new(addresses, Duration::from_secs(5), Duration::from_secs(5)), asked)
}

fn request() -> CheckpointRequest {
    CheckpointRequest {
        target: Some(Target::Pod(PodTarget {
            namespace: "ml".into(),
            name: "trainer-0".into(),
            container: "app".into(),
        })),
        leave_running: Some(true),
        store: "s3://checkpoints".into(),
    }
}

#[tokio::test]
async fn a_checkpoint_returns_the_bundle_and_its_reference() {
    let (agents, asked) = agent(Ok(CheckpointResponse {
        bundle: Some(Bundle {
            path: "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t".into(),
            bytes: 42,
            ..Bundle::default()
        }),
        stored_reference: "s3://checkpoints/ml/trainer-0/app/t".into(),
    }))
    .await;
    let done = agents.checkpoint("gpu-1", request()).await.unwrap();
    assert_eq!(
        done,
        CheckpointDone {
            bundle_path: "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t".into(),
            stored_reference: Some("s3://checkpoints/ml/trainer-0/app/t".into()),
            bytes: 42,
        }
    );
    assert_eq!(done.reference(), "s3://checkpoints/ml/trainer-0/app/t");
    assert_eq!(*asked.lock().unwrap(), [request()]);
}

#[tokio::test]
async fn a_bundle_not_stored_is_referenced_on_the_node() {
    let (agents, _) = agent(Ok(CheckpointResponse {
        bundle: Some(Bundle { path: "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t".into(), ..Bundle::default() }),
        stored_reference: String::new(),
    }))
    .await;
    let done = agents.checkpoint("gpu-1", request()).await.unwrap();
    assert_eq!(done.stored_reference, None);
    assert_eq!(done.reference(), "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t");
}

#[tokio::test]
async fn an_agent_error_is_not_retried() {
    let (agents, _) = agent(Err(Status::failed_precondition("container app is not running"))).await;
    let err = agents.checkpoint("gpu-1", request()).await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    assert!(matches!(&err, AgentError::Failed { code: tonic::Code::FailedPrecondition, .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the agent of node gpu-1 failed the request (FailedPrecondition): container app is not running"
    );
}

#[tokio::test]
async fn bundles_are_listed_and_deleted_through_the_agent() {
    let (agents, _) = agent(Ok(CheckpointResponse::default())).await;
    let request = ListRequest { namespace: "ml".into(), pod: "web-1".into(), container: String::new() };
    assert_eq!(agents.list("gpu-1", request).await.unwrap(), kept()[1..]);
    agents.delete("gpu-1", &kept()[1].path).await.unwrap();
    let err = agents.delete("gpu-1", "/missing").await.unwrap_err();
    assert_eq!(err.to_string(), "the agent of node gpu-1 failed the request (NotFound): no bundle /missing");
}

#[tokio::test]
async fn an_answer_without_a_bundle_is_an_error() {
    let (agents, _) = agent(Ok(CheckpointResponse::default())).await;
    let err = agents.checkpoint("gpu-1", request()).await.unwrap_err();
    assert!(matches!(err, AgentError::NoBundle { .. }), "{err:?}");
}

/// A fake agent answering with `answer`, served over mutual TLS on 127.0.0.1 with the server
/// certificate of `pki`; the address of node `gpu-1`.
async fn tls_agent(pki: &kybernate_tests::pki::Pki, answer: CheckpointResponse) -> AgentAddresses {
    let acceptor = kybernate_agent::tls::acceptor(&pki.server.0, &pki.server.1, &pki.ca).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let agent = FakeAgent { answer: Ok(answer), asked: Arc::default() };
    tokio::spawn(kybernate_agent::tls::serve(listener, acceptor, agent, std::future::pending()));
    AgentAddresses::new("unused:1").with_node("gpu-1", format!("127.0.0.1:{port}"))
}

#[tokio::test]
async fn over_mutual_tls_the_agents_ca_is_served_and_another_is_not() {
    let pki = kybernate_tests::pki::pki();
    let answer = CheckpointResponse {
        bundle: Some(Bundle { path: "/var/lib/kybernate/checkpoints/ml/trainer-0/app/t".into(), ..Bundle::default() }),
        stored_reference: "s3://checkpoints/ml/trainer-0/app/t".into(),
    };
    let addresses = tls_agent(&pki, answer).await;
    let agents = |(cert, key): &(std::path::PathBuf, std::path::PathBuf)| {
        GrpcAgents::new(addresses.clone(), Duration::from_secs(5), Duration::from_secs(5)).with_tls(AgentTls {
            ca: pki.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        })
    };
    let done = agents(&pki.client).checkpoint("gpu-1", request()).await.unwrap();
    assert_eq!(done.reference(), "s3://checkpoints/ml/trainer-0/app/t");
    // TLS 1.3: the agent refuses the certificate after the client's side of the handshake, so the
    // first call fails.
    match agents(&pki.rogue_client).checkpoint("gpu-1", request()).await {
        Err(AgentError::Failed { code: tonic::Code::Unknown, message, .. }) => {
            assert_eq!(message, "transport error")
        }
        other => panic!("a client certificate of another CA was served: {other:?}"),
    }
}

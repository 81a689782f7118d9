//! What the controller tests share: a mocked API server (`tower-test`, as kube-rs documents it) that
//! serves the requests a test expects, in order, and checks each one's method, path, query and content
//! type; the fixed clock; and JSON helpers.

// Each test crate uses the helpers it needs.
#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{TimeZone as _, Utc};
use kube::client::Body;
use kube::Client;
use serde::Serialize;
use serde_json::{json, Value};

/// The test's side of the mocked API server.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The clock of every test: the time the controller writes.
pub const NOW: &str = "2025-01-02T03:04:05Z";
/// When the objects of the tests went Running.
pub const EARLIER: &str = "2025-01-02T03:00:00Z";

/// The query of a server-side apply of a status.
pub const SSA_QUERY: &str = "&force=true&fieldManager=kybernate-operator";
/// Where the Events of namespace `ml` are created.
pub const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";

/// [`NOW`].
pub fn now() -> Time {
    Time(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).single().expect("a valid time"))
}

/// A client on a mocked API server, and the server's handle.
pub fn mock_client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// Merges `from` into `into`, object by object (any other value replaces).
pub fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(into), Value::Object(from)) => {
            for (k, v) in from {
                merge(into.entry(k).or_insert(Value::Null), v);
            }
        }
        (into, from) => *into = from,
    }
}

/// The API server's answer `code` (`reason`, `message`) as a Status.
pub fn api_error(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// A list of `kind` (`PodList`, …) of `api_version` holding `items`.
pub fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items})
}

/// The 404 of pod `name`.
pub fn pod_not_found(name: &str) -> Value {
    api_error(404, "NotFound", &format!("pods \"{name}\" not found"))
}

/// One request the API server expects, and its answer.
pub struct Expect {
    /// The request's method.
    pub method: Method,
    /// Its path.
    pub path: String,
    /// Its query (`""` when it has none), unchecked when `None`.
    pub query: Option<&'static str>,
    /// Its content type, unchecked when `None`.
    pub content_type: Option<&'static str>,
    /// The answer's status and body (`null`: the request's own body).
    pub answer: (StatusCode, Value),
}

impl Expect {
    /// A GET of `path`; answered with `status` and `answer`.
    pub fn get(path: impl Into<String>, status: StatusCode, answer: Value) -> Self {
        Expect { method: Method::GET, path: path.into(), query: None, content_type: None, answer: (status, answer) }
    }

    /// A DELETE of the object `path`; answered with a Status of success.
    pub fn delete(path: impl Into<String>) -> Self {
        let answer = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"});
        Expect {
            method: Method::DELETE,
            path: path.into(),
            query: None,
            content_type: None,
            answer: (StatusCode::OK, answer),
        }
    }

    /// A JSON merge patch of the object `path`; answered with `object`.
    pub fn merge_patch(path: impl Into<String>, object: &impl Serialize) -> Self {
        Expect {
            method: Method::PATCH,
            path: path.into(),
            query: Some(""),
            content_type: Some("application/merge-patch+json"),
            answer: (StatusCode::OK, serde_json::to_value(object).unwrap()),
        }
    }

    /// A POST creating an object in the collection `path` (field manager `kybernate-operator`);
    /// answered with `status` and `answer` (`null`: the object itself).
    pub fn create(path: impl Into<String>, status: StatusCode, answer: Value) -> Self {
        Expect {
            method: Method::POST,
            path: path.into(),
            query: Some("&fieldManager=kybernate-operator"),
            content_type: Some("application/json"),
            answer: (status, answer),
        }
    }

    /// A server-side apply of the status subresource `path`; answered with `object`.
    pub fn apply_status(path: impl Into<String>, object: &impl Serialize) -> Self {
        Expect {
            method: Method::PATCH,
            path: path.into(),
            query: Some(SSA_QUERY),
            content_type: Some("application/apply-patch+yaml"),
            answer: (StatusCode::OK, serde_json::to_value(object).unwrap()),
        }
    }

    /// A JSON patch of the object `path`; answered with `object`.
    pub fn json_patch(path: impl Into<String>, object: &impl Serialize) -> Self {
        Expect {
            method: Method::PATCH,
            path: path.into(),
            query: Some(""),
            content_type: Some("application/json-patch+json"),
            answer: (StatusCode::OK, serde_json::to_value(object).unwrap()),
        }
    }

    /// An Event created in namespace `ml`; answered with itself.
    pub fn event() -> Self {
        Expect {
            method: Method::POST,
            path: EVENTS_PATH.into(),
            query: None,
            content_type: Some("application/json"),
            answer: (StatusCode::CREATED, Value::Null),
        }
    }
}

/// Serves `expected` in order on `handle`, returning the body of each request; the reconcile must
/// make no other request (once these are served the mock is gone, so one more fails the reconcile, and
/// one that differs fails the assertions).
pub fn serve(mut handle: Handle, expected: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for expect in expected {
            let (request, send) = handle.next_request().await.expect("the controller sends a request");
            assert_eq!(request.method(), expect.method, "{}", request.uri());
            assert_eq!(request.uri().path(), expect.path);
            if let Some(query) = expect.query {
                assert_eq!(request.uri().query().unwrap_or_default(), query, "{}", request.uri());
            }
            if let Some(content_type) = expect.content_type {
                assert_eq!(request.headers()[http::header::CONTENT_TYPE], content_type, "{}", request.uri());
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
            let (status, answer) = expect.answer;
            let answer = if answer.is_null() { body.clone() } else { answer };
            let response =
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap();
            send.send_response(response);
            bodies.push(body);
        }
        bodies
    })
}

/// Waits for `server` to have served every request it expected: the bodies.
pub async fn served(server: tokio::task::JoinHandle<Vec<Value>>) -> Vec<Value> {
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("every request came").unwrap()
}

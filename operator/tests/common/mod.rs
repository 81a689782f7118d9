//! A mocked API server for the controller tests (`tower-test`, as kube-rs documents it): the requests
//! a reconcile must send, in order, each checked (method, path, query, content type) and answered,
//! and the JSON bodies it sent.

#![allow(dead_code)] // each test binary uses its own part

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{TimeZone as _, Utc};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

/// The mock's handle.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The clock of every test: the time the controllers write.
pub const NOW: &str = "2025-01-02T03:04:05Z";
/// The query of a server-side apply by the operator.
pub const SSA_QUERY: &str = "&force=true&fieldManager=kybernate-operator";

/// [`NOW`] as a time.
pub fn now() -> Time {
    Time(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).single().expect("a valid time"))
}

/// A client of a mocked API server, and the mock's handle.
pub fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// One request the API server expects, and its answer.
pub struct Expect {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<&'static str>,
    /// The answer; `Value::Null` answers with the request's own body.
    pub answer: (StatusCode, Value),
}

impl Expect {
    /// A GET (or LIST) of `path`.
    pub fn get(path: impl Into<String>, status: StatusCode, answer: Value) -> Self {
        Expect { method: Method::GET, path: path.into(), query: None, content_type: None, answer: (status, answer) }
    }

    /// A server-side apply of the status at `path`; answered with `object`.
    pub fn apply_status(path: impl Into<String>, object: Value) -> Self {
        Expect {
            method: Method::PATCH,
            path: path.into(),
            query: Some(SSA_QUERY.into()),
            content_type: Some("application/apply-patch+yaml"),
            answer: (StatusCode::OK, object),
        }
    }

    /// A patch of `content_type` at `path`; answered with `object`.
    pub fn patch(path: impl Into<String>, content_type: &'static str, object: Value) -> Self {
        Expect {
            method: Method::PATCH,
            path: path.into(),
            query: Some(String::new()),
            content_type: Some(content_type),
            answer: (StatusCode::OK, object),
        }
    }

    /// A POST to `path`, answered `status` with `answer` (`Null`: the object itself).
    pub fn post(path: impl Into<String>, status: StatusCode, answer: Value) -> Self {
        Expect {
            method: Method::POST,
            path: path.into(),
            query: None,
            content_type: Some("application/json"),
            answer: (status, answer),
        }
    }

    /// A DELETE of `path`, answered with a Status.
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

    /// An Event created in `namespace`; answered with itself.
    pub fn event(namespace: &str) -> Self {
        Expect::post(format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"), StatusCode::CREATED, Value::Null)
    }
}

/// A `Status` error answer of the API server.
pub fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
}

/// A list of `kind` (`PodList`, …) holding `items`.
pub fn list(api_version: &str, kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": "100"}, "items": items})
}

/// Serves `expected` in order on `handle`, returning the body of each request; the reconcile must
/// make no other request (it would hang, and the test time out).
pub fn serve(mut handle: Handle, expected: Vec<Expect>) -> tokio::task::JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut bodies = Vec::new();
        for expect in expected {
            let (request, send) = handle.next_request().await.expect("the controller sends a request");
            assert_eq!(request.method(), expect.method, "{}", request.uri());
            assert_eq!(request.uri().path(), expect.path);
            if let Some(query) = &expect.query {
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

/// Merges the object `from` into `into`, key by key.
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

/// Asserts an Event body: its type, reason, note, action, and that it regards `kind` `namespace/name`
/// (uid `uid`) of `kybernate.io/v1alpha1`.
pub fn assert_event(
    event: &Value,
    type_: &str,
    reason: &str,
    note: &str,
    action: &str,
    regarding: (&str, &str, &str, &str),
) {
    let (kind, namespace, name, uid) = regarding;
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["note"], note, "{event}");
    assert_eq!(event["action"], action, "{event}");
    assert_eq!(event["reportingController"], "kybernate-operator", "{event}");
    assert_eq!(event["regarding"]["kind"], kind, "{event}");
    assert_eq!(event["regarding"]["apiVersion"], "kybernate.io/v1alpha1", "{event}");
    assert_eq!(event["regarding"]["namespace"], namespace, "{event}");
    assert_eq!(event["regarding"]["name"], name, "{event}");
    assert_eq!(event["regarding"]["uid"], uid, "{event}");
}

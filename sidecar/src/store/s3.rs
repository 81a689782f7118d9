//! The S3 store (AWS S3 or any S3-compatible server: MinIO, Ceph RGW, s3s-fs, …).
//!
//! Uploads are always multipart: the archive stream is cut into `part_size` parts, each hashed
//! (sha256, also sent as the part's S3 checksum so the server verifies it) and uploaded by up to
//! `concurrency` parallel tasks, each retried with jittered backoff. After every finished part the
//! upload id and the finished parts (number, ETag, sha256, size) are written atomically to a resume
//! file; a later attempt with the same bundle asks the server which parts it holds (ListParts),
//! re-creates the archive stream (it is deterministic), skips parts whose sha256 matches and
//! uploads the rest. Credentials come from the standard AWS chain and are never logged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{retry::RetryConfig, BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use super::{
    now_rfc3339, validate_key, Committed, ObjectInfo, ObjectMeta, ObjectReader, PutRequest, Store, LABEL_FINGERPRINT,
    META_FORMAT, META_SUFFIX,
};
use crate::archive::{ArchiveStream, Compression};
use crate::error::{join_error, Error, Result};
use crate::fsutil::{remove_if_exists, write_atomic};
use crate::retry::RetryPolicy;

/// Smallest part S3 accepts (except for the last part).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest part S3 accepts.
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// Most parts one multipart upload may have.
pub const MAX_PARTS: i32 = 10_000;

/// Explicit credentials that bypass the AWS credential chain (e.g. read from a Kubernetes
/// secret by the caller). Its `Debug` output never shows the secret.
#[derive(Clone)]
pub struct StaticCredentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl fmt::Debug for StaticCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// How to reach and use an S3 endpoint.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Custom endpoint (S3-compatible servers), e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region; `None` uses the AWS chain (AWS_REGION, profile) and falls back to `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint` (needed by most
    /// S3-compatible servers).
    pub force_path_style: bool,
    /// Multipart part size in bytes ([`MIN_PART_SIZE`]..=[`MAX_PART_SIZE`]); also the size of
    /// ranged GETs when fetching.
    pub part_size: u64,
    /// Parts uploaded (or ranges downloaded) in parallel.
    pub concurrency: usize,
    /// Retry policy for every request.
    pub retry: RetryPolicy,
    /// Time limit of one request attempt.
    pub attempt_timeout: Duration,
    /// Explicit credentials; `None` uses the standard AWS credential chain.
    pub credentials: Option<StaticCredentials>,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: None,
            force_path_style: false,
            part_size: 16 << 20,
            concurrency: 4,
            retry: RetryPolicy::default(),
            attempt_timeout: Duration::from_secs(300),
            credentials: None,
        }
    }
}

impl S3Options {
    /// Checks the sizes and counts against S3's limits.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&self.part_size) {
            return Err(Error::Config {
                key: "s3.part_size_mib".into(),
                reason: format!("{} bytes is outside S3's part size range of 5 MiB to 5 GiB", self.part_size),
            });
        }
        if self.concurrency == 0 {
            return Err(Error::Config { key: "s3.concurrency".into(), reason: "must be at least 1".into() });
        }
        Ok(())
    }
}

/// A bucket (and key prefix) on an S3 endpoint.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    bucket: String,
    prefix: String,
    opts: S3Options,
}

/// Progress of a multipart upload, persisted after every finished part.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ResumeState {
    bucket: String,
    key: String,
    upload_id: String,
    part_size: u64,
    compression: Compression,
    fingerprint: Option<String>,
    parts: BTreeMap<i32, PartRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PartRecord {
    etag: String,
    sha256: String,
    size: u64,
}

/// HTTP status and S3 error code of a failed request, for classification.
fn status_and_code<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> (Option<u16>, Option<String>)
where
    R: HttpStatus,
{
    (err.raw_response().map(HttpStatus::status_code), err.code().map(str::to_string))
}

/// Access to the status code of a raw response.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl Inner {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn full_key(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// Turns an SDK error into an [`Error`] that names the request and says whether to retry.
    fn error<E>(
        &self,
        operation: &'static str,
        key: &str,
        attempts: u32,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (status, code) = status_and_code(&err);
        let credential_codes =
            ["InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken"];
        if code.as_deref().is_some_and(|c| credential_codes.contains(&c)) || matches!(status, Some(401 | 403)) {
            return Error::Credentials {
                location: self.location(),
                detail: code.unwrap_or_else(|| format!("HTTP {}", status.unwrap_or(403))),
            };
        }
        if matches!(code.as_deref(), Some("NoSuchKey" | "NotFound")) || (status == Some(404) && code.is_none()) {
            return Error::NotFound { location: self.location(), key: key.to_string() };
        }
        let transient = match &err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
            SdkError::DispatchFailure(d) => d.is_io() || d.is_timeout(),
            SdkError::ServiceError(_) => {
                status.is_some_and(|s| s >= 500 || s == 429)
                    || matches!(
                        code.as_deref(),
                        Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                    )
            }
            _ => false,
        };
        let message = DisplayErrorContext(&err).to_string();
        if !transient && message.to_ascii_lowercase().contains("credentials") {
            return Error::Credentials {
                location: self.location(),
                detail: "no usable credentials were found in the AWS credential chain".into(),
            };
        }
        Error::S3 { operation, bucket: self.bucket.clone(), key: key.to_string(), attempts, message, transient }
    }
}

impl S3Store {
    /// Builds a client for `bucket` (keys are stored under `prefix/`).
    pub async fn connect(bucket: String, prefix: String, opts: S3Options) -> Result<Self> {
        opts.validate()?;
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled()).timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            );
        if let Some(region) = &opts.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(c) = &opts.credentials {
            loader = loader.credentials_provider(Credentials::new(
                c.access_key_id.clone(),
                c.secret_access_key.clone(),
                None,
                None,
                "kybernate-sidecar",
            ));
        }
        let sdk = loader.load().await;
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(opts.force_path_style);
        if sdk.region().is_none() {
            conf = conf.region(Region::from_static("us-east-1"));
        }
        if let Some(endpoint) = &opts.endpoint {
            conf = conf.endpoint_url(endpoint.clone());
        }
        let client = Client::from_conf(conf.build());
        Ok(S3Store { inner: Arc::new(Inner { client, bucket, prefix: prefix.trim_matches('/').to_string(), opts }) })
    }

    async fn create_upload(&self, key: &str, req: &PutRequest) -> Result<String> {
        let inner = &self.inner;
        inner
            .opts
            .retry
            .run("CreateMultipartUpload", |attempt| async move {
                let mut rq = inner
                    .client
                    .create_multipart_upload()
                    .bucket(&inner.bucket)
                    .key(key)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .content_type(match (&req.encryption, req.compression) {
                        (Some(_), _) => "application/octet-stream",
                        (None, Compression::None) => "application/x-tar",
                        (None, Compression::Zstd) => "application/zstd",
                    })
                    .metadata(
                        "kybernate-compression",
                        serde_json::to_value(req.compression)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default(),
                    )
                    .metadata("kybernate-part-size", inner.opts.part_size.to_string());
                if let Some(e) = &req.encryption {
                    rq = rq.metadata("kybernate-encryption-key-id", e.key_id.to_string());
                }
                for (k, v) in &req.labels {
                    if v.is_ascii() && !v.chars().any(|c| c.is_ascii_control()) {
                        rq = rq.metadata(format!("kybernate-{k}"), v);
                    }
                }
                let out = rq.send().await.map_err(|e| inner.error("CreateMultipartUpload", key, attempt, e))?;
                out.upload_id().map(str::to_string).ok_or_else(|| Error::S3 {
                    operation: "CreateMultipartUpload",
                    bucket: inner.bucket.clone(),
                    key: key.to_string(),
                    attempts: attempt,
                    message: "the response has no upload id".into(),
                    transient: false,
                })
            })
            .await
    }

    /// Parts the server holds for an upload: number → (size, ETag if reported).
    /// `Ok(None)` when the upload no longer exists.
    async fn list_parts(&self, key: &str, upload_id: &str) -> Result<Option<HashMap<i32, (u64, Option<String>)>>> {
        let inner = &self.inner;
        let mut parts = HashMap::new();
        let mut marker: Option<String> = None;
        loop {
            let marker_ref = marker.as_deref();
            let page = inner
                .opts
                .retry
                .run("ListParts", |attempt| async move {
                    let mut rq = inner.client.list_parts().bucket(&inner.bucket).key(key).upload_id(upload_id);
                    if let Some(m) = marker_ref {
                        rq = rq.part_number_marker(m);
                    }
                    match rq.send().await {
                        Ok(out) => Ok(Some(out)),
                        Err(e) if e.code() == Some("NoSuchUpload") => Ok(None),
                        Err(e) => Err(inner.error("ListParts", key, attempt, e)),
                    }
                })
                .await?;
            let Some(page) = page else {
                return Ok(None);
            };
            for p in page.parts() {
                if let (Some(n), Some(size)) = (p.part_number(), p.size()) {
                    parts.insert(n, (size.max(0) as u64, p.e_tag().map(str::to_string)));
                }
            }
            match (page.is_truncated(), page.next_part_number_marker()) {
                (Some(true), Some(next)) => marker = Some(next.to_string()),
                _ => return Ok(Some(parts)),
            }
        }
    }

    /// Loads and checks a resume file. Returns the state to continue from, or `None` to start a
    /// new upload (no file, a different bundle/settings, or the upload is gone).
    async fn load_resume(&self, path: &Path, key: &str, req: &PutRequest) -> Result<Option<ResumeState>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read resume file", path, e)),
        };
        let Ok(mut state) = serde_json::from_slice::<ResumeState>(&bytes) else {
            tracing::warn!(path = %path.display(), "unreadable resume file; starting the upload anew");
            remove_if_exists(path)?;
            return Ok(None);
        };
        let fingerprint = req.labels.get(LABEL_FINGERPRINT).cloned();
        if state.bucket != self.inner.bucket
            || state.key != key
            || state.part_size != self.inner.opts.part_size
            || state.compression != req.compression
            || state.fingerprint != fingerprint
        {
            tracing::warn!(
                path = %path.display(),
                "resume file is for another upload (key, part size, compression or bundle changed); \
                 starting anew"
            );
            self.abort(&state.key, &state.upload_id).await;
            remove_if_exists(path)?;
            return Ok(None);
        }
        let Some(server) = self.list_parts(key, &state.upload_id).await? else {
            tracing::warn!(key, "multipart upload no longer exists on the server; starting anew");
            remove_if_exists(path)?;
            return Ok(None);
        };
        state.parts.retain(|n, rec| {
            server.get(n).is_some_and(|(size, etag)| {
                *size == rec.size && etag.as_deref().is_none_or(|e| e.trim_matches('"') == rec.etag.trim_matches('"'))
            })
        });
        tracing::info!(
            key,
            upload_id = %state.upload_id,
            parts_on_server = state.parts.len(),
            "resuming multipart upload"
        );
        Ok(Some(state))
    }

    /// Best effort: tells the server to drop an upload's parts.
    async fn abort(&self, key: &str, upload_id: &str) {
        let r = self
            .inner
            .client
            .abort_multipart_upload()
            .bucket(&self.inner.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = r {
            tracing::debug!(key, error = %DisplayErrorContext(&e), "abort of a stale multipart upload failed");
        }
    }

    async fn complete(&self, key: &str, state: &ResumeState, count: i32, size: u64) -> Result<()> {
        let inner = &self.inner;
        let mut parts = Vec::with_capacity(count as usize);
        for n in 1..=count {
            let rec = state.parts.get(&n).ok_or_else(|| Error::Task {
                task: "multipart upload",
                message: format!("part {n} of {key} was neither uploaded nor found on the server"),
            })?;
            parts.push(
                CompletedPart::builder()
                    .part_number(n)
                    .e_tag(&rec.etag)
                    .checksum_sha256(hex_to_b64(&rec.sha256))
                    .build(),
            );
        }
        let upload = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let upload = &upload;
        inner
            .opts
            .retry
            .run("CompleteMultipartUpload", |attempt| async move {
                match inner
                    .client
                    .complete_multipart_upload()
                    .bucket(&inner.bucket)
                    .key(key)
                    .upload_id(&state.upload_id)
                    .multipart_upload(upload.clone())
                    .send()
                    .await
                {
                    Ok(_) => Ok(()),
                    // An earlier attempt may have succeeded with its response lost.
                    Err(e) if attempt > 1 && e.code() == Some("NoSuchUpload") => match self.object_size(key).await? {
                        Some(s) if s == size => Ok(()),
                        _ => Err(inner.error("CompleteMultipartUpload", key, attempt, e)),
                    },
                    Err(e) => Err(inner.error("CompleteMultipartUpload", key, attempt, e)),
                }
            })
            .await
    }

    /// Size of the object under the full `key`, `None` if absent.
    async fn object_size(&self, key: &str) -> Result<Option<u64>> {
        let inner = &self.inner;
        inner
            .opts
            .retry
            .run("HeadObject", |attempt| async move {
                match inner.client.head_object().bucket(&inner.bucket).key(key).send().await {
                    Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
                    Err(e) => match inner.error("HeadObject", key, attempt, e) {
                        Error::NotFound { .. } => Ok(None),
                        other => Err(other),
                    },
                }
            })
            .await
    }

    async fn put_small(&self, key: &str, body: Vec<u8>) -> Result<()> {
        let inner = &self.inner;
        let body = Bytes::from(body);
        let sha = hex::encode(Sha256::digest(&body));
        let (body, sha) = (&body, &sha);
        inner
            .opts
            .retry
            .run("PutObject", |attempt| async move {
                inner
                    .client
                    .put_object()
                    .bucket(&inner.bucket)
                    .key(key)
                    .content_type("application/json")
                    .checksum_sha256(hex_to_b64(sha))
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| inner.error("PutObject", key, attempt, e))
            })
            .await
    }

    async fn get_small(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let inner = &self.inner;
        inner
            .opts
            .retry
            .run("GetObject", |attempt| async move {
                let out = match inner.client.get_object().bucket(&inner.bucket).key(key).send().await {
                    Ok(out) => out,
                    Err(e) => {
                        return match inner.error("GetObject", key, attempt, e) {
                            Error::NotFound { .. } => Ok(None),
                            other => Err(other),
                        }
                    }
                };
                let data = out.body.collect().await.map_err(|e| Error::S3 {
                    operation: "GetObject",
                    bucket: inner.bucket.clone(),
                    key: key.to_string(),
                    attempts: attempt,
                    message: e.to_string(),
                    transient: true,
                })?;
                Ok(Some(data.into_bytes().to_vec()))
            })
            .await
    }

    async fn delete_one(&self, key: &str) -> Result<()> {
        let inner = &self.inner;
        inner
            .opts
            .retry
            .run("DeleteObject", |attempt| async move {
                inner
                    .client
                    .delete_object()
                    .bucket(&inner.bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| inner.error("DeleteObject", key, attempt, e))
            })
            .await
    }
}

fn hex_to_b64(hex_digest: &str) -> String {
    let raw = hex::decode(hex_digest).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Uploads one part with retries; returns its record.
async fn upload_part(
    inner: Arc<Inner>,
    key: String,
    upload_id: String,
    number: i32,
    data: Bytes,
    sha256: String,
) -> Result<(i32, PartRecord)> {
    let size = data.len() as u64;
    let checksum = hex_to_b64(&sha256);
    let (inner_ref, key_ref, data_ref) = (&inner, &key, &data);
    let (upload_id, checksum) = (&upload_id, &checksum);
    let etag = inner
        .opts
        .retry
        .run("UploadPart", |attempt| async move {
            let out = inner_ref
                .client
                .upload_part()
                .bucket(&inner_ref.bucket)
                .key(key_ref)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(checksum)
                .content_length(size as i64)
                .body(ByteStream::from(data_ref.clone()))
                .send()
                .await
                .map_err(|e| inner_ref.error("UploadPart", key_ref, attempt, e))?;
            Ok(out.e_tag().unwrap_or_default().to_string())
        })
        .await?;
    tracing::debug!(key, part = number, size, "part uploaded");
    Ok((number, PartRecord { etag, sha256, size }))
}

/// Part uploads in flight and the resume file they update.
struct InFlight<'a> {
    tasks: JoinSet<Result<(i32, PartRecord)>>,
    state: &'a mut ResumeState,
    resume_file: Option<&'a Path>,
}

impl InFlight<'_> {
    /// Records a finished part upload in the resume state and file.
    fn record(&mut self, joined: std::result::Result<Result<(i32, PartRecord)>, tokio::task::JoinError>) -> Result<()> {
        let (n, rec) = joined.map_err(|e| join_error("part upload", e))??;
        self.state.parts.insert(n, rec);
        save_resume(self.resume_file, self.state)
    }

    /// Fills `buf` from `body` until it holds at least `want` bytes, recording part uploads as
    /// they finish (so the resume file is current even while the archive writer is slow).
    /// Returns whether the stream ended.
    async fn fill(&mut self, body: &mut ArchiveStream, buf: &mut BytesMut, want: usize) -> Result<bool> {
        while buf.len() < want {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next(), if !self.tasks.is_empty() => self.record(joined)?,
                chunk = body.next() => match chunk? {
                    Some(chunk) => buf.extend_from_slice(&chunk),
                    None => return Ok(true),
                },
            }
        }
        Ok(false)
    }

    /// Waits until fewer than `limit` uploads are running.
    async fn make_room(&mut self, limit: usize) -> Result<()> {
        while self.tasks.len() >= limit {
            let joined = self.tasks.join_next().await.expect("tasks is not empty");
            self.record(joined)?;
        }
        Ok(())
    }

    /// Waits for every running upload.
    async fn drain(&mut self) -> Result<()> {
        while let Some(joined) = self.tasks.join_next().await {
            self.record(joined)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        self.inner.location()
    }

    async fn put(&self, req: &PutRequest, mut body: ArchiveStream) -> Result<Committed> {
        validate_key(&req.key)?;
        let inner = &self.inner;
        let key = inner.full_key(&req.key);
        let part_size = inner.opts.part_size as usize;
        let resumed = match &req.resume_file {
            Some(path) => self.load_resume(path, &key, req).await?,
            None => None,
        };
        let mut state = match resumed {
            Some(state) => state,
            None => {
                let upload_id = self.create_upload(&key, req).await?;
                let state = ResumeState {
                    bucket: inner.bucket.clone(),
                    key: key.clone(),
                    upload_id,
                    part_size: inner.opts.part_size,
                    compression: req.compression,
                    fingerprint: req.labels.get(LABEL_FINGERPRINT).cloned(),
                    parts: BTreeMap::new(),
                };
                save_resume(req.resume_file.as_deref(), &state)?;
                state
            }
        };

        let upload_id = state.upload_id.clone();
        let mut inflight =
            InFlight { tasks: JoinSet::new(), state: &mut state, resume_file: req.resume_file.as_deref() };
        let mut part_sha256 = Vec::new();
        let mut buf = BytesMut::with_capacity(part_size);
        let mut count: i32 = 0;
        let mut skipped = 0u32;
        let mut reused_bytes = 0u64;
        loop {
            let eof = inflight.fill(&mut body, &mut buf, part_size).await?;
            while buf.len() >= part_size || (eof && !buf.is_empty()) {
                let data = buf.split_to(buf.len().min(part_size)).freeze();
                count += 1;
                if count > MAX_PARTS {
                    return Err(Error::Config {
                        key: "s3.part_size_mib".into(),
                        reason: format!(
                            "the archive needs more than {MAX_PARTS} parts of {part_size} bytes; \
                             raise the part size"
                        ),
                    });
                }
                let sha = hex::encode(Sha256::digest(&data));
                part_sha256.push(sha.clone());
                let done =
                    inflight.state.parts.get(&count).is_some_and(|r| r.sha256 == sha && r.size == data.len() as u64);
                if done {
                    skipped += 1;
                    reused_bytes += data.len() as u64;
                    continue;
                }
                inflight.make_room(inner.opts.concurrency).await?;
                inflight.tasks.spawn(upload_part(inner.clone(), key.clone(), upload_id.clone(), count, data, sha));
                buf.reserve(part_size);
            }
            if eof {
                break;
            }
        }
        inflight.drain().await?;
        let (size, sha256) = body.digest();
        let meta_key = format!("{key}{META_SUFFIX}");
        // Uncommit any previous version first, so a record never describes other bytes.
        self.delete_one(&meta_key).await?;
        self.complete(&key, &state, count, size).await?;

        let meta = ObjectMeta {
            format: META_FORMAT,
            size,
            sha256,
            compression: req.compression,
            encryption: req.encryption.clone(),
            part_size: Some(inner.opts.part_size),
            part_sha256,
            stored_at: now_rfc3339(),
            labels: req.labels.clone(),
        };
        self.put_small(&meta_key, meta.to_json()).await?;
        if let Some(path) = &req.resume_file {
            remove_if_exists(path)?;
        }
        tracing::info!(
            location = %inner.location(), key = %req.key, size, parts = count,
            parts_skipped = skipped, "multipart upload committed"
        );
        Ok(Committed { object: ObjectInfo { key: req.key.clone(), meta }, reused_bytes })
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ObjectReader> {
        validate_key(key)?;
        let inner = &self.inner;
        let full = inner.full_key(key);
        let (full_ref, range_ref) = (&full, &range);
        let out = inner
            .opts
            .retry
            .run("GetObject", |attempt| async move {
                let mut rq = inner.client.get_object().bucket(&inner.bucket).key(full_ref);
                if let Some(r) = range_ref {
                    rq = rq.range(format!("bytes={}-{}", r.start, r.end.saturating_sub(1)));
                }
                rq.send().await.map_err(|e| inner.error("GetObject", full_ref, attempt, e))
            })
            .await?;
        Ok(Box::new(out.body.into_async_read()))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        validate_key(key)?;
        let full = self.inner.full_key(key);
        let Some(bytes) = self.get_small(&format!("{full}{META_SUFFIX}")).await? else {
            return Ok(None);
        };
        if self.object_size(&full).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(ObjectInfo { key: key.to_string(), meta: ObjectMeta::from_json(key, &bytes)? }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let inner = &self.inner;
        let full_prefix =
            if inner.prefix.is_empty() { prefix.to_string() } else { format!("{}/{prefix}", inner.prefix) };
        let mut keys: HashSet<String> = HashSet::new();
        let mut token: Option<String> = None;
        loop {
            let (p, t) = (&full_prefix, token.as_deref());
            let page = inner
                .opts
                .retry
                .run("ListObjectsV2", |attempt| async move {
                    let mut rq = inner.client.list_objects_v2().bucket(&inner.bucket).prefix(p);
                    if let Some(t) = t {
                        rq = rq.continuation_token(t);
                    }
                    rq.send().await.map_err(|e| inner.error("ListObjectsV2", p, attempt, e))
                })
                .await?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    keys.insert(k.to_string());
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        let strip = |k: &str| -> Option<String> {
            if inner.prefix.is_empty() {
                Some(k.to_string())
            } else {
                k.strip_prefix(&format!("{}/", inner.prefix)).map(str::to_string)
            }
        };
        let mut out = Vec::new();
        let mut meta_keys: Vec<&String> = keys.iter().filter(|k| k.ends_with(META_SUFFIX)).collect();
        meta_keys.sort();
        for meta_key in meta_keys {
            let data_key = &meta_key[..meta_key.len() - META_SUFFIX.len()];
            if !keys.contains(data_key) {
                continue;
            }
            let Some(rel) = strip(data_key) else { continue };
            let Some(bytes) = self.get_small(meta_key).await? else {
                continue;
            };
            out.push(ObjectInfo { meta: ObjectMeta::from_json(&rel, &bytes)?, key: rel });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        let full = self.inner.full_key(key);
        let meta_key = format!("{full}{META_SUFFIX}");
        let data = self.object_size(&full).await?;
        let meta = self.object_size(&meta_key).await?;
        if data.is_none() && meta.is_none() {
            return Err(Error::NotFound { location: self.location(), key: key.to_string() });
        }
        self.delete_one(&meta_key).await?;
        self.delete_one(&full).await
    }
}

fn save_resume(path: Option<&Path>, state: &ResumeState) -> Result<()> {
    match path {
        Some(p) => write_atomic(p, &serde_json::to_vec_pretty(state).expect("ResumeState always serialises")),
        None => Ok(()),
    }
}

//! The sidecar's error type. Every variant names the object that failed and says what to do.

use std::path::PathBuf;

use crate::key_id::KeyId;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while shipping, fetching or managing bundles.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A filesystem operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "read bundle file".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The bundle has no `COMPLETE` marker, so it must not be shipped or restored.
    #[error(
        "bundle {} has no COMPLETE marker: it is still being written or its checkpoint failed; \
         it is not shipped or restored until COMPLETE exists",
        bundle.display()
    )]
    NotComplete {
        /// The bundle directory.
        bundle: PathBuf,
    },

    /// The bundle contains something that cannot be archived (device node, fifo, socket).
    #[error(
        "bundle file {} is a {kind}, which a bundle must not contain; remove it or re-create the checkpoint",
        path.display()
    )]
    UnsupportedFile {
        /// The offending file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },

    /// An object key is malformed (empty, absolute, `..` components, …).
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A bundle reference (`restore-from` value, CLI argument) could not be understood or names
    /// nothing to fetch.
    #[error(
        "invalid bundle reference `{reference}`: {reason} \
         (use an absolute path to a bundle directory or an archive, file:///path or s3://bucket/key)"
    )]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A pod checkpoint holds no bundle of the container asked for.
    #[error("pod checkpoint `{reference}` does not cover container `{container}`: {detail}")]
    NotCovered {
        /// The pod-level reference.
        reference: String,
        /// The container name.
        container: String,
        /// Which pod checkpoint was taken and what it holds.
        detail: String,
    },

    /// The configuration is invalid.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The setting (TOML key or flag).
        key: String,
        /// Why it was rejected and what to use instead.
        reason: String,
    },

    /// The store rejected the credentials.
    #[error(
        "{location} rejected the credentials ({detail}); set AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to valid credentials; the local bundle was kept"
    )]
    Credentials {
        /// The store (no secrets), e.g. `s3://bucket/prefix`.
        location: String,
        /// The error code the store gave.
        detail: String,
    },

    /// A request to S3 failed.
    #[error("S3 {operation} for s3://{bucket}/{key} failed after {attempts} attempt(s): {message}")]
    S3 {
        /// The S3 operation, e.g. `UploadPart`.
        operation: &'static str,
        /// The bucket.
        bucket: String,
        /// The object key.
        key: String,
        /// How many attempts were made.
        attempts: u32,
        /// The full error chain (never contains credentials).
        message: String,
        /// Whether retrying later may succeed (network error, 5xx, throttling).
        transient: bool,
    },

    /// Reading an object's bytes from the store failed part-way (short read, connection reset).
    #[error("download of `{key}` from {location} was interrupted: {source}")]
    Transfer {
        /// The store location.
        location: String,
        /// The object key.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The object does not exist in the store.
    #[error("object `{key}` not found in {location}; list the store with `kybernate-sidecar ls`")]
    NotFound {
        /// The store location.
        location: String,
        /// The key that was looked up.
        key: String,
    },

    /// The object's metadata record is missing or malformed.
    #[error("metadata of object `{key}` is unusable: {reason}; push the bundle again")]
    Metadata {
        /// The object key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Downloaded data does not match the size or sha256 recorded at upload.
    #[error(
        "object `{key}` is corrupt: {what} is {actual}, expected {expected}; \
         delete it (kybernate-sidecar rm) and push the bundle again"
    )]
    Integrity {
        /// The object key.
        key: String,
        /// What was compared ("size", "sha256").
        what: &'static str,
        /// The recorded value.
        expected: String,
        /// The value found.
        actual: String,
    },

    /// An archive entry is unsafe to extract; nothing was written outside the destination.
    #[error(
        "archive rejected at entry `{entry}`: {reason}; nothing was published to {}",
        dest.display()
    )]
    UnsafeArchive {
        /// The entry's path as written in the archive.
        entry: String,
        /// Why it is unsafe.
        reason: String,
        /// The destination that was not created.
        dest: PathBuf,
    },

    /// The archive is larger than the configured extraction limits.
    #[error(
        "archive exceeds the {what} limit of {limit} while extracting into {}; \
         raise [limits] in sidecar.toml if the bundle is genuine",
        dest.display()
    )]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// The limit's value.
        limit: u64,
        /// The destination that was not created.
        dest: PathBuf,
    },

    /// The extracted bundle's own manifest does not verify (a file missing, altered or added).
    #[error(
        "the bundle extracted from `{key}` does not verify: {source}; nothing was published to {}. \
         Delete the object (kybernate-sidecar rm) and push the bundle again",
        dest.display()
    )]
    BundleInvalid {
        /// The object key.
        key: String,
        /// The destination that was not created.
        dest: PathBuf,
        /// What checkpoint-core's verification found.
        #[source]
        source: Box<checkpoint_core::Error>,
    },

    /// The extracted archive holds no Kybernate bundle (another runtime wrote it) and the caller
    /// asked for the manifest check, which needs one.
    #[error(
        "the archive `{key}` holds no Kybernate manifest: another runtime wrote it (Podman, CRI-O, a CRI around \
         another shim); nothing was published to {}. Restore it through the shim, whose trust rules decide \
         (allow_unsigned), or fetch it unverified with --skip-manifest-check",
        dest.display()
    )]
    Foreign {
        /// The object key.
        key: String,
        /// The destination that was not created.
        dest: PathBuf,
    },

    /// The destination of a fetch already exists.
    #[error("destination {} already exists; remove it or pick another destination", path.display())]
    DestinationExists {
        /// The existing path.
        path: PathBuf,
    },

    /// The archive stream could not be produced (tar/zstd writer failed).
    #[error("cannot archive bundle {}: {source}", bundle.display())]
    Archive {
        /// The bundle directory.
        bundle: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The archive could not be read (truncated, not a tar, bad zstd frame).
    #[error("cannot read archive `{key}`: {source}; the object is damaged, push the bundle again")]
    Unpack {
        /// The object key.
        key: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An encryption key cannot be used (a file others may read, not 32 bytes in hex or base64, a
    /// key file that keygen would replace). Never contains any of the key.
    #[error("encryption key {origin} is unusable: {reason}")]
    EncryptionKey {
        /// Where the key came from: `file <path>` or `in environment variable <name>`.
        origin: String,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The object is encrypted, and no key is configured to decrypt it.
    #[error(
        "object `{key}` is encrypted (key id {key_id}), but no decryption key is configured: set \
         encryption_key_file or decryption_key_files in sidecar.toml (or --encryption-key-file, \
         KYBERNATE_ENCRYPTION_KEY_FILE or KYBERNATE_ENCRYPTION_KEY) to the key it was pushed with; \
         nothing was written"
    )]
    NoDecryptionKey {
        /// The object key.
        key: String,
        /// The id of the key it was encrypted with.
        key_id: KeyId,
    },

    /// The object is encrypted with a key that is not configured.
    #[error(
        "object `{key}` is encrypted with key id {expected}, which is none of the configured keys ({}): \
         add the key it was pushed with to decryption_key_files; nothing was written",
        available.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    WrongKey {
        /// The object key.
        key: String,
        /// The id of the key it was encrypted with.
        expected: KeyId,
        /// The ids of the configured keys.
        available: Vec<KeyId>,
    },

    /// An encrypted object does not decrypt: it was altered, truncated or reordered (or its
    /// header does not match its record).
    #[error(
        "object `{key}` does not decrypt: {reason}; nothing was published to {}. \
         Delete it (kybernate-sidecar rm) and push the bundle again",
        dest.display()
    )]
    Decrypt {
        /// The object key.
        key: String,
        /// What failed.
        reason: String,
        /// The destination that was not created.
        dest: PathBuf,
    },

    /// The object is not encrypted, and `require_encryption` is set.
    #[error(
        "object `{key}` is not encrypted, and require_encryption is set: refused; push the bundle \
         again with an encryption key configured, or set require_encryption = false"
    )]
    NotEncrypted {
        /// The object key.
        key: String,
    },

    /// The operating system's random source failed.
    #[error("cannot draw random bytes from the operating system: {source}")]
    Random {
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The filesystem watcher could not be set up.
    #[error(
        "cannot watch {} for new bundles: {source}; check that the directory exists and that \
         fs.inotify.max_user_watches is large enough",
        path.display()
    )]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: notify::Error,
    },

    /// A background task panicked or was cancelled.
    #[error("internal task `{task}` stopped unexpectedly: {message}")]
    Task {
        /// Which task.
        task: &'static str,
        /// What happened.
        message: String,
    },
}

impl Error {
    /// Shorthand for [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::S3 { transient, .. } => *transient,
            Error::Transfer { .. } => true,
            Error::Io { source, .. } | Error::Archive { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

pub(crate) fn join_error(task: &'static str, e: tokio::task::JoinError) -> Error {
    Error::Task { task, message: e.to_string() }
}

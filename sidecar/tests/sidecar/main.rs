//! Integration tests of kybernate-sidecar (one binary, so the S3 SDK is linked once).
//! The S3 tests need `s3s-fs` (sidecar/scripts/install-s3s-fs.sh); they fail without it.

mod cli;
mod common;
mod daemon;
mod encryption;
mod hostile;
mod roundtrip;
mod s3;

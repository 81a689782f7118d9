//! Retention: per container (the key prefix `<namespace>/<pod>/<container>`), keep the newest
//! `keep_last` archives; of the others, delete those older than `max_age` (all of them when no
//! `max_age` is given).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::store::{ObjectInfo, Store, LABEL_CHECKPOINT_TIME};

/// What to keep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcPolicy {
    /// Always keep this many newest archives per container.
    pub keep_last: Option<usize>,
    /// Delete (unprotected) archives older than this.
    pub max_age: Option<Duration>,
}

/// The decision for every archive considered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Archives kept.
    pub keep: Vec<ObjectInfo>,
    /// Archives to delete.
    pub delete: Vec<ObjectInfo>,
}

/// When the checkpoint of `info` was taken: its `checkpoint-time` label, else when it was stored.
pub fn object_time(info: &ObjectInfo) -> SystemTime {
    info.meta
        .labels
        .get(LABEL_CHECKPOINT_TIME)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
        .or_else(|| humantime::parse_rfc3339_weak(&info.meta.stored_at).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The retention group of a key: everything before its last `/`.
fn group(key: &str) -> &str {
    key.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// Decides what to delete among `objects` at time `now`.
pub fn plan(objects: Vec<ObjectInfo>, policy: &GcPolicy, now: SystemTime) -> Result<GcPlan> {
    if policy.keep_last.is_none() && policy.max_age.is_none() {
        return Err(Error::Config {
            key: "gc".into(),
            reason: "nothing to decide: pass --keep-last N and/or --max-age DURATION".into(),
        });
    }
    let mut groups: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    for o in objects {
        groups.entry(group(&o.key).to_string()).or_default().push(o);
    }
    let mut out = GcPlan::default();
    for (_, mut members) in groups {
        members.sort_by(|a, b| object_time(b).cmp(&object_time(a)).then_with(|| b.key.cmp(&a.key)));
        for (i, o) in members.into_iter().enumerate() {
            let protected = policy.keep_last.is_some_and(|n| i < n);
            let old =
                policy.max_age.is_none_or(|age| now.duration_since(object_time(&o)).is_ok_and(|elapsed| elapsed > age));
            if !protected && old {
                out.delete.push(o);
            } else {
                out.keep.push(o);
            }
        }
    }
    Ok(out)
}

/// Applies `policy` to the archives under `prefix` (deletes unless `dry_run`) and returns the plan.
pub async fn gc(store: &dyn Store, prefix: &str, policy: &GcPolicy, dry_run: bool) -> Result<GcPlan> {
    let objects = store.list(prefix).await?;
    let plan = plan(objects, policy, SystemTime::now())?;
    if !dry_run {
        for o in &plan.delete {
            store.delete(&o.key).await?;
            tracing::info!(key = %o.key, location = %store.location(), "deleted by retention");
        }
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Compression;
    use crate::store::{ObjectMeta, META_FORMAT};

    fn obj(key: &str, time: &str) -> ObjectInfo {
        ObjectInfo {
            key: key.into(),
            meta: ObjectMeta {
                format: META_FORMAT,
                size: 1,
                sha256: String::new(),
                compression: Compression::None,
                encryption: None,
                part_size: None,
                part_sha256: vec![],
                stored_at: "2030-01-01T00:00:00Z".into(),
                labels: [(LABEL_CHECKPOINT_TIME.to_string(), time.to_string())].into(),
            },
        }
    }

    fn keys(v: &[ObjectInfo]) -> Vec<&str> {
        let mut k: Vec<_> = v.iter().map(|o| o.key.as_str()).collect();
        k.sort();
        k
    }

    #[test]
    fn keep_last_and_max_age_per_container() {
        let now = humantime::parse_rfc3339("2024-01-10T00:00:00Z").unwrap();
        let objects = vec![
            obj("ns/p/a/1", "2024-01-01T00:00:00Z"),
            obj("ns/p/a/2", "2024-01-02T00:00:00Z"),
            obj("ns/p/a/3", "2024-01-09T00:00:00Z"),
            obj("ns/p/b/1", "2024-01-01T00:00:00Z"),
        ];
        let p = plan(objects.clone(), &GcPolicy { keep_last: Some(1), max_age: None }, now).unwrap();
        assert_eq!(keys(&p.keep), ["ns/p/a/3", "ns/p/b/1"]);
        assert_eq!(keys(&p.delete), ["ns/p/a/1", "ns/p/a/2"]);

        let week = Duration::from_secs(7 * 86400);
        let p = plan(objects.clone(), &GcPolicy { keep_last: Some(1), max_age: Some(week) }, now).unwrap();
        assert_eq!(keys(&p.delete), ["ns/p/a/1", "ns/p/a/2"]);
        assert_eq!(keys(&p.keep), ["ns/p/a/3", "ns/p/b/1"], "b/1 is old but the newest of b");

        let p = plan(objects.clone(), &GcPolicy { keep_last: None, max_age: Some(week) }, now).unwrap();
        assert_eq!(keys(&p.delete), ["ns/p/a/1", "ns/p/a/2", "ns/p/b/1"]);

        let p = plan(objects.clone(), &GcPolicy { keep_last: Some(5), max_age: None }, now).unwrap();
        assert!(p.delete.is_empty());

        assert!(plan(objects, &GcPolicy::default(), now).is_err());
    }
}

//! Data in a bucket (a real s3s-fs server, started here): the objects a plan names are
//! copied by the plan's ETags without listing the bucket, and an object replaced since
//! the plan is refused by name, never copied.
use std::path::Path;

use defuse_core::artifacts::{ArtifactStore, S3Store};
use defuse_core::data::manifest::DataManifest;
use defuse_core::data::remote::{set_mirror_root, S3Data};

#[test]
fn planned_objects_are_copied_by_their_etags_and_a_replaced_one_is_refused() {
    let s3 = defuse_testkit::S3::start();
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(S3Store::from_env("data", "set"));
    rt.block_on(store.ensure_bucket()).unwrap();
    let put = |key: &str, bytes: &'static [u8]| {
        rt.block_on(store.put(key, bytes.into())).unwrap();
    };
    put("train-000000.tar", b"first version of shard 0");
    put("train-000001.tar", b"shard 1");

    let url = Path::new("s3://data/set");
    let plan = DataManifest::of(url).unwrap();
    assert_eq!(plan.files.len(), 2);
    assert!(plan.files.iter().all(|f| !f.etag.is_empty()));
    let bucket = S3Data::parse(url).unwrap().unwrap();

    // the plan's objects are copied, and only those asked for
    set_mirror_root(tmp.path().join("a"));
    let shard0: Vec<_> = plan
        .files
        .iter()
        .filter(|f| f.name == "train-000000.tar")
        .cloned()
        .collect();
    let dir = bucket.mirror_planned(&shard0).unwrap();
    assert_eq!(
        std::fs::read(dir.join("train-000000.tar")).unwrap(),
        b"first version of shard 0"
    );
    assert!(!dir.join("train-000001.tar").exists());

    // shard 0 replaced after the plan: a process without a copy is refused, naming it
    put("train-000000.tar", b"second version of shard 0, longer");
    set_mirror_root(tmp.path().join("b"));
    let e = bucket.mirror_planned(&plan.files).unwrap_err().to_string();
    assert!(
        e.contains("train-000000.tar is not the object the job was planned with"),
        "{e}"
    );
    let copied = tmp.path().join("b/s3/data/set/train-000000.tar");
    assert!(!copied.exists(), "no copy of the other bytes is left");

    // the copy made before the replacement is still the planned one: no download
    set_mirror_root(tmp.path().join("a"));
    let dir = bucket.mirror_planned(&shard0).unwrap();
    assert_eq!(
        std::fs::read(dir.join("train-000000.tar")).unwrap(),
        b"first version of shard 0"
    );
}

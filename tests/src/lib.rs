//! Helpers for the end-to-end tests: the real binaries (built on demand, same profile as
//! the tests), the committed corpus, scratch directories.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path to a built workspace binary (`edge-agent`, `fleet-server`, `fleetctl`), building the
/// workspace's binaries once if the test run did not already.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    // target/<profile>/deps/e2e-<hash>  ->  target/<profile>/<name>
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir")
        .to_path_buf();
    let path = dir.join(name);
    BUILT.get_or_init(|| {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(root())
            .args(["build", "--bins", "-p", "edge-agent", "-p", "fleet-server"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A model folder of the committed conformance corpus.
pub fn corpus(set: &str, id: &str) -> PathBuf {
    root().join("shared/tests/corpus").join(set).join(id)
}

/// The predictive-maintenance example (model, reference and holdout data, MLflow model).
pub fn pdm() -> PathBuf {
    root().join("deploy/examples/pdm")
}

/// Whether an external program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// A fresh scratch directory, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("edge-e2e-")
        .tempdir()
        .expect("create scratch dir")
}

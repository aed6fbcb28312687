//! Shared plumbing for the end-to-end tests: where the project's binaries,
//! the real AMD evidence and the reference tools are, and how to run them.
//!
//! Nothing here skips: a missing binary, evidence folder or reference tool
//! fails the test with a message saying where it was expected and how to
//! get it.

pub mod daemon;
pub mod etcd;
pub mod firmware_blob;
pub mod ha;
pub mod kbs;
pub mod libvirt;
pub mod netns;
pub mod opensvc;
pub mod pool;
pub mod slapos;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root (the folder holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives one level below the workspace root")
        .to_path_buf()
}

/// A binary of this workspace, built by `cargo build --bins` in the same
/// profile as the running test.
pub fn binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test executable has a path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --bins`, as `make test` does)",
        path.display()
    );
    path
}

/// The real AMD SEV-SNP evidence: `$HSEV_TESTDATA`, or the copy kept in the
/// repository (`attestation/testdata/snp`, with its provenance).
pub fn snp_testdata() -> PathBuf {
    let dir = std::env::var_os("HSEV_TESTDATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("attestation/testdata/snp"));
    assert!(
        dir.join("reports").is_dir(),
        "the real AMD evidence is expected in {} (set HSEV_TESTDATA to its folder)",
        dir.display()
    );
    dir
}

/// The bytes of a file under the evidence's `reports/` folder.
pub fn snp_report_file(name: &str) -> Vec<u8> {
    let path = snp_testdata().join("reports").join(name);
    std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// A tool `make deps` installs under `.tools` (`relative` to it).
fn project_tool(relative: &str) -> PathBuf {
    let path = workspace_root().join(".tools").join(relative);
    assert!(
        path.is_file(),
        "{} is expected at {} (run `make deps`)",
        path.file_name().unwrap_or_default().to_string_lossy(),
        path.display()
    );
    path
}

/// The `sev-snp-measure` reference tool that `make deps` installs.
pub fn sev_snp_measure() -> PathBuf {
    project_tool("venv/bin/sev-snp-measure")
}

/// The `grpcurl` client that `make deps` installs.
pub fn grpcurl() -> PathBuf {
    project_tool("grpcurl/bin/grpcurl")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Runs `program` with `args` and returns its output, whatever its exit code.
pub fn run<I, S>(program: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", program.display()))
}

/// Runs the workspace's `hsev` binary.
pub fn hsev<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run(&binary("hsev"), args)
}

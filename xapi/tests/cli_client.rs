//! End-to-end tests of `hsev`'s remote commands: the real `hsev` binary
//! against a gRPC server listening on a Unix socket and on TLS over
//! 127.0.0.1 (a self-signed certificate made with rcgen).
//!
//! THE SERVER HERE IS A TEST DOUBLE (`CannedHsevd`): canned answers, no
//! logic. It stands in for hsevd only because the real daemon does not
//! exist yet; once it does, these tests should run against it instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use hsev_proto::v1::host_service_server::{HostService, HostServiceServer};
use hsev_proto::v1::image_service_server::{ImageService, ImageServiceServer};
use hsev_proto::v1::vm_service_server::{VmService, VmServiceServer};
use hsev_proto::v1::{
    attestation_status, AttestationStatus, ConfidentialMode, ConsoleChunk, ConsoleRequest,
    CreateVmRequest, DeleteVmRequest, Host, HostCapabilities, HostRef, Image, ImageRef,
    ImportImageRequest, ListHostsRequest, ListHostsResponse, ListImagesRequest, ListImagesResponse,
    ListVmsRequest, ListVmsResponse, Progress, SetVmIdBlockRequest, SetVmLabelsRequest,
    SevCapabilities, StopVmRequest, Vm, VmRef, VmSpec, VmState, WaitVmRequest,
};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

const TOKEN: &str = "s3cret-token";

/// A canned server stream.
type Canned<T> = tokio_stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

fn canned<T>(items: Vec<T>) -> Canned<T> {
    tokio_stream::iter(items.into_iter().map(Ok).collect::<Vec<_>>())
}

fn step(step: &str, detail: &str, percent: u32, vm: Option<Vm>) -> Progress {
    Progress {
        step: step.into(),
        detail: detail.into(),
        percent,
        vm,
    }
}

fn web_vm() -> Vm {
    Vm {
        id: "6f1c2a3b-0000-4000-8000-000000000001".into(),
        owner: "alice".into(),
        spec: Some(VmSpec {
            name: "web".into(),
            image: "debian".into(),
            vcpus: 2,
            memory_mib: 2048,
            mode: ConfidentialMode::SevSnp.into(),
            ..VmSpec::default()
        }),
        state: VmState::Running.into(),
        host: "host-a".into(),
        expected_measurement: vec![0xab; 48],
        launch_digest: vec![0xab; 48],
        simulated_firmware: true,
        attestation: Some(AttestationStatus {
            state: attestation_status::State::Released.into(),
            ..AttestationStatus::default()
        }),
        created_at: "2025-06-01T00:00:00Z".into(),
        updated_at: "2025-06-01T00:01:00Z".into(),
        ..Vm::default()
    }
}

/// The test double: canned answers to every call the CLI makes.
#[derive(Debug, Clone, Copy)]
struct CannedHsevd;

fn unimplemented<T>() -> Result<T, Status> {
    Err(Status::unimplemented("not canned"))
}

#[tonic::async_trait]
impl VmService for CannedHsevd {
    type CreateVmStream = Canned<Progress>;
    type StartVmStream = Canned<Progress>;
    type StopVmStream = Canned<Progress>;
    type RebootVmStream = Canned<Progress>;
    type DeleteVmStream = Canned<Progress>;
    type StreamConsoleStream = Canned<ConsoleChunk>;

    async fn create_vm(
        &self,
        request: Request<CreateVmRequest>,
    ) -> Result<Response<Self::CreateVmStream>, Status> {
        let vm = Vm {
            spec: request.into_inner().spec,
            state: VmState::Stopped.into(),
            ..web_vm()
        };
        Ok(Response::new(canned(vec![
            step("spec", "checking", 10, None),
            step("disks", "creating data disk", 40, None),
            step("measurement", "computing the launch digest", 70, None),
            step("done", "", 100, Some(vm)),
        ])))
    }
    async fn start_vm(&self, _: Request<VmRef>) -> Result<Response<Self::StartVmStream>, Status> {
        unimplemented()
    }
    async fn stop_vm(
        &self,
        _: Request<StopVmRequest>,
    ) -> Result<Response<Self::StopVmStream>, Status> {
        unimplemented()
    }
    async fn reboot_vm(&self, _: Request<VmRef>) -> Result<Response<Self::RebootVmStream>, Status> {
        unimplemented()
    }
    async fn delete_vm(
        &self,
        _: Request<DeleteVmRequest>,
    ) -> Result<Response<Self::DeleteVmStream>, Status> {
        unimplemented()
    }
    async fn get_vm(&self, request: Request<VmRef>) -> Result<Response<Vm>, Status> {
        match request.into_inner().vm.as_str() {
            "web" => Ok(Response::new(web_vm())),
            other => Err(Status::not_found(format!("no VM named {other:?}"))),
        }
    }
    async fn list_vms(
        &self,
        _: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        Ok(Response::new(ListVmsResponse {
            vms: vec![web_vm()],
        }))
    }
    async fn wait_vm(&self, request: Request<WaitVmRequest>) -> Result<Response<Vm>, Status> {
        let request = request.into_inner();
        Ok(Response::new(Vm {
            state: request.state,
            ..web_vm()
        }))
    }
    async fn stream_console(
        &self,
        _: Request<ConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        Ok(Response::new(canned(vec![
            ConsoleChunk {
                data: b"hello ".to_vec(),
            },
            ConsoleChunk {
                data: b"console\n".to_vec(),
            },
        ])))
    }
    async fn get_vm_attestation(
        &self,
        _: Request<VmRef>,
    ) -> Result<Response<AttestationStatus>, Status> {
        unimplemented()
    }

    async fn attest_vm(
        &self,
        _: Request<hsev_proto::v1::AttestVmRequest>,
    ) -> Result<Response<hsev_proto::v1::AttestVmResponse>, Status> {
        unimplemented()
    }

    async fn set_vm_id_block(
        &self,
        _: Request<SetVmIdBlockRequest>,
    ) -> Result<Response<Vm>, Status> {
        unimplemented()
    }

    async fn set_vm_ha(
        &self,
        _: Request<hsev_proto::v1::SetVmHaRequest>,
    ) -> Result<Response<Vm>, Status> {
        unimplemented()
    }

    async fn set_vm_labels(&self, _: Request<SetVmLabelsRequest>) -> Result<Response<Vm>, Status> {
        unimplemented()
    }
}

fn debian_image() -> Image {
    Image {
        id: "a1b2c3d4e5f60718293a4b5c6d7e8f90".into(),
        name: "debian".into(),
        sha256: [("firmware".to_owned(), "aa".repeat(32))]
            .into_iter()
            .collect(),
        cmdline: "console=ttyS0".into(),
        measured_direct_boot: true,
        size_bytes: 4096,
        imported_at: "2025-06-01T00:00:00Z".into(),
    }
}

#[tonic::async_trait]
impl ImageService for CannedHsevd {
    type ImportImageStream = Canned<Progress>;

    async fn import_image(
        &self,
        request: Request<ImportImageRequest>,
    ) -> Result<Response<Self::ImportImageStream>, Status> {
        let source = request.into_inner().source_dir;
        Ok(Response::new(canned(vec![
            step(
                "manifest",
                &format!("reading {source}/manifest.json"),
                20,
                None,
            ),
            step("copy", "copying firmware", 100, None),
        ])))
    }
    async fn list_images(
        &self,
        _: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        Ok(Response::new(ListImagesResponse {
            images: vec![debian_image()],
        }))
    }
    async fn get_image(&self, _: Request<ImageRef>) -> Result<Response<Image>, Status> {
        Ok(Response::new(debian_image()))
    }
}

fn host_a() -> Host {
    Host {
        name: "host-a".into(),
        status: "up".into(),
        capabilities: Some(HostCapabilities {
            cpus: 16,
            memory_mib: 65536,
            accelerator: "tcg".into(),
            accelerator_reason: "no svm/vmx flag".into(),
            sev: Some(SevCapabilities {
                simulated: true,
                snp: true,
                asids_total: 16,
                asids_free: 12,
                ..SevCapabilities::default()
            }),
            ..HostCapabilities::default()
        }),
        vms: 1,
        ..Host::default()
    }
}

#[tonic::async_trait]
impl HostService for CannedHsevd {
    async fn list_hosts(
        &self,
        _: Request<ListHostsRequest>,
    ) -> Result<Response<ListHostsResponse>, Status> {
        Ok(Response::new(ListHostsResponse {
            hosts: vec![host_a()],
        }))
    }
    async fn get_host(&self, _: Request<HostRef>) -> Result<Response<Host>, Status> {
        Ok(Response::new(host_a()))
    }
    async fn probe_host(&self, _: Request<HostRef>) -> Result<Response<Host>, Status> {
        unimplemented()
    }

    async fn create_join_token(
        &self,
        _: Request<hsev_proto::v1::CreateJoinTokenRequest>,
    ) -> Result<Response<hsev_proto::v1::JoinToken>, Status> {
        unimplemented()
    }

    async fn eject_host(&self, _: Request<HostRef>) -> Result<Response<Host>, Status> {
        unimplemented()
    }

    type SetHostStateStream = Canned<Progress>;

    async fn set_host_state(
        &self,
        _: Request<hsev_proto::v1::SetHostStateRequest>,
    ) -> Result<Response<Canned<Progress>>, Status> {
        unimplemented()
    }

    type MigrateVmStream = Canned<Progress>;

    async fn migrate_vm(
        &self,
        _: Request<hsev_proto::v1::MigrateVmRequest>,
    ) -> Result<Response<Canned<Progress>>, Status> {
        unimplemented()
    }

    async fn plan_ha(
        &self,
        _: Request<hsev_proto::v1::HaPlanRequest>,
    ) -> Result<Response<hsev_proto::v1::HaPlanResponse>, Status> {
        unimplemented()
    }
}

/// The double served on a Unix socket and on TLS, and the
/// `authorization` headers it saw.
struct Fixture {
    /// Dropping it stops both servers.
    _runtime: tokio::runtime::Runtime,
    folder: tempfile::TempDir,
    socket: PathBuf,
    https: String,
    ca: PathBuf,
    authorizations: Arc<Mutex<Vec<String>>>,
}

impl Fixture {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let folder = tempfile::tempdir().expect("tempdir");
        let socket = folder.path().join("hsevd.sock");
        let certified = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .expect("self-signed certificate");
        let ca = folder.path().join("hsevd-cert.pem");
        std::fs::write(&ca, certified.cert.pem()).expect("writes");
        let identity =
            Identity::from_pem(certified.cert.pem(), certified.signing_key.serialize_pem());

        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let seen = authorizations.clone();
        let check = move |request: Request<()>| -> Result<Request<()>, Status> {
            let header = request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("")
                .to_owned();
            seen.lock().expect("lock").push(header.clone());
            if header == format!("Bearer {TOKEN}") {
                Ok(request)
            } else {
                // Echoes the header to check that hsev scrubs it.
                Err(Status::unauthenticated(format!("refused {header:?}")))
            }
        };
        let services = |mut builder: Server| {
            builder
                .add_service(VmServiceServer::with_interceptor(
                    CannedHsevd,
                    check.clone(),
                ))
                .add_service(ImageServiceServer::with_interceptor(
                    CannedHsevd,
                    check.clone(),
                ))
                .add_service(HostServiceServer::with_interceptor(
                    CannedHsevd,
                    check.clone(),
                ))
        };
        let (unix, tcp) = runtime.block_on(async {
            (
                tokio::net::UnixListener::bind(&socket).expect("binds the socket"),
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("binds TCP"),
            )
        });
        let https = format!(
            "https://127.0.0.1:{}",
            tcp.local_addr().expect("addr").port()
        );
        runtime.spawn(
            services(Server::builder())
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(unix)),
        );
        let tls = Server::builder()
            .tls_config(ServerTlsConfig::new().identity(identity))
            .expect("TLS config");
        runtime.spawn(
            services(tls).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(tcp)),
        );
        Fixture {
            _runtime: runtime,
            folder,
            socket,
            https,
            ca,
            authorizations,
        }
    }

    fn unix(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn authorizations(&self) -> Vec<String> {
        self.authorizations.lock().expect("lock").clone()
    }
}

/// Runs `hsev` with a clean environment: no HSEV_* variables and a HOME
/// without a config file, plus `env`.
fn hsev(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hsev"));
    command.args(args).env("HOME", home).stdin(Stdio::null());
    for name in [
        "HSEV_ENDPOINT",
        "HSEV_CA",
        "HSEV_TOKEN",
        "HSEV_TOKEN_FILE",
        "HSEV_CONFIG",
        "XDG_CONFIG_HOME",
    ] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().expect("runs hsev")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

const CREATE: &[&str] = &[
    "vm",
    "create",
    "web",
    "--image",
    "debian",
    "--vcpus",
    "2",
    "--memory",
    "2048",
    "--mode",
    "sev-snp",
    "--policy",
    "0x30000",
    "--disk",
    "data:1024",
    "--forward",
    "0:22",
    "--output",
    "json",
];

fn check_created(output: &Output) {
    assert_exit(output, 0);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("[ 10%] spec: checking\n[ 40%] disks: creating data disk\n"),
        "{stderr}"
    );
    let vm: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(vm["name"], "web");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["spec"]["mode"], "sev-snp");
    assert_eq!(vm["spec"]["guest_policy"], "0x30000");
    assert_eq!(vm["spec"]["disks"][0]["name"], "data");
    assert_eq!(vm["spec"]["disks"][0]["size_mib"], 1024);
    assert_eq!(vm["spec"]["port_forwards"][0]["guest_port"], 22);
    assert_eq!(vm["measurements_equal"], true);
}

#[test]
fn over_a_unix_socket_the_token_travels_and_progress_streams() {
    let fixture = Fixture::start();
    let home = fixture.folder.path();
    let endpoint = fixture.unix();
    let mut args = CREATE.to_vec();
    args.extend(["--endpoint", &endpoint, "--token", TOKEN]);
    check_created(&hsev(home, &args, &[]));
    assert_eq!(fixture.authorizations(), vec![format!("Bearer {TOKEN}")]);

    let connection = [("HSEV_ENDPOINT", endpoint.as_str()), ("HSEV_TOKEN", TOKEN)];
    let show = hsev(home, &["vm", "show", "web"], &connection);
    assert_exit(&show, 0);
    let shown = text(&show.stdout);
    assert!(
        shown.starts_with("SIMULATED firmware: no confidentiality\n"),
        "{shown}"
    );
    assert!(shown.contains("measurements:         equal"), "{shown}");

    let list = hsev(home, &["vm", "list"], &connection);
    assert_exit(&list, 0);
    assert!(
        text(&list.stdout).starts_with("ID        NAME  STATE    MODE"),
        "{}",
        text(&list.stdout)
    );
    let list = hsev(home, &["vm", "list", "--output", "json"], &connection);
    assert_exit(&list, 0);
    let vms: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
    assert_eq!(vms[0]["id"], "6f1c2a3b-0000-4000-8000-000000000001");

    let console = hsev(home, &["vm", "console", "web"], &connection);
    assert_exit(&console, 0);
    assert_eq!(console.stdout, b"hello console\n");

    let wait = hsev(
        home,
        &[
            "vm", "wait", "web", "--state", "stopped", "--output", "json",
        ],
        &connection,
    );
    assert_exit(&wait, 0);
    let vm: serde_json::Value = serde_json::from_slice(&wait.stdout).expect("JSON");
    assert_eq!(vm["state"], "stopped");
}

#[test]
fn not_found_exits_2_with_the_daemons_message() {
    let fixture = Fixture::start();
    let endpoint = fixture.unix();
    let output = hsev(
        fixture.folder.path(),
        &["vm", "show", "missing", "--endpoint", &endpoint],
        &[("HSEV_TOKEN", TOKEN)],
    );
    assert_exit(&output, 2);
    assert_eq!(
        text(&output.stderr),
        "hsev: error: no VM named \"missing\"\n"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn a_refused_token_exits_2_and_is_never_printed() {
    let fixture = Fixture::start();
    let endpoint = fixture.unix();
    let output = hsev(
        fixture.folder.path(),
        &[
            "vm",
            "list",
            "--endpoint",
            &endpoint,
            "--token",
            "wrong-token",
        ],
        &[],
    );
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("hsevd wants a valid token"), "{stderr}");
    assert!(stderr.contains("<redacted>"), "{stderr}");
    assert!(!stderr.contains("wrong-token"), "{stderr}");
    assert_eq!(
        fixture.authorizations(),
        vec!["Bearer wrong-token".to_owned()]
    );
}

#[test]
fn over_tls_with_a_self_signed_certificate() {
    let fixture = Fixture::start();
    let home = fixture.folder.path();
    let ca = fixture.ca.to_str().expect("utf-8");
    let mut args = CREATE.to_vec();
    args.extend(["--endpoint", &fixture.https, "--ca", ca]);
    check_created(&hsev(home, &args, &[("HSEV_TOKEN", TOKEN)]));
    assert_eq!(fixture.authorizations(), vec![format!("Bearer {TOKEN}")]);

    let hosts = hsev(
        home,
        &["host", "list", "--output", "json"],
        &[
            ("HSEV_ENDPOINT", &fixture.https),
            ("HSEV_CA", ca),
            ("HSEV_TOKEN", TOKEN),
        ],
    );
    assert_exit(&hosts, 0);
    let hosts: serde_json::Value = serde_json::from_slice(&hosts.stdout).expect("JSON");
    assert_eq!(hosts[0]["capabilities"]["sev"]["simulated"], true);

    // The system's roots do not know the self-signed certificate.
    let untrusted = hsev(
        home,
        &["vm", "list", "--endpoint", &fixture.https],
        &[("HSEV_TOKEN", TOKEN)],
    );
    assert_exit(&untrusted, 2);
    let stderr = text(&untrusted.stderr);
    assert!(
        stderr.starts_with(&format!(
            "hsev: error: cannot reach hsevd at {}: ",
            fixture.https
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--ca"), "{stderr}");
}

#[test]
fn settings_come_from_the_config_file() {
    let fixture = Fixture::start();
    let home = fixture.folder.path();
    let config = home.join(".config/hsev");
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(config.join("token"), format!("{TOKEN}\n")).expect("writes");
    std::fs::write(
        config.join("config.toml"),
        format!(
            "endpoint = \"{}\"\nca = \"{}\"\ntoken_file = \"token\"\n",
            fixture.https,
            fixture.ca.display()
        ),
    )
    .expect("writes");
    let output = hsev(home, &["host", "show", "host-a"], &[]);
    assert_exit(&output, 0);
    let shown = text(&output.stdout);
    assert!(shown.contains("asids:"), "{shown}");
    assert!(shown.contains("12 free of 16"), "{shown}");

    // A flag wins over the file.
    let endpoint = fixture.unix();
    let output = hsev(home, &["image", "list", "--endpoint", &endpoint], &[]);
    assert_exit(&output, 0);
    assert!(text(&output.stdout).contains("debian"));

    std::fs::write(config.join("config.toml"), "endpont = \"x\"\n").expect("writes");
    let output = hsev(home, &["image", "list"], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).contains("unknown field `endpont`"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn image_import_streams_progress_then_shows_the_image() {
    let fixture = Fixture::start();
    let home = fixture.folder.path();
    let source = home.join("out");
    std::fs::create_dir_all(&source).expect("mkdir");
    std::fs::write(source.join("manifest.json"), "{}").expect("writes");
    let endpoint = fixture.unix();
    let output = hsev(
        home,
        &[
            "image",
            "import",
            "debian",
            "--from",
            source.to_str().expect("utf-8"),
            "--endpoint",
            &endpoint,
        ],
        &[("HSEV_TOKEN", TOKEN)],
    );
    assert_exit(&output, 0);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "[ 20%] manifest: reading {}/manifest.json",
            source.display()
        )),
        "{stderr}"
    );
    assert!(
        text(&output.stdout).contains("measured boot:"),
        "{}",
        text(&output.stdout)
    );

    let missing = hsev(
        home,
        &[
            "image",
            "import",
            "x",
            "--from",
            "/nonexistent",
            "--endpoint",
            &endpoint,
        ],
        &[("HSEV_TOKEN", TOKEN)],
    );
    assert_exit(&missing, 2);
    assert!(text(&missing.stderr).contains("has no manifest.json"));
}

#[test]
fn an_unreachable_endpoint_exits_2_naming_it() {
    let home = tempfile::tempdir().expect("tempdir");
    let socket = format!("unix://{}/absent.sock", home.path().display());
    let output = hsev(home.path(), &["vm", "list", "--endpoint", &socket], &[]);
    assert_exit(&output, 2);
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(&format!("hsev: error: cannot reach hsevd at {socket}: ")),
        "{stderr}"
    );

    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("free port")
        .port();
    let https = format!("https://127.0.0.1:{port}");
    let output = hsev(home.path(), &["host", "list", "--endpoint", &https], &[]);
    assert_exit(&output, 2);
    assert!(
        text(&output.stderr).starts_with(&format!("hsev: error: cannot reach hsevd at {https}: ")),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn completions_are_generated() {
    let home = tempfile::tempdir().expect("tempdir");
    for shell in ["bash", "zsh", "fish"] {
        let output = hsev(home.path(), &["completions", shell], &[]);
        assert_exit(&output, 0);
        assert!(text(&output.stdout).contains("hsev"), "{shell}");
    }
}

//! A real gRPC client against the real hsevd: grpcurl (the build `make deps`
//! installs from PyPI, 1.8.6, which asks for reflection v1alpha) lists and
//! describes the services through reflection and calls one method of each,
//! over the Unix socket and over TLS, exactly as the README shows.

use std::path::Path;
use std::process::Output;

use hsev_e2e::daemon::{Daemon, ADMIN};
use hsev_e2e::{free_port, grpcurl, run};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How grpcurl reaches the daemon: the flags before the address, the address.
struct Target {
    flags: Vec<String>,
    address: String,
}

impl Target {
    /// The Unix socket. grpcurl would send the socket's path as the HTTP/2
    /// `:authority`, which is not a valid authority: `-authority` names one.
    fn unix(socket: &Path) -> Target {
        Target {
            flags: vec![
                "-plaintext".into(),
                "-unix".into(),
                "-authority".into(),
                "localhost".into(),
            ],
            address: socket.display().to_string(),
        }
    }

    /// TLS on loopback, trusting the daemon's own certificate.
    fn tls(port: u16, ca: &Path) -> Target {
        Target {
            flags: vec!["-cacert".into(), ca.display().to_string()],
            address: format!("127.0.0.1:{port}"),
        }
    }

    /// `grpcurl FLAGS [extra...] ADDRESS [verb...]`.
    fn run(&self, extra: &[&str], verb: &[&str]) -> Output {
        let mut args: Vec<String> = self.flags.clone();
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        args.push(self.address.clone());
        args.extend(verb.iter().map(|arg| (*arg).to_owned()));
        run(&grpcurl(), &args)
    }

    fn ok(&self, extra: &[&str], verb: &[&str]) -> String {
        let output = self.run(extra, verb);
        assert!(
            output.status.success(),
            "grpcurl {extra:?} {verb:?} failed: {}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    fn call(&self, method: &str) -> serde_json::Value {
        let bearer = format!("authorization: Bearer {ADMIN}");
        let out = self.ok(&["-H", &bearer, "-d", "{}"], &[method]);
        serde_json::from_str(&out).unwrap_or_else(|error| panic!("{method}: {error}: {out}"))
    }
}

fn check(target: &Target, daemon: &Daemon) {
    let services = target.ok(&[], &["list"]);
    let listed: Vec<&str> = services.lines().collect();
    for service in [
        "grpc.health.v1.Health",
        "hsev.v1.HostService",
        "hsev.v1.ImageService",
        "hsev.v1.VmService",
    ] {
        assert!(listed.contains(&service), "{service} not in {listed:?}");
    }
    let methods = target.ok(&[], &["list", "hsev.v1.VmService"]);
    assert!(methods.contains("hsev.v1.VmService.CreateVm"), "{methods}");
    let described = target.ok(&[], &["describe", "hsev.v1.VmService.CreateVm"]);
    assert!(
        described.contains(
            "rpc CreateVm ( .hsev.v1.CreateVmRequest ) returns ( stream .hsev.v1.Progress )"
        ),
        "{described}"
    );
    let message = target.ok(&[], &["describe", "hsev.v1.CreateVmRequest"]);
    assert!(message.contains("message CreateVmRequest"), "{message}");

    // One call per service, with the token.
    let hosts = target.call("hsev.v1.HostService/ListHosts");
    assert_eq!(hosts["hosts"].as_array().map(Vec::len), Some(1), "{hosts}");
    let images = target.call("hsev.v1.ImageService/ListImages");
    assert_eq!(images["images"][0]["name"], "debian", "{images}");
    let vms = target.call("hsev.v1.VmService/ListVms");
    let listed = daemon.json(ADMIN, ["vm", "list"]);
    assert_eq!(
        vms.get("vms")
            .and_then(|vms| vms.as_array())
            .map_or(0, Vec::len),
        listed.as_array().map_or(0, Vec::len),
        "grpcurl and hsev see the same VMs: {vms} / {listed}"
    );
    let health = target.ok(&["-d", "{}"], &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("\"SERVING\""), "{health}");

    // Without the token: refused, and said so.
    let refused = target.run(&["-d", "{}"], &["hsev.v1.VmService/ListVms"]);
    assert!(
        !refused.status.success(),
        "a call without a token is refused"
    );
    let said = text(&refused.stderr);
    assert!(
        said.contains("Code: Unauthenticated") && said.contains("missing bearer token"),
        "{said}"
    );
}

#[test]
fn grpcurl_reflects_and_calls_over_the_socket_and_over_tls() {
    let port = free_port();
    let daemon = Daemon::start(&format!("listen = \"127.0.0.1:{port}\""));
    daemon.import_image();
    let created = daemon.hsev(
        ADMIN,
        [
            "vm", "create", "listed", "--image", "debian", "--vcpus", "1", "--memory", "256",
            "--mode", "none",
        ],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));

    check(&Target::unix(&daemon.socket()), &daemon);
    check(
        &Target::tls(port, &daemon.state_dir().join("tls/cert.pem")),
        &daemon,
    );
}

//! The remote half of `hsev`: where hsevd listens and how to reach it
//! (settings from flags, the environment and a config file), the gRPC
//! connection (Unix socket or TLS), the bearer-token interceptor, the
//! mapping of gRPC statuses to exit codes and messages, and the
//! presentation every remote command shares (progress lines, tables).
//!
//! Only the remote commands (`vm`, `host`, `image`) come here: the offline
//! ones (`attest`, `measure`, `firmware`) never read these settings nor
//! start a runtime.
//!
//! The bearer token must never be printed: not in `Debug` output, not in
//! an error, not echoed from a server message.
//!
//! # Settings
//!
//! Each setting is taken from the first place that has it:
//!
//! | setting | flag | environment | config file | default |
//! |---|---|---|---|---|
//! | endpoint | `--endpoint` | `HSEV_ENDPOINT` | `endpoint =` | [`DEFAULT_ENDPOINT`] |
//! | CA | `--ca` | `HSEV_CA` | `ca =` | the system's roots |
//! | token | `--token`, `--token-file` | `HSEV_TOKEN`, `HSEV_TOKEN_FILE` | `token =`, `token_file =` | none |
//!
//! The endpoint may be a comma-separated list: the coordinators of a pool
//! on etcd, tried in turn until one answers the connection.
//!
//! The config file is `--config`, else `$HSEV_CONFIG`, else
//! `$XDG_CONFIG_HOME/hsev/config.toml` (`~/.config/hsev/config.toml`); only
//! the default one may be missing. Its relative paths are relative to its
//! folder, and unknown keys are refused.

use std::convert::Infallible;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::Args;
use hsev_proto::v1::host_service_client::HostServiceClient;
use hsev_proto::v1::image_service_client::ImageServiceClient;
use hsev_proto::v1::vm_service_client::VmServiceClient;
use hsev_proto::v1::{Progress, Vm};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Uri};
use tonic::{Code, Status};

/// Where hsevd listens when nothing says otherwise: the Unix socket of a
/// daemon on this machine.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/hsev/hsevd.sock";

/// How long to wait for a TCP connection and its TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection flags of every remote command; each may also come from
/// the environment or the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectionArgs {
    /// hsevd's address: unix:///PATH or https://HOST:PORT, or several,
    /// comma-separated, tried in turn (a pool's coordinators)
    /// [env: HSEV_ENDPOINT] [default: unix:///run/hsev/hsevd.sock].
    #[arg(long, global = true, help_heading = "Connection", value_name = "URL")]
    pub endpoint: Option<String>,
    /// Trust only this certificate authority (PEM or DER; hsevd's own
    /// certificate when it is self-signed) for an https:// endpoint,
    /// instead of the system's roots [env: HSEV_CA].
    #[arg(long, global = true, help_heading = "Connection", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Bearer token sent on every call [env: HSEV_TOKEN]; other users can
    /// see a flag in the process list: prefer --token-file.
    #[arg(long, global = true, help_heading = "Connection", value_name = "TOKEN")]
    pub token: Option<Token>,
    /// Read the bearer token from this file [env: HSEV_TOKEN_FILE].
    #[arg(
        long,
        global = true,
        help_heading = "Connection",
        value_name = "FILE",
        conflicts_with = "token"
    )]
    pub token_file: Option<PathBuf>,
    /// Config file (TOML: endpoint, ca, token, token_file) [env: HSEV_CONFIG]
    /// [default: ~/.config/hsev/config.toml].
    #[arg(long, global = true, help_heading = "Connection", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// A bearer token. It never shows: `Debug` prints `Token(<redacted>)` and
/// there is no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// The token, to put in a header or to scrub from a message.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Parsing never fails, so that clap never echoes a token in an error;
/// [`Settings::resolve`] checks it and names only where it came from.
impl FromStr for Token {
    type Err = Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Token(text.to_owned()))
    }
}

/// Where hsevd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket on this machine.
    Unix {
        /// As given.
        text: String,
        /// The socket's path.
        path: PathBuf,
    },
    /// gRPC over TLS.
    Https {
        /// As given.
        text: String,
        /// The parsed address.
        uri: Uri,
    },
}

impl Endpoint {
    /// Parses `unix:///abs/path`, `unix:path`, `/abs/path` or
    /// `https://host[:port]`. Plaintext `http://` is refused: the token
    /// would cross the network in the clear.
    pub fn parse(text: &str) -> Result<Self, String> {
        let unix = |path: &str| {
            if path.is_empty() {
                Err(format!("endpoint {text:?} names no socket path"))
            } else {
                Ok(Endpoint::Unix {
                    text: text.to_owned(),
                    path: PathBuf::from(path),
                })
            }
        };
        if let Some(rest) = text.strip_prefix("unix://") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "endpoint {text:?}: unix:// takes an absolute path, as in unix:///run/hsev/hsevd.sock"
                ));
            }
            unix(rest)
        } else if let Some(rest) = text.strip_prefix("unix:") {
            unix(rest)
        } else if text.starts_with('/') {
            unix(text)
        } else if text.starts_with("http://") {
            Err(format!(
                "endpoint {text:?}: plaintext http:// is refused, since the bearer token would cross the network in the clear; use https:// or unix://"
            ))
        } else if text.starts_with("https://") {
            let uri: Uri = text
                .parse()
                .map_err(|error| format!("endpoint {text:?} is not a valid address: {error}"))?;
            if uri.host().is_none_or(str::is_empty) {
                return Err(format!("endpoint {text:?} names no host"));
            }
            if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
                return Err(format!(
                    "endpoint {text:?}: give only https://HOST:PORT, without a path"
                ));
            }
            Ok(Endpoint::Https {
                text: text.to_owned(),
                uri,
            })
        } else {
            Err(format!(
                "endpoint {text:?} is neither unix:///path/to/hsevd.sock nor https://host:port"
            ))
        }
    }

    /// Whether hsevd runs on this machine, so that it sees this machine's
    /// files.
    pub fn is_local(&self) -> bool {
        matches!(self, Endpoint::Unix { .. })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix { text, .. } | Endpoint::Https { text, .. } => f.write_str(text),
        }
    }
}

/// The config file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    /// Read as any value so that a wrong type is refused without the
    /// value in the message.
    token: Option<toml::Value>,
    token_file: Option<PathBuf>,
}

/// Where a setting was found, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Flag(&'static str),
    Environment(&'static str),
    File(&'static str, PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(flag) => write!(f, "--{flag}"),
            Origin::Environment(name) => write!(f, "${name}"),
            Origin::File(key, path) => write!(f, "`{key}` in {}", path.display()),
        }
    }
}

/// A token, or the file that holds it, and where that was said.
#[derive(Debug)]
enum TokenSource {
    Value(Token, Origin),
    File(PathBuf, Origin),
}

/// The resolved connection settings.
#[derive(Debug)]
pub struct Settings {
    /// Where hsevd listens.
    pub endpoint: Endpoint,
    /// Where else it may be reached (the pool's other coordinators), tried
    /// in turn when `endpoint` cannot be.
    pub fallbacks: Vec<Endpoint>,
    /// The only authority trusted for TLS; `None`: the system's roots.
    pub ca: Option<PathBuf>,
    token: Option<Token>,
}

impl Settings {
    /// Resolves the settings from `args`, the process environment and the
    /// config file.
    pub fn resolve(args: &ConnectionArgs) -> Result<Self, String> {
        Self::resolve_with(args, &|name| {
            std::env::var(name).ok().filter(|value| !value.is_empty())
        })
    }

    /// [`Settings::resolve`] with `environment` in place of the process's.
    fn resolve_with(
        args: &ConnectionArgs,
        environment: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let (config_path, explicit) = match (&args.config, environment("HSEV_CONFIG")) {
            (Some(path), _) => (Some(path.clone()), true),
            (None, Some(path)) => (Some(PathBuf::from(path)), true),
            (None, None) => (default_config_path(environment), false),
        };
        let (file, config_path) = match config_path {
            Some(path) => match load_config(&path, explicit)? {
                Some(file) => (file, Some(path)),
                None => (ConfigFile::default(), None),
            },
            None => (ConfigFile::default(), None),
        };
        let in_file =
            |key: &'static str| Origin::File(key, config_path.clone().unwrap_or_default());
        let relative_to_file = |path: PathBuf| match config_path.as_deref().and_then(Path::parent) {
            Some(folder) if path.is_relative() => folder.join(path),
            _ => path,
        };

        let endpoint_text = args
            .endpoint
            .clone()
            .or_else(|| environment("HSEV_ENDPOINT"))
            .or(file.endpoint)
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let mut endpoints = endpoint_text
            .split(',')
            .map(|text| match text.trim() {
                "" => Err(format!(
                    "endpoint list {endpoint_text:?} has an empty entry"
                )),
                text => Endpoint::parse(text),
            })
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let endpoint = endpoints.next().ok_or("no endpoint given")?;
        let fallbacks = endpoints.collect();

        let ca = args
            .ca
            .clone()
            .or_else(|| environment("HSEV_CA").map(PathBuf::from))
            .or_else(|| file.ca.map(relative_to_file));

        let from_flags = match (&args.token, &args.token_file) {
            (Some(_), Some(_)) => return Err("give --token or --token-file, not both".into()),
            (Some(token), None) => Some(TokenSource::Value(token.clone(), Origin::Flag("token"))),
            (None, Some(path)) => Some(TokenSource::File(path.clone(), Origin::Flag("token-file"))),
            (None, None) => None,
        };
        let from_environment = match (environment("HSEV_TOKEN"), environment("HSEV_TOKEN_FILE")) {
            (Some(_), Some(_)) => {
                return Err("set HSEV_TOKEN or HSEV_TOKEN_FILE, not both".into());
            }
            (Some(token), None) => Some(TokenSource::Value(
                Token(token),
                Origin::Environment("HSEV_TOKEN"),
            )),
            (None, Some(path)) => Some(TokenSource::File(
                PathBuf::from(path),
                Origin::Environment("HSEV_TOKEN_FILE"),
            )),
            (None, None) => None,
        };
        let from_file = match (file.token, file.token_file) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{}: set `token` or `token_file`, not both",
                    config_path.unwrap_or_default().display()
                ));
            }
            (Some(toml::Value::String(token)), None) => {
                Some(TokenSource::Value(Token(token), in_file("token")))
            }
            (Some(_), None) => {
                return Err(format!("{} must be a string", in_file("token")));
            }
            (None, Some(path)) => Some(TokenSource::File(
                relative_to_file(path),
                in_file("token_file"),
            )),
            (None, None) => None,
        };
        let token = from_flags
            .or(from_environment)
            .or(from_file)
            .map(read_token)
            .transpose()?;
        Ok(Settings {
            endpoint,
            fallbacks,
            ca,
            token,
        })
    }

    /// `message` with every occurrence of the token replaced.
    pub fn redact(&self, message: &str) -> String {
        match &self.token {
            Some(token) if !token.expose().is_empty() => {
                message.replace(token.expose(), "<redacted>")
            }
            _ => message.to_owned(),
        }
    }
}

/// `$XDG_CONFIG_HOME/hsev/config.toml`, else `$HOME/.config/hsev/config.toml`.
fn default_config_path(environment: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    environment("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|path| path.is_absolute())
        .or_else(|| environment("HOME").map(|home| Path::new(&home).join(".config")))
        .map(|folder| folder.join("hsev").join("config.toml"))
}

/// Reads the config file; `None` when it is the default one and absent.
fn load_config(path: &Path, explicit: bool) -> Result<Option<ConfigFile>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(None);
        }
        Err(error) => return Err(format!("cannot read {}: {error}", path.display())),
    };
    // toml's Display quotes the offending line, which may hold the token:
    // only its message and line number are shown.
    let file: ConfigFile = toml::from_str(&text).map_err(|error| {
        let line = error
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
            .map(|line| format!(" line {line}:"))
            .unwrap_or_default();
        format!("{}:{line} {}", path.display(), error.message().trim_end())
    })?;
    if file.token.is_some() {
        warn_if_readable_by_others(path);
    }
    Ok(Some(file))
}

/// Warns when a file holding a token can be read by other users.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        if metadata.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "hsev: warning: {} holds a token and other users may read it (chmod 600 it)",
                path.display()
            );
        }
    }
}

/// The token itself, checked to fit a header.
fn read_token(source: TokenSource) -> Result<Token, String> {
    let (token, origin) = match source {
        TokenSource::Value(token, origin) => (token, origin),
        TokenSource::File(path, origin) => {
            let text = std::fs::read_to_string(&path).map_err(|error| {
                format!(
                    "cannot read the token file {} (from {origin}): {error}",
                    path.display()
                )
            })?;
            warn_if_readable_by_others(&path);
            (Token(text.trim().to_owned()), origin)
        }
    };
    if token.expose().is_empty() {
        return Err(format!("the token from {origin} is empty"));
    }
    if !token.expose().bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "the token from {origin} holds characters a gRPC header cannot carry (only printable ASCII without spaces)"
        ));
    }
    Ok(token)
}

/// Adds `authorization: Bearer <token>` to every call, when there is a
/// token.
#[derive(Clone)]
pub struct BearerAuth {
    header: Option<MetadataValue<Ascii>>,
}

impl BearerAuth {
    fn new(token: Option<&Token>) -> Result<Self, String> {
        let header = token
            .map(|token| {
                MetadataValue::try_from(format!("Bearer {}", token.expose())).map(|mut value| {
                    value.set_sensitive(true);
                    value
                })
            })
            .transpose()
            .map_err(|_| "the token cannot be sent as a gRPC header".to_owned())?;
        Ok(BearerAuth { header })
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.header.is_some() {
            "Bearer <redacted>"
        } else {
            "none"
        };
        f.debug_struct("BearerAuth")
            .field("authorization", &shown)
            .finish()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// A channel whose every call carries the token.
pub type AuthChannel = InterceptedService<StaleWarning, BearerAuth>;

/// The channel, printing once on stderr the warning hsevd attaches to an
/// answer read from a copy of the pool that may be stale
/// ([`crate::api::STALE_HEADER`]): tonic's generated clients
/// hand only the message on, so the header is read here, below them.
#[derive(Debug, Clone)]
pub struct StaleWarning {
    channel: Channel,
    warned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl tower::Service<tonic::codegen::http::Request<tonic::body::Body>> for StaleWarning {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.channel.poll_ready(context)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        let answer = self.channel.call(request);
        let warned = std::sync::Arc::clone(&self.warned);
        Box::pin(async move {
            let response = answer.await?;
            if let Some(warning) = response
                .headers()
                .get(crate::api::STALE_HEADER)
                .and_then(|value| value.to_str().ok())
            {
                if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("warning: {warning}");
                }
            }
            Ok(response)
        })
    }
}

/// An open connection to hsevd.
#[derive(Debug, Clone)]
pub struct Connection {
    channel: StaleWarning,
    auth: BearerAuth,
    endpoint: Endpoint,
}

impl Connection {
    /// Connects now, so that an unreachable daemon is reported before any
    /// call: to the endpoint, else to each fallback in turn. When none
    /// answers, the error names each and why.
    pub async fn open(settings: &Settings) -> Result<Self, RemoteError> {
        let auth = BearerAuth::new(settings.token.as_ref()).map_err(RemoteError::Input)?;
        let mut failures = Vec::new();
        for endpoint in std::iter::once(&settings.endpoint).chain(&settings.fallbacks) {
            match Self::connect(settings, endpoint).await {
                Ok(channel) => {
                    return Ok(Connection {
                        channel: StaleWarning {
                            channel,
                            warned: std::sync::Arc::default(),
                        },
                        auth,
                        endpoint: endpoint.clone(),
                    })
                }
                Err(RemoteError::Unreachable { endpoint, detail })
                    if !settings.fallbacks.is_empty() =>
                {
                    failures.push(format!("{endpoint}: {detail}"));
                }
                Err(other) => return Err(other),
            }
        }
        Err(RemoteError::Unreachable {
            endpoint: "any of its endpoints".to_owned(),
            detail: failures.join("; "),
        })
    }

    /// A channel to `endpoint`, connected.
    async fn connect(settings: &Settings, endpoint: &Endpoint) -> Result<Channel, RemoteError> {
        let unreachable = |error: &dyn std::error::Error| RemoteError::Unreachable {
            endpoint: endpoint.to_string(),
            detail: error_chain(error),
        };
        let user_agent = concat!("hsev/", env!("CARGO_PKG_VERSION"));
        let channel = match endpoint {
            Endpoint::Unix { path, .. } => {
                // The URI only fills in the HTTP/2 `:authority`; the
                // connector ignores it and dials the socket.
                let path = path.clone();
                let connector = tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(&path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                });
                tonic::transport::Endpoint::from_static("http://localhost")
                    .user_agent(user_agent)
                    .map_err(|error| unreachable(&error))?
                    .connect_with_connector(connector)
                    .await
                    .map_err(|error| unreachable(&error))?
            }
            Endpoint::Https { uri, .. } => {
                let tls = match &settings.ca {
                    Some(path) => ClientTlsConfig::new().ca_certificate(load_ca(path)?),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                tonic::transport::Endpoint::from(uri.clone())
                    .user_agent(user_agent)
                    .map_err(|error| unreachable(&error))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tls_config(tls.timeout(CONNECT_TIMEOUT))
                    .map_err(|error| {
                        RemoteError::Input(format!("TLS settings: {}", error_chain(&error)))
                    })?
                    .connect()
                    .await
                    .map_err(|error| {
                        let mut refused = unreachable(&error);
                        if let RemoteError::Unreachable { detail, .. } = &mut refused {
                            if detail.contains("certificate") {
                                detail.push_str(match &settings.ca {
                                    Some(_) => " (is --ca the authority that signed hsevd's certificate?)",
                                    None => " (pass the authority that signed hsevd's certificate with --ca, HSEV_CA or ca =)",
                                });
                            }
                        }
                        refused
                    })?
            }
        };
        Ok(channel)
    }

    /// Where this connection goes.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The VM service.
    pub fn vms(&self) -> VmServiceClient<AuthChannel> {
        VmServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The image service.
    pub fn images(&self) -> ImageServiceClient<AuthChannel> {
        ImageServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// The host service.
    pub fn hosts(&self) -> HostServiceClient<AuthChannel> {
        HostServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

/// The CA certificate, PEM or DER, as PEM; refused when the file holds
/// none (rustls would silently trust nothing).
fn load_ca(path: &Path) -> Result<Certificate, RemoteError> {
    let bytes = std::fs::read(path).map_err(|error| {
        RemoteError::Input(format!("cannot read the CA {}: {error}", path.display()))
    })?;
    let certificates = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        openssl::x509::X509::stack_from_pem(&bytes).unwrap_or_default()
    } else {
        openssl::x509::X509::from_der(&bytes)
            .map(|certificate| vec![certificate])
            .unwrap_or_default()
    };
    if certificates.is_empty() {
        return Err(RemoteError::Input(format!(
            "the CA {} holds no certificate (PEM or DER)",
            path.display()
        )));
    }
    let mut pem = Vec::new();
    for certificate in certificates {
        pem.extend(
            certificate.to_pem().map_err(|error| {
                RemoteError::Input(format!("the CA {}: {error}", path.display()))
            })?,
        );
    }
    Ok(Certificate::from_pem(pem))
}

/// An error and its sources, `: `-joined, each repetition once.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        // tonic's own layer says only "transport error": its sources tell.
        if text != "transport error" && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = error.source();
    }
    parts.join(": ")
}

/// Why a remote command failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Bad usage or input, found before or after the call. Exit 2.
    #[error("{0}")]
    Input(String),
    /// hsevd could not be reached. Exit 2.
    #[error("cannot reach hsevd at {endpoint}: {detail}")]
    Unreachable {
        /// The endpoint as given.
        endpoint: String,
        /// What went wrong.
        detail: String,
    },
    /// hsevd answered with an error status.
    #[error("{}", describe_status(.0))]
    Status(Status),
    /// The operation did not happen or did not succeed (declined,
    /// timed out, failed in hsevd). Exit 1.
    #[error("{0}")]
    Failed(String),
}

impl From<Status> for RemoteError {
    fn from(status: Status) -> Self {
        RemoteError::Status(status)
    }
}

impl RemoteError {
    /// The exit code: 2 when the command could not be carried out as
    /// given (bad input, nothing by that name, wrong state, not allowed,
    /// unreachable, unsupported), 1 when hsevd tried and it failed or
    /// timed out.
    pub fn exit_code(&self) -> u8 {
        match self {
            RemoteError::Input(_) | RemoteError::Unreachable { .. } => 2,
            RemoteError::Failed(_) => 1,
            RemoteError::Status(status) => status_exit_code(status.code()),
        }
    }

    /// The message, with the endpoint for a daemon the call did not
    /// reach. A status that came from the transport carries the error it
    /// came from; one hsevd sent (a store without quorum, a coordinator
    /// that does not lead) does not, and speaks for itself.
    pub fn message(&self, endpoint: &Endpoint) -> String {
        match self {
            RemoteError::Status(status)
                if status.code() == Code::Unavailable
                    && std::error::Error::source(status).is_some() =>
            {
                format!("cannot reach hsevd at {endpoint}: {}", status_text(status))
            }
            other => other.to_string(),
        }
    }
}

/// The exit code of a gRPC status code.
pub fn status_exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unavailable
        | Code::Unimplemented => 2,
        Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::DataLoss => 1,
    }
}

/// The status's message, or the code's meaning when it has none.
fn status_text(status: &Status) -> String {
    if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        status.message().to_owned()
    }
}

/// The message for people of a status hsevd sent.
fn describe_status(status: &Status) -> String {
    let text = status_text(status);
    match status.code() {
        Code::Unauthenticated => format!(
            "{text} (hsevd wants a valid token: --token-file, HSEV_TOKEN or token_file = in the config)"
        ),
        Code::PermissionDenied if !text.to_lowercase().contains("permission") => {
            format!("permission denied: {text}")
        }
        Code::Unimplemented => format!("hsevd does not offer this call: {text}"),
        Code::DeadlineExceeded => format!("timed out: {text}"),
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unavailable
        | Code::PermissionDenied => text,
        _ => format!("hsevd failed ({:?}): {text}", status.code()),
    }
}

/// Runs one remote command: resolves the settings, starts a
/// current-thread runtime, connects, runs `operation`, and turns its
/// error into a message on stderr and an exit code.
pub fn run<F>(args: &ConnectionArgs, operation: F) -> ExitCode
where
    F: AsyncFnOnce(&Connection) -> Result<ExitCode, RemoteError>,
{
    run_with_exit_codes(args, operation, RemoteError::exit_code)
}

/// [`run`], with `exit_code` giving the exit code of each error.
pub fn run_with_exit_codes<F>(
    args: &ConnectionArgs,
    operation: F,
    exit_code: impl Fn(&RemoteError) -> u8,
) -> ExitCode
where
    F: AsyncFnOnce(&Connection) -> Result<ExitCode, RemoteError>,
{
    let settings = match Settings::resolve(args) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("hsev: error: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hsev: error: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let mut reached = None;
    let outcome = runtime.block_on(async {
        let connection = Connection::open(&settings).await?;
        reached = Some(connection.endpoint().clone());
        operation(&connection).await
    });
    match outcome {
        Ok(code) => code,
        Err(error) => {
            let endpoint = reached.as_ref().unwrap_or(&settings.endpoint);
            eprintln!("hsev: error: {}", settings.redact(&error.message(endpoint)));
            ExitCode::from(exit_code(&error))
        }
    }
}

/// Prints the steps of a long operation as they arrive, and keeps the VM
/// its last message carries.
#[derive(Debug)]
pub struct ProgressPrinter<W: Write> {
    out: W,
    vm: Option<Vm>,
}

impl<W: Write> ProgressPrinter<W> {
    /// Prints on `out` (stderr, for people).
    pub fn new(out: W) -> Self {
        ProgressPrinter { out, vm: None }
    }

    /// Prints one step: `[ 40%] disks: creating data disk`.
    pub fn record(&mut self, progress: Progress) {
        // A closed stderr must not stop the operation.
        let _ = writeln!(self.out, "{}", progress_line(&progress));
        let _ = self.out.flush();
        if progress.vm.is_some() {
            self.vm = progress.vm;
        }
    }

    /// The VM of the last message that carried one.
    pub fn into_vm(self) -> Option<Vm> {
        self.vm
    }
}

/// One progress step as a line.
pub fn progress_line(progress: &Progress) -> String {
    let percent = progress.percent.min(100);
    match (progress.step.is_empty(), progress.detail.is_empty()) {
        (false, false) => format!("[{percent:>3}%] {}: {}", progress.step, progress.detail),
        (false, true) => format!("[{percent:>3}%] {}", progress.step),
        (true, false) => format!("[{percent:>3}%] {}", progress.detail),
        (true, true) => format!("[{percent:>3}%]"),
    }
}

/// Follows a progress stream to its end, printing each step on stderr;
/// returns the VM the last message carried.
pub async fn follow_progress(
    response: tonic::Response<tonic::Streaming<Progress>>,
) -> Result<Option<Vm>, RemoteError> {
    follow_progress_to(response, std::io::stderr()).await
}

/// [`follow_progress`], printing on `out`.
pub async fn follow_progress_to<W: Write>(
    response: tonic::Response<tonic::Streaming<Progress>>,
    out: W,
) -> Result<Option<Vm>, RemoteError> {
    let mut stream = response.into_inner();
    let mut printer = ProgressPrinter::new(out);
    while let Some(progress) = stream.message().await? {
        printer.record(progress);
    }
    Ok(printer.into_vm())
}

/// Aligned columns under a header, two spaces apart, no trailing spaces.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (column, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(column) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|header| (*header).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            let width = widths.get(column).copied().unwrap_or(0);
            line.push_str(&format!("{cell:<width$}"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key: value` lines, the values aligned.
#[derive(Debug, Default)]
pub struct Fields {
    lines: Vec<(String, String)>,
}

impl Fields {
    /// Adds a line.
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.lines.push((key.into(), value.into()));
    }

    /// Adds a line unless `value` is empty.
    pub fn add_nonempty(&mut self, key: impl Into<String>, value: &str) {
        if !value.is_empty() {
            self.add(key, value);
        }
    }

    /// The lines, rendered.
    pub fn render(&self) -> String {
        let width = self
            .lines
            .iter()
            .map(|(key, _)| key.chars().count() + 1)
            .max()
            .unwrap_or(0);
        self.lines
            .iter()
            .map(|(key, value)| {
                let key = format!("{key}:");
                format!("{key:<width$} {value}").trim_end().to_owned() + "\n"
            })
            .collect()
    }
}

/// The lower-case, dash-separated name of a proto enum value
/// (`VM_STATE_RUNNING` without `VM_STATE_` is `running`).
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_lowercase()
        .replace('_', "-")
}

/// Hex of `bytes`, `None` when there are none.
pub fn hex_or_none(bytes: &[u8]) -> Option<String> {
    (!bytes.is_empty()).then(|| hex::encode(bytes))
}

/// Writes `text` on stdout; a closed pipe (`| head`) is not an error.
pub fn print_stdout(text: &str) -> Result<(), RemoteError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(RemoteError::Failed(
            format!("cannot write to stdout: {error}"),
        )),
        _ => Ok(()),
    }
}

/// Writes `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<(), RemoteError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| RemoteError::Failed(format!("cannot encode JSON: {error}")))?;
    print_stdout(&(text + "\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn config(folder: &Path, text: &str) -> PathBuf {
        let path = folder.join("config.toml");
        std::fs::write(&path, text).expect("writes");
        path
    }

    #[test]
    fn flags_win_over_environment_which_wins_over_the_file() {
        let folder = tempfile::tempdir().expect("tempdir");
        let path = config(
            folder.path(),
            "endpoint = \"unix:///file.sock\"\nca = \"file-ca.pem\"\ntoken = \"from-file\"\n",
        );
        let path_text = path.to_str().expect("utf-8");
        let env = environment(&[
            ("HSEV_CONFIG", path_text),
            ("HSEV_ENDPOINT", "https://env.example:7443"),
            ("HSEV_CA", "/env-ca.pem"),
            ("HSEV_TOKEN", "from-env"),
        ]);

        let only_file = Settings::resolve_with(
            &ConnectionArgs::default(),
            &environment(&[("HSEV_CONFIG", path_text)]),
        )
        .expect("resolves");
        assert_eq!(only_file.endpoint.to_string(), "unix:///file.sock");
        assert_eq!(only_file.ca, Some(folder.path().join("file-ca.pem")));
        assert_eq!(only_file.token, Some(Token("from-file".into())));

        let with_env = Settings::resolve_with(&ConnectionArgs::default(), &env).expect("resolves");
        assert_eq!(with_env.endpoint.to_string(), "https://env.example:7443");
        assert_eq!(with_env.ca, Some(PathBuf::from("/env-ca.pem")));
        assert_eq!(with_env.token, Some(Token("from-env".into())));

        let token_file = folder.path().join("token");
        std::fs::write(&token_file, "from-flag-file\n").expect("writes");
        let flags = ConnectionArgs {
            endpoint: Some("unix:///flag.sock".into()),
            ca: Some("/flag-ca.pem".into()),
            token: None,
            token_file: Some(token_file),
            config: None,
        };
        let with_flags = Settings::resolve_with(&flags, &env).expect("resolves");
        assert_eq!(with_flags.endpoint.to_string(), "unix:///flag.sock");
        assert_eq!(with_flags.ca, Some(PathBuf::from("/flag-ca.pem")));
        assert_eq!(with_flags.token, Some(Token("from-flag-file".into())));
    }

    #[test]
    fn nothing_given_means_the_default_socket_and_no_token() {
        let home = tempfile::tempdir().expect("tempdir");
        let settings = Settings::resolve_with(
            &ConnectionArgs::default(),
            &environment(&[("HOME", home.path().to_str().expect("utf-8"))]),
        )
        .expect("resolves");
        assert_eq!(settings.endpoint.to_string(), DEFAULT_ENDPOINT);
        assert_eq!(
            settings.endpoint,
            Endpoint::Unix {
                text: DEFAULT_ENDPOINT.into(),
                path: "/run/hsev/hsevd.sock".into()
            }
        );
        assert!(settings.ca.is_none() && settings.token.is_none());
    }

    #[test]
    fn the_default_config_file_is_read_from_home() {
        let home = tempfile::tempdir().expect("tempdir");
        let folder = home.path().join(".config/hsev");
        std::fs::create_dir_all(&folder).expect("mkdir");
        config(&folder, "endpoint = \"https://pool.example:443\"\n");
        let settings = Settings::resolve_with(
            &ConnectionArgs::default(),
            &environment(&[("HOME", home.path().to_str().expect("utf-8"))]),
        )
        .expect("resolves");
        assert_eq!(settings.endpoint.to_string(), "https://pool.example:443");
    }

    #[test]
    fn an_unknown_key_is_refused_by_name_without_echoing_the_file() {
        let folder = tempfile::tempdir().expect("tempdir");
        let path = config(
            folder.path(),
            "endpoint = \"unix:///x.sock\"\ntokn = \"s3cret-value\"\n",
        );
        let args = ConnectionArgs {
            config: Some(path),
            ..ConnectionArgs::default()
        };
        let error = Settings::resolve_with(&args, &environment(&[])).expect_err("refused");
        assert!(error.contains("unknown field `tokn`"), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn a_malformed_token_line_does_not_leak_the_token() {
        let folder = tempfile::tempdir().expect("tempdir");
        let path = config(folder.path(), "token = s3cret-unquoted\n");
        let args = ConnectionArgs {
            config: Some(path.clone()),
            ..ConnectionArgs::default()
        };
        let error = Settings::resolve_with(&args, &environment(&[])).expect_err("refused");
        assert!(!error.contains("s3cret"), "{error}");

        std::fs::write(&path, "token = 123456789\n").expect("writes");
        let error = Settings::resolve_with(&args, &environment(&[])).expect_err("refused");
        assert!(error.contains("must be a string"), "{error}");
        assert!(!error.contains("123456789"), "{error}");
    }

    #[test]
    fn an_explicit_config_file_must_exist() {
        let args = ConnectionArgs {
            config: Some("/nonexistent/hsev.toml".into()),
            ..ConnectionArgs::default()
        };
        let error = Settings::resolve_with(&args, &environment(&[])).expect_err("refused");
        assert!(error.contains("/nonexistent/hsev.toml"), "{error}");
    }

    #[test]
    fn the_token_never_shows_in_debug_or_errors() {
        let settings = Settings::resolve_with(
            &ConnectionArgs {
                endpoint: Some("unix:///x.sock".into()),
                token: Some("s3cret-token".parse().expect("infallible")),
                ..ConnectionArgs::default()
            },
            &environment(&[]),
        )
        .expect("resolves");
        let shown = format!("{settings:?} {:?}", settings.token);
        assert!(!shown.contains("s3cret"), "{shown}");
        let auth = BearerAuth::new(settings.token.as_ref()).expect("header");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let args = ConnectionArgs {
            token: Some("s3cret-token".parse().expect("infallible")),
            ..ConnectionArgs::default()
        };
        assert!(!format!("{args:?}").contains("s3cret"));
        assert_eq!(
            settings.redact("hsevd said: bad token s3cret-token"),
            "hsevd said: bad token <redacted>"
        );

        let error = Settings::resolve_with(
            &ConnectionArgs {
                token: Some("s3cret with space".parse().expect("infallible")),
                ..ConnectionArgs::default()
            },
            &environment(&[]),
        )
        .expect_err("refused");
        assert!(
            error.contains("--token") && !error.contains("s3cret"),
            "{error}"
        );
    }

    #[test]
    fn the_interceptor_sends_the_bearer_token() {
        let mut auth = BearerAuth::new(Some(&Token("abc".into()))).expect("header");
        let request = auth.call(tonic::Request::new(())).expect("passes");
        assert_eq!(
            request
                .metadata()
                .get("authorization")
                .and_then(|value| value.to_str().ok()),
            Some("Bearer abc")
        );
        let mut none = BearerAuth::new(None).expect("no header");
        let request = none.call(tonic::Request::new(())).expect("passes");
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn a_list_of_endpoints_is_tried_in_turn_and_each_failure_is_named() {
        let home = tempfile::tempdir().expect("tempdir");
        let first = home.path().join("c0.sock");
        let second = home.path().join("c1.sock");
        let list = format!("unix://{}, unix://{}", first.display(), second.display());
        let settings = Settings::resolve_with(
            &ConnectionArgs::default(),
            &environment(&[
                ("HOME", home.path().to_str().expect("utf-8")),
                ("HSEV_ENDPOINT", &list),
            ]),
        )
        .expect("resolves");
        assert_eq!(
            settings.endpoint.to_string(),
            format!("unix://{}", first.display())
        );
        assert_eq!(settings.fallbacks.len(), 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let refused = runtime
            .block_on(Connection::open(&settings))
            .expect_err("no hsevd listens")
            .to_string();
        assert!(
            refused.starts_with("cannot reach hsevd at any of its endpoints"),
            "{refused}"
        );
        for socket in [&first, &second] {
            assert!(
                refused.contains(&format!("unix://{}:", socket.display())),
                "{refused}"
            );
        }

        let empty = Settings::resolve_with(
            &ConnectionArgs::default(),
            &environment(&[("HSEV_ENDPOINT", "unix:///a.sock,,unix:///b.sock")]),
        )
        .expect_err("an empty entry");
        assert!(empty.contains("empty entry"), "{empty}");
    }

    #[test]
    fn endpoints_parse_or_are_refused_with_a_reason() {
        assert!(matches!(
            Endpoint::parse("unix:///run/hsev/hsevd.sock"),
            Ok(Endpoint::Unix { path, .. }) if path == Path::new("/run/hsev/hsevd.sock")
        ));
        assert!(matches!(
            Endpoint::parse("unix:relative.sock"),
            Ok(Endpoint::Unix { path, .. }) if path == Path::new("relative.sock")
        ));
        assert!(matches!(
            Endpoint::parse("/tmp/x.sock"),
            Ok(Endpoint::Unix { .. })
        ));
        assert!(matches!(
            Endpoint::parse("https://127.0.0.1:7443"),
            Ok(Endpoint::Https { .. })
        ));
        assert!(Endpoint::parse("http://127.0.0.1:7443")
            .expect_err("plaintext")
            .contains("in the clear"));
        assert!(Endpoint::parse("unix://relative").is_err());
        assert!(Endpoint::parse("https://host:1/path").is_err());
        assert!(Endpoint::parse("ftp://host").is_err());
    }

    #[test]
    fn statuses_map_to_exit_codes_and_messages() {
        let endpoint = Endpoint::parse("unix:///run/x.sock").expect("parses");
        let cases = [
            (Code::NotFound, "vm web not found", 2, "vm web not found"),
            (
                Code::InvalidArgument,
                "vcpus must be at least 1",
                2,
                "vcpus must be at least 1",
            ),
            (
                Code::FailedPrecondition,
                "vm is running",
                2,
                "vm is running",
            ),
            (Code::AlreadyExists, "vm web exists", 2, "vm web exists"),
            (
                Code::PermissionDenied,
                "admins only",
                2,
                "permission denied: admins only",
            ),
            (
                Code::Unauthenticated,
                "no token",
                2,
                "no token (hsevd wants a valid token",
            ),
            (
                Code::Unavailable,
                "cannot record the VM: the etcd cluster is unavailable",
                2,
                "cannot record the VM: the etcd cluster is unavailable",
            ),
            (
                Code::DeadlineExceeded,
                "still starting",
                1,
                "timed out: still starting",
            ),
            (
                Code::Internal,
                "disk full",
                1,
                "hsevd failed (Internal): disk full",
            ),
        ];
        for (code, message, exit, shown) in cases {
            let error = RemoteError::from(Status::new(code, message));
            assert_eq!(error.exit_code(), exit, "{code:?}");
            let text = error.message(&endpoint);
            assert!(text.starts_with(shown), "{code:?}: {text}");
        }
        let mut cut = Status::new(Code::Unavailable, "connection refused");
        cut.set_source(std::sync::Arc::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(
            RemoteError::from(cut).message(&endpoint),
            "cannot reach hsevd at unix:///run/x.sock: connection refused"
        );
        let empty = RemoteError::from(Status::new(Code::NotFound, ""));
        assert_eq!(empty.message(&endpoint), Code::NotFound.description());
        let unreachable = RemoteError::Unreachable {
            endpoint: "https://h:1".into(),
            detail: "connection refused".into(),
        };
        assert_eq!(unreachable.exit_code(), 2);
        assert_eq!(
            unreachable.message(&endpoint),
            "cannot reach hsevd at https://h:1: connection refused"
        );
    }

    #[test]
    fn progress_prints_one_line_per_step_and_keeps_the_last_vm() {
        let mut out = Vec::new();
        let mut printer = ProgressPrinter::new(&mut out);
        printer.record(Progress {
            step: "spec".into(),
            detail: "checking".into(),
            percent: 5,
            vm: None,
        });
        printer.record(Progress {
            step: "disks".into(),
            detail: "creating data disk".into(),
            percent: 40,
            vm: None,
        });
        printer.record(Progress {
            step: "done".into(),
            detail: String::new(),
            percent: 100,
            vm: Some(Vm {
                id: "id-1".into(),
                ..Vm::default()
            }),
        });
        let vm = printer.into_vm();
        assert_eq!(vm.map(|vm| vm.id), Some("id-1".into()));
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "[  5%] spec: checking\n[ 40%] disks: creating data disk\n[100%] done\n"
        );
        assert_eq!(
            progress_line(&Progress {
                percent: 250,
                ..Progress::default()
            }),
            "[100%]"
        );
    }

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let table = render_table(
            &["ID", "NAME", "STATE"],
            &[
                vec!["1234abcd".into(), "web".into(), "running".into()],
                vec!["ffff0000".into(), "database-1".into(), String::new()],
            ],
        );
        assert_eq!(
            table,
            "ID        NAME        STATE\n\
             1234abcd  web         running\n\
             ffff0000  database-1\n"
        );
        assert_eq!(render_table(&["A", "B"], &[]), "A  B\n");
    }

    #[test]
    fn fields_align_values() {
        let mut fields = Fields::default();
        fields.add("name", "web");
        fields.add("launch digest", "00ff");
        fields.add_nonempty("reason", "");
        assert_eq!(fields.render(), "name:          web\nlaunch digest: 00ff\n");
    }

    #[test]
    fn enum_names_are_short() {
        assert_eq!(enum_name("VM_STATE_RUNNING", "VM_STATE_"), "running");
        assert_eq!(
            enum_name("CONFIDENTIAL_MODE_SEV_SNP", "CONFIDENTIAL_MODE_"),
            "sev-snp"
        );
    }
}

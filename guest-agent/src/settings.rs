//! What `hsev-agent unlock` is told to do: the key broker, the disk key's
//! resource, the mount point and the time it may wait, read from the
//! kernel command line (which the SNP launch measures, so the host cannot
//! change them unseen) and, for tests, overridden by flags.
//!
//! This module only parses and checks text; it never reads a file itself
//! and never touches the network.
//!
//! The kernel command line options:
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `hsev.kbs=URL` | the key broker, `https://` (or `http://` for a development broker) | none: no unlock |
//! | `hsev.kbs.pin=sha256:HEX` | SHA-256 of the broker's TLS public key (SubjectPublicKeyInfo): the only key the agent trusts | required with `https://`, refused with `http://` |
//! | `hsev.kbs.resource=REPO/TYPE/TAG` | the disk key's resource | required with `hsev.kbs` |
//! | `hsev.kbs.timeout=SECONDS` | how long to retry an unreachable broker | 300 |
//! | `hsev.data.mount=PATH` | where the unlocked disk is mounted | `/mnt/data` |

use std::path::PathBuf;
use std::time::Duration;

use hsev_attestation::kbs::tls::SpkiPin;

/// Where the unlocked data disk is mounted unless told otherwise.
pub const DEFAULT_MOUNT: &str = "/mnt/data";

/// How long an unreachable key broker is retried unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The command line option naming the key broker.
pub const KBS_OPTION: &str = "hsev.kbs";
/// The command line option pinning the key broker's public key.
pub const PIN_OPTION: &str = "hsev.kbs.pin";
/// The command line option naming the disk key's resource.
pub const RESOURCE_OPTION: &str = "hsev.kbs.resource";
/// The command line option bounding the retries, in seconds.
pub const TIMEOUT_OPTION: &str = "hsev.kbs.timeout";
/// The command line option naming the mount point.
pub const MOUNT_OPTION: &str = "hsev.data.mount";

/// A missing or malformed setting, named as on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// A required option is absent.
    #[error("{0}= is not on the kernel command line (nor given as a flag)")]
    Missing(&'static str),
    /// An option's value is wrong.
    #[error("{option}={value:?}: {problem}")]
    Invalid {
        /// The option.
        option: &'static str,
        /// Its value as given.
        value: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// The options as found, each possibly absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnlockOptions {
    /// `hsev.kbs=`.
    pub kbs_url: Option<String>,
    /// `hsev.kbs.pin=`.
    pub pin: Option<String>,
    /// `hsev.kbs.resource=`.
    pub resource: Option<String>,
    /// `hsev.kbs.timeout=`, in seconds.
    pub timeout: Option<Duration>,
    /// `hsev.data.mount=`.
    pub mount: Option<PathBuf>,
}

/// Checked settings of one unlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlockSettings {
    /// The key broker's base URL, without a trailing slash.
    pub kbs_url: String,
    /// The broker's public key, for an `https://` broker; none for a
    /// plain-HTTP development broker.
    pub pin: Option<SpkiPin>,
    /// The disk key's resource path, `repository/type/tag`.
    pub resource: String,
    /// How long an unreachable key broker is retried.
    pub timeout: Duration,
    /// Where the unlocked disk is mounted (absolute).
    pub mount: PathBuf,
}

impl UnlockOptions {
    /// The options on a kernel command line (`/proc/cmdline`'s text).
    /// Unknown options are ignored; the last of a repeated option wins, as
    /// with the kernel's own. A malformed timeout is an error here.
    pub fn from_cmdline(cmdline: &str) -> Result<Self, SettingsError> {
        let mut options = UnlockOptions::default();
        for word in cmdline.split_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                continue;
            };
            let value = value.trim_matches('"');
            match name {
                KBS_OPTION => options.kbs_url = Some(value.to_owned()),
                PIN_OPTION => options.pin = Some(value.to_owned()),
                RESOURCE_OPTION => options.resource = Some(value.to_owned()),
                TIMEOUT_OPTION => options.timeout = Some(parse_timeout(value)?),
                MOUNT_OPTION => options.mount = Some(PathBuf::from(value)),
                _ => {}
            }
        }
        Ok(options)
    }

    /// Whether the command line asks for an unlock at all.
    pub fn wants_unlock(&self) -> bool {
        self.kbs_url.is_some()
    }

    /// These options, each replaced by `flags`' where `flags` has one.
    pub fn overridden_by(self, flags: UnlockOptions) -> Self {
        UnlockOptions {
            kbs_url: flags.kbs_url.or(self.kbs_url),
            pin: flags.pin.or(self.pin),
            resource: flags.resource.or(self.resource),
            timeout: flags.timeout.or(self.timeout),
            mount: flags.mount.or(self.mount),
        }
    }

    /// The checked settings, defaults filled in.
    pub fn settings(self) -> Result<UnlockSettings, SettingsError> {
        let kbs_url = self.kbs_url.ok_or(SettingsError::Missing(KBS_OPTION))?;
        let invalid = |option, value: &str, problem| SettingsError::Invalid {
            option,
            value: value.to_owned(),
            problem,
        };
        let (authority, https) = match (
            kbs_url.strip_prefix("https://"),
            kbs_url.strip_prefix("http://"),
        ) {
            (Some(authority), _) => (authority, true),
            (None, Some(authority)) => (authority, false),
            (None, None) => {
                return Err(invalid(
                    KBS_OPTION,
                    &kbs_url,
                    "must be an https:// (or, for a development broker, http://) URL",
                ))
            }
        };
        if authority.trim_end_matches('/').is_empty() {
            return Err(invalid(KBS_OPTION, &kbs_url, "has no host"));
        }
        let pin = match (https, self.pin) {
            (true, None) => {
                return Err(invalid(
                    KBS_OPTION,
                    &kbs_url,
                    "an https:// broker needs hsev.kbs.pin=sha256:<hex> (the agent trusts no \
                     certificate authority)",
                ))
            }
            (true, Some(pin)) => Some(
                pin.parse::<SpkiPin>()
                    .map_err(|_| invalid(PIN_OPTION, &pin, "must be sha256:<64 hex digits>"))?,
            ),
            (false, Some(pin)) => {
                return Err(invalid(
                    PIN_OPTION,
                    &pin,
                    "a plain http:// broker has no key to pin",
                ))
            }
            (false, None) => None,
        };
        let resource = self
            .resource
            .ok_or(SettingsError::Missing(RESOURCE_OPTION))?;
        if resource.split('/').count() != 3 || resource.split('/').any(str::is_empty) {
            return Err(invalid(
                RESOURCE_OPTION,
                &resource,
                "must be repository/type/tag",
            ));
        }
        let mount = self.mount.unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT));
        if !mount.is_absolute() || mount.as_os_str() == "/" {
            return Err(invalid(
                MOUNT_OPTION,
                &mount.display().to_string(),
                "must be an absolute path other than /",
            ));
        }
        Ok(UnlockSettings {
            kbs_url: kbs_url.trim_end_matches('/').to_owned(),
            pin,
            resource,
            timeout: self.timeout.unwrap_or(DEFAULT_TIMEOUT),
            mount,
        })
    }
}

/// Seconds (an integer or a decimal fraction), at least one.
pub fn parse_timeout(value: &str) -> Result<Duration, SettingsError> {
    let invalid = |problem| SettingsError::Invalid {
        option: TIMEOUT_OPTION,
        value: value.to_owned(),
        problem,
    };
    let seconds: f64 = value
        .parse()
        .map_err(|_| invalid("not a number of seconds"))?;
    if !seconds.is_finite() || !(1.0..=86_400.0).contains(&seconds) {
        return Err(invalid("must be between 1 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "sha256:0101010101010101010101010101010101010101010101010101010101010101";

    const HSEVD: &str = "console=ttyS0 panic=-1 quiet hsev.exit=idle hsev.net=user \
                         hsev.kbs=https://10.0.2.2:8123 \
                         hsev.kbs.pin=sha256:0101010101010101010101010101010101010101010101010101010101010101 \
                         hsev.kbs.resource=alice/disk-key/vm-1\n";

    #[test]
    fn reads_what_hsevd_puts_on_the_command_line() {
        let options = UnlockOptions::from_cmdline(HSEVD).expect("parses");
        assert!(options.wants_unlock());
        let settings = options.settings().expect("complete");
        assert_eq!(
            settings,
            UnlockSettings {
                kbs_url: "https://10.0.2.2:8123".to_owned(),
                pin: Some(SpkiPin([1; 32])),
                resource: "alice/disk-key/vm-1".to_owned(),
                timeout: DEFAULT_TIMEOUT,
                mount: PathBuf::from("/mnt/data"),
            }
        );
    }

    #[test]
    fn optional_options_and_flags_override() {
        let cmdline = format!("{HSEVD} hsev.kbs.timeout=2.5 hsev.data.mount=/srv/vault");
        let options = UnlockOptions::from_cmdline(&cmdline).expect("parses");
        assert_eq!(options.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(options.mount, Some(PathBuf::from("/srv/vault")));
        let flags = UnlockOptions {
            kbs_url: Some("https://127.0.0.1:9/".to_owned()),
            ..UnlockOptions::default()
        };
        let settings = options.overridden_by(flags).settings().expect("complete");
        assert_eq!(settings.kbs_url, "https://127.0.0.1:9");
        assert_eq!(settings.pin, Some(SpkiPin([1; 32])));
        assert_eq!(settings.resource, "alice/disk-key/vm-1");
        assert_eq!(settings.mount, PathBuf::from("/srv/vault"));
    }

    #[test]
    fn no_kbs_means_no_unlock_and_prefixes_do_not_match() {
        let options =
            UnlockOptions::from_cmdline("quiet hsev.kbsx=1 xhsev.kbs=2 hsev.kbs hsev.net=user")
                .expect("parses");
        assert!(!options.wants_unlock());
        assert_eq!(options, UnlockOptions::default());
        assert_eq!(options.settings(), Err(SettingsError::Missing(KBS_OPTION)));
    }

    #[test]
    fn bad_values_are_named() {
        let error = |cmdline: &str| {
            UnlockOptions::from_cmdline(cmdline)
                .and_then(UnlockOptions::settings)
                .expect_err("refused")
                .to_string()
        };
        assert!(error("hsev.kbs=http://h hsev.kbs.timeout=soon").starts_with("hsev.kbs.timeout="));
        // https needs the pin, plain http has none, and a pin is sha256 hex.
        assert!(error("hsev.kbs=https://h hsev.kbs.resource=a/b/c").contains("hsev.kbs.pin="));
        assert!(error(&format!(
            "hsev.kbs=http://h hsev.kbs.pin={PIN} hsev.kbs.resource=a/b/c"
        ))
        .starts_with("hsev.kbs.pin="));
        assert!(
            error("hsev.kbs=https://h hsev.kbs.pin=sha256:00 hsev.kbs.resource=a/b/c")
                .contains("sha256:<64 hex")
        );
        let plain = UnlockOptions::from_cmdline("hsev.kbs=http://h:1 hsev.kbs.resource=a/b/c")
            .and_then(UnlockOptions::settings)
            .expect("a development broker");
        assert_eq!(plain.pin, None);
        assert!(error("hsev.kbs=http://h hsev.kbs.timeout=0").contains("between 1"));
        assert!(error("hsev.kbs=ftp://h hsev.kbs.resource=a/b/c").starts_with("hsev.kbs="));
        assert!(error("hsev.kbs=http:// hsev.kbs.resource=a/b/c").contains("no host"));
        assert!(error("hsev.kbs=http://h").contains("hsev.kbs.resource= is not"));
        assert!(error("hsev.kbs=http://h hsev.kbs.resource=a/b").contains("repository/type/tag"));
        assert!(error("hsev.kbs=http://h hsev.kbs.resource=a//c").contains("repository/type/tag"));
        assert!(
            error("hsev.kbs=http://h hsev.kbs.resource=a/b/c hsev.data.mount=data")
                .contains("absolute")
        );
        assert!(
            error("hsev.kbs=http://h hsev.kbs.resource=a/b/c hsev.data.mount=/")
                .contains("other than /")
        );
    }

    #[test]
    fn the_last_repeated_option_wins_and_quotes_go() {
        let options = UnlockOptions::from_cmdline(
            "hsev.kbs=http://a hsev.kbs=\"http://b\" hsev.kbs.resource=r/t/x",
        )
        .expect("parses");
        assert_eq!(options.kbs_url.as_deref(), Some("http://b"));
    }
}

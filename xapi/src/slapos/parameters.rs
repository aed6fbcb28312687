//! The instance parameters of HyperSEV's software release
//! (`integrations/slapos/instance-input-schema.json`), checked: the
//! connector is the gate, since slapproxy does not validate them and the
//! real master only warns. A request either parses into a [`Request`] or
//! is refused with an error naming the parameter; nothing is ever guessed.
//!
//! Parameters arrive serialised as the software release declares
//! (`json-in-xml`: one `_` key holding the JSON document); a request made
//! with `slapos request --parameters k=v` sends flat strings instead, so
//! numbers are also accepted as decimal strings.

use hsev_attestation::policy::MinimumTcb;
use hsev_attestation::report::GuestPolicy;
use hsev_proto::v1::ConfidentialMode;
use serde_json::{Map, Value};

/// A parameter that cannot be served, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {problem}")]
pub struct ParameterError {
    /// The parameter, as the requester wrote it.
    pub parameter: String,
    /// What is wrong with it.
    pub problem: String,
}

impl ParameterError {
    fn new(parameter: &str, problem: impl Into<String>) -> Self {
        ParameterError {
            parameter: parameter.to_owned(),
            problem: problem.into(),
        }
    }
}

/// The software types of the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SoftwareType {
    /// `default`: an ordinary VM unless `confidential-mode` says otherwise.
    Default,
    /// `sev-snp`: an SEV-SNP VM, always.
    SevSnp,
}

impl SoftwareType {
    /// The type of an instance (`RootSoftwareInstance` and empty are the
    /// master's old names of `default`).
    pub fn parse(text: &str) -> Result<Self, ParameterError> {
        match text {
            "" | "default" | "RootSoftwareInstance" => Ok(SoftwareType::Default),
            "sev-snp" => Ok(SoftwareType::SevSnp),
            other => Err(ParameterError::new(
                "software type",
                format!(
                    "{other:?} is not a software type of HyperSEV's release (default, sev-snp)"
                ),
            )),
        }
    }
}

/// Default RAM, MB (as KVM's `ram-size`).
pub const DEFAULT_RAM_SIZE: u64 = 4096;
/// Default vCPUs.
pub const DEFAULT_CPU_COUNT: u32 = 2;
/// The guest policy hsevd uses when none is given: SMT allowed, no debug,
/// no migration agent.
pub const DEFAULT_GUEST_POLICY: u64 = 0x30000;

/// Every parameter of the release, for the refusal of an unknown one.
pub const PARAMETERS: [&str; 13] = [
    "name",
    "image",
    "ram-size",
    "cpu-count",
    "disk-size",
    "nat-rules",
    "authorized-keys",
    "confidential-mode",
    "guest-policy",
    "encrypted-disk-size",
    "minimum-tcb",
    "expected-measurement",
    "$schema",
];

/// A request, checked: what the VM must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The requester's name for the VM (`name`).
    pub name: Option<String>,
    /// The image (id or name in hsevd).
    pub image: String,
    /// vCPUs (`cpu-count`).
    pub cpu_count: u32,
    /// Memory, MB (`ram-size`; MiB, as QEMU and KVM's release count it).
    pub ram_size: u64,
    /// A plain data disk, GB (`disk-size`).
    pub disk_size: Option<u64>,
    /// Guest TCP ports forwarded from the host (`nat-rules`).
    pub nat_rules: Vec<u16>,
    /// Memory protection (`confidential-mode`, or the software type's).
    pub mode: ConfidentialMode,
    /// The SEV guest policy; 0 for an ordinary VM.
    pub guest_policy: u64,
    /// A LUKS2 disk whose key only the attested guest gets, GB.
    pub encrypted_disk_size: Option<u64>,
    /// The lowest TCB the host may report (`minimum-tcb`).
    pub minimum_tcb: Option<MinimumTcb>,
    /// The launch measurement the VM must have, or not run.
    pub expected_measurement: Option<Vec<u8>>,
}

impl Request {
    /// Whether the VM is confidential.
    pub fn confidential(&self) -> bool {
        self.mode != ConfidentialMode::None
    }
}

/// The parameters of an instance as the master gives them, decoded from
/// the release's `json-in-xml` serialisation.
pub fn decode(raw: &Map<String, Value>) -> Result<Map<String, Value>, ParameterError> {
    if raw.len() == 1 {
        if let Some(document) = raw.get("_") {
            let text = document.as_str().ok_or_else(|| {
                ParameterError::new("_", "the json-in-xml document must be a string")
            })?;
            return match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(parameters)) => Ok(parameters),
                Ok(_) => Err(ParameterError::new(
                    "_",
                    "the json-in-xml document must be a JSON object",
                )),
                Err(error) => Err(ParameterError::new("_", format!("not JSON: {error}"))),
            };
        }
    }
    Ok(raw.clone())
}

/// Checks `parameters` (decoded) of an instance of `software_type`.
pub fn parse(
    software_type: SoftwareType,
    parameters: &Map<String, Value>,
    default_image: &str,
) -> Result<Request, ParameterError> {
    if let Some(unknown) = parameters
        .keys()
        .find(|key| !PARAMETERS.contains(&key.as_str()))
    {
        return Err(ParameterError::new(
            unknown,
            format!(
                "not a parameter of HyperSEV's software release (it has {})",
                PARAMETERS[..PARAMETERS.len() - 1].join(", ")
            ),
        ));
    }
    let get = |key: &str| parameters.get(key).filter(|value| !value.is_null());

    let name = get("name")
        .map(|value| hostname("name", value))
        .transpose()?;
    let image = match get("image") {
        Some(value) => {
            let image = string("image", value)?;
            if image.is_empty() || image.len() > 128 || image.contains(char::is_whitespace) {
                return Err(ParameterError::new(
                    "image",
                    format!("{image:?} is not an image name"),
                ));
            }
            image
        }
        None => default_image.to_owned(),
    };
    let ram_size = match get("ram-size") {
        Some(value) => {
            let size = integer("ram-size", value, 1024, 4 << 20)?;
            if size % 512 != 0 {
                return Err(ParameterError::new(
                    "ram-size",
                    format!("{size} MB is not a multiple of 512"),
                ));
            }
            size
        }
        None => DEFAULT_RAM_SIZE,
    };
    let cpu_count = match get("cpu-count") {
        Some(value) => u32::try_from(integer("cpu-count", value, 1, 512)?).unwrap_or(u32::MAX),
        None => DEFAULT_CPU_COUNT,
    };
    let disk_size = get("disk-size")
        .map(|value| integer("disk-size", value, 1, 1 << 16))
        .transpose()?;
    let nat_rules = get("nat-rules")
        .map(|value| ports("nat-rules", value))
        .transpose()?
        .unwrap_or_default();
    if let Some(keys) = get("authorized-keys") {
        let empty = match keys {
            Value::String(text) => text.trim().is_empty(),
            Value::Array(list) => list.is_empty(),
            _ => false,
        };
        if !empty {
            return Err(ParameterError::new(
                "authorized-keys",
                "not supported: HyperSEV's guest image has no SSH server, and nothing brings \
                 data into a confidential guest outside its measured launch",
            ));
        }
    }

    let mode = match (software_type, get("confidential-mode")) {
        (SoftwareType::Default, None) => ConfidentialMode::None,
        (SoftwareType::SevSnp, None) => ConfidentialMode::SevSnp,
        (software_type, Some(value)) => {
            let mode = match string("confidential-mode", value)?.as_str() {
                "none" => ConfidentialMode::None,
                "sev" => ConfidentialMode::Sev,
                "sev-es" => ConfidentialMode::SevEs,
                "sev-snp" => ConfidentialMode::SevSnp,
                other => {
                    return Err(ParameterError::new(
                        "confidential-mode",
                        format!("{other:?} is none of none, sev, sev-es, sev-snp"),
                    ))
                }
            };
            if software_type == SoftwareType::SevSnp && mode != ConfidentialMode::SevSnp {
                return Err(ParameterError::new(
                    "confidential-mode",
                    "the sev-snp software type always runs sev-snp: request the default type \
                     for another mode",
                ));
            }
            mode
        }
    };
    let confidential = mode != ConfidentialMode::None;
    let snp = mode == ConfidentialMode::SevSnp;
    let only_snp = |parameter: &str| {
        ParameterError::new(
            parameter,
            format!(
                "needs confidential-mode sev-snp (the sev-snp software type), not {}",
                mode_name(mode)
            ),
        )
    };

    let guest_policy = match get("guest-policy") {
        Some(_) if !confidential => {
            return Err(ParameterError::new(
                "guest-policy",
                "applies to confidential VMs only (confidential-mode sev, sev-es or sev-snp)",
            ))
        }
        Some(value) => policy(value)?,
        None if confidential => DEFAULT_GUEST_POLICY,
        None => 0,
    };
    if mode != ConfidentialMode::SevSnp
        && mode != ConfidentialMode::None
        && guest_policy > 0xffff_ffff
    {
        return Err(ParameterError::new(
            "guest-policy",
            format!("{guest_policy:#x}: an SEV or SEV-ES policy is 32 bits"),
        ));
    }
    let encrypted_disk_size = match get("encrypted-disk-size") {
        Some(_) if !snp => return Err(only_snp("encrypted-disk-size")),
        Some(value) => Some(integer("encrypted-disk-size", value, 1, 1 << 16)?),
        None => None,
    };
    let minimum_tcb = match get("minimum-tcb") {
        Some(_) if !snp => return Err(only_snp("minimum-tcb")),
        Some(value) => Some(tcb(value)?),
        None => None,
    };
    let expected_measurement = match get("expected-measurement") {
        Some(_) if !snp => return Err(only_snp("expected-measurement")),
        Some(_) if encrypted_disk_size.is_some() => {
            return Err(ParameterError::new(
                "expected-measurement",
                "cannot be pinned together with encrypted-disk-size: the encrypted disk's key \
                 resource names the VM on its measured kernel command line, so its launch \
                 measurement is known only once the VM exists",
            ))
        }
        Some(value) => Some(measurement(value)?),
        None => None,
    };
    Ok(Request {
        name,
        image,
        cpu_count,
        ram_size,
        disk_size,
        nat_rules,
        mode,
        guest_policy,
        encrypted_disk_size,
        minimum_tcb,
        expected_measurement,
    })
}

/// The name parameters use for a mode.
pub fn mode_name(mode: ConfidentialMode) -> &'static str {
    match mode {
        ConfidentialMode::Unspecified | ConfidentialMode::None => "none",
        ConfidentialMode::Sev => "sev",
        ConfidentialMode::SevEs => "sev-es",
        ConfidentialMode::SevSnp => "sev-snp",
    }
}

fn string(parameter: &str, value: &Value) -> Result<String, ParameterError> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ParameterError::new(parameter, format!("{value} is not a string")))
}

fn integer(
    parameter: &str,
    value: &Value,
    minimum: u64,
    maximum: u64,
) -> Result<u64, ParameterError> {
    let number = match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => text.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or_else(|| ParameterError::new(parameter, format!("{value} is not a whole number")))?;
    if number < minimum {
        return Err(ParameterError::new(
            parameter,
            format!("{number} is below the minimum of {minimum}"),
        ));
    }
    if number > maximum {
        return Err(ParameterError::new(
            parameter,
            format!("{number} is above the maximum of {maximum}"),
        ));
    }
    Ok(number)
}

fn hostname(parameter: &str, value: &Value) -> Result<String, ParameterError> {
    let name = string(parameter, value)?;
    let valid = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(name)
    } else {
        Err(ParameterError::new(
            parameter,
            format!("{name:?}: 1-63 letters, digits and '-', as a host name"),
        ))
    }
}

/// Ports as a JSON list of numbers, or KVM's space-separated string.
fn ports(parameter: &str, value: &Value) -> Result<Vec<u16>, ParameterError> {
    let items: Vec<Value> = match value {
        Value::Array(items) => items.clone(),
        Value::String(text) => text
            .split_whitespace()
            .map(|word| Value::String(word.to_owned()))
            .collect(),
        other => {
            return Err(ParameterError::new(
                parameter,
                format!("{other} is neither a list of ports nor a space-separated string of them"),
            ))
        }
    };
    let mut ports = Vec::with_capacity(items.len());
    for item in &items {
        if let Some(text) = item.as_str() {
            if let Some((protocol, _)) = text.split_once(':') {
                if protocol != "tcp" {
                    return Err(ParameterError::new(
                        parameter,
                        format!("{text:?}: only TCP ports are forwarded"),
                    ));
                }
            }
        }
        let bare = match item.as_str() {
            Some(text) => Value::String(text.trim_start_matches("tcp:").to_owned()),
            None => item.clone(),
        };
        let port = u16::try_from(integer(parameter, &bare, 1, 65535)?).unwrap_or(u16::MAX);
        if ports.contains(&port) {
            return Err(ParameterError::new(
                parameter,
                format!("port {port} is listed twice"),
            ));
        }
        ports.push(port);
    }
    if ports.len() > 32 {
        return Err(ParameterError::new(
            parameter,
            format!("{} ports: at most 32", ports.len()),
        ));
    }
    Ok(ports)
}

fn policy(value: &Value) -> Result<u64, ParameterError> {
    let raw = match value {
        Value::Number(number) => number.as_u64(),
        Value::String(text) => {
            let digits = text
                .trim()
                .strip_prefix("0x")
                .or_else(|| text.trim().strip_prefix("0X"));
            match digits {
                Some(digits) => u64::from_str_radix(digits, 16).ok(),
                None => text.trim().parse().ok(),
            }
        }
        _ => None,
    }
    .ok_or_else(|| {
        ParameterError::new(
            "guest-policy",
            format!("{value} is not a policy (hexadecimal like \"0x30000\", or a number)"),
        )
    })?;
    GuestPolicy::new(raw)
        .map_err(|error| ParameterError::new("guest-policy", format!("{raw:#x}: {error}")))?;
    Ok(raw)
}

fn tcb(value: &Value) -> Result<MinimumTcb, ParameterError> {
    let Value::Object(components) = value else {
        return Err(ParameterError::new(
            "minimum-tcb",
            format!("{value} is not an object like {{\"snp\": 22, \"microcode\": 213}}"),
        ));
    };
    let mut tcb = MinimumTcb::default();
    for (component, level) in components {
        let slot = match component.as_str() {
            "fmc" => &mut tcb.fmc,
            "bootloader" => &mut tcb.bootloader,
            "tee" => &mut tcb.tee,
            "snp" => &mut tcb.snp,
            "microcode" => &mut tcb.microcode,
            other => {
                return Err(ParameterError::new(
                    "minimum-tcb",
                    format!("{other:?} is no TCB component (fmc, bootloader, tee, snp, microcode)"),
                ))
            }
        };
        let level = integer(&format!("minimum-tcb.{component}"), level, 0, 255)?;
        *slot = Some(u8::try_from(level).unwrap_or(u8::MAX));
    }
    Ok(tcb)
}

fn measurement(value: &Value) -> Result<Vec<u8>, ParameterError> {
    let text = string("expected-measurement", value)?;
    match hex::decode(text.trim()) {
        Ok(bytes) if bytes.len() == 48 => Ok(bytes),
        _ => Err(ParameterError::new(
            "expected-measurement",
            format!("{text:?} is not an SEV-SNP launch measurement (96 hex digits)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    fn request(software_type: SoftwareType, value: Value) -> Result<Request, ParameterError> {
        parse(software_type, &params(value), "debian")
    }

    #[test]
    fn defaults_follow_the_kvm_release_and_the_software_type() {
        let plain = request(SoftwareType::Default, json!({})).expect("valid");
        assert_eq!(
            (
                plain.ram_size,
                plain.cpu_count,
                plain.mode,
                plain.guest_policy
            ),
            (4096, 2, ConfidentialMode::None, 0)
        );
        assert_eq!(plain.image, "debian");
        assert!(plain.nat_rules.is_empty() && plain.disk_size.is_none());
        let snp = request(SoftwareType::SevSnp, json!({})).expect("valid");
        assert_eq!(snp.mode, ConfidentialMode::SevSnp);
        assert_eq!(snp.guest_policy, DEFAULT_GUEST_POLICY);
    }

    #[test]
    fn every_parameter_is_read() {
        let measurement = "ab".repeat(48);
        let parsed = request(
            SoftwareType::SevSnp,
            json!({
                "name": "web-1", "image": "debian-12", "ram-size": 2048, "cpu-count": "4",
                "disk-size": 10, "nat-rules": [22, 80], "guest-policy": "0x30000",
                "minimum-tcb": {"snp": 8, "microcode": 115},
                "expected-measurement": measurement, "authorized-keys": "",
                "$schema": "instance-input-schema.json",
            }),
        )
        .expect("valid");
        assert_eq!(parsed.name.as_deref(), Some("web-1"));
        assert_eq!((parsed.ram_size, parsed.cpu_count), (2048, 4));
        assert_eq!(parsed.disk_size, Some(10));
        assert_eq!(parsed.nat_rules, vec![22, 80]);
        let tcb = parsed.minimum_tcb.expect("tcb");
        assert_eq!(
            (tcb.snp, tcb.microcode, tcb.tee),
            (Some(8), Some(115), None)
        );
        assert_eq!(parsed.expected_measurement, Some(vec![0xab; 48]));
        // KVM's space-separated form of nat-rules.
        let kvm =
            request(SoftwareType::Default, json!({"nat-rules": "22 80 tcp:443"})).expect("valid");
        assert_eq!(kvm.nat_rules, vec![22, 80, 443]);
    }

    #[test]
    fn bad_parameters_are_refused_by_name() {
        let cases = [
            (
                json!({"ram-size": 1000}),
                "ram-size",
                "below the minimum of 1024",
            ),
            (
                json!({"ram-size": 1536 + 100}),
                "ram-size",
                "multiple of 512",
            ),
            (
                json!({"ram-size": "lots"}),
                "ram-size",
                "not a whole number",
            ),
            (json!({"cpu-count": 0}), "cpu-count", "below the minimum"),
            (json!({"disk-size": 0}), "disk-size", "below the minimum"),
            (json!({"nat-rules": [22, 22]}), "nat-rules", "twice"),
            (json!({"nat-rules": "udp:53"}), "nat-rules", "only TCP"),
            (json!({"nat-rules": [0]}), "nat-rules", "below the minimum"),
            (
                json!({"authorized-keys": "ssh-ed25519 AAAA me"}),
                "authorized-keys",
                "not supported",
            ),
            (json!({"use-tap": true}), "use-tap", "not a parameter"),
            (
                json!({"confidential-mode": "tdx"}),
                "confidential-mode",
                "none of",
            ),
            (
                json!({"guest-policy": "0x30000"}),
                "guest-policy",
                "confidential VMs only",
            ),
            (
                json!({"encrypted-disk-size": 1}),
                "encrypted-disk-size",
                "needs confidential-mode sev-snp",
            ),
            (
                json!({"expected-measurement": "00"}),
                "expected-measurement",
                "needs confidential-mode sev-snp",
            ),
            (json!({"name": "not a name"}), "name", "host name"),
        ];
        for (value, parameter, problem) in cases {
            let error =
                request(SoftwareType::Default, value.clone()).expect_err(&value.to_string());
            assert_eq!(error.parameter, parameter, "{value}");
            assert!(
                error.to_string().starts_with(&format!("{parameter}: ")),
                "{error}"
            );
            assert!(error.problem.contains(problem), "{value}: {error}");
        }
        let snp_cases = [
            (json!({"confidential-mode": "none"}), "confidential-mode"),
            (json!({"guest-policy": "0x10000"}), "guest-policy"),
            (json!({"guest-policy": "zz"}), "guest-policy"),
            (json!({"minimum-tcb": {"pl": 1}}), "minimum-tcb"),
            (json!({"minimum-tcb": {"snp": 300}}), "minimum-tcb.snp"),
            (
                json!({"expected-measurement": "abcd"}),
                "expected-measurement",
            ),
            (
                json!({"expected-measurement": "ab".repeat(48), "encrypted-disk-size": 1}),
                "expected-measurement",
            ),
        ];
        for (value, parameter) in snp_cases {
            let error = request(SoftwareType::SevSnp, value.clone()).expect_err(&value.to_string());
            assert_eq!(error.parameter, parameter, "{value}: {error}");
        }
        assert_eq!(
            SoftwareType::parse("kvm-cluster")
                .expect_err("unknown")
                .parameter,
            "software type"
        );
    }

    #[test]
    fn json_in_xml_and_flat_strings_both_decode() {
        let wrapped = params(json!({"_": "{\"ram-size\": 2048}"}));
        let decoded = decode(&wrapped).expect("decodes");
        assert_eq!(decoded["ram-size"], 2048);
        let flat = params(json!({"ram-size": "2048", "cpu-count": "1"}));
        let parsed = parse(
            SoftwareType::Default,
            &decode(&flat).expect("flat"),
            "debian",
        )
        .expect("valid");
        assert_eq!((parsed.ram_size, parsed.cpu_count), (2048, 1));
        for bad in [json!({"_": 3}), json!({"_": "[1]"}), json!({"_": "{"})] {
            assert_eq!(
                decode(&params(bad.clone())).expect_err("bad").parameter,
                "_",
                "{bad}"
            );
        }
    }
}

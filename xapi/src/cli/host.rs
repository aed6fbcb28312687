//! `hsev host`: the pool's hypervisor hosts (`hsev.v1.HostService`,
//! admins only): what each can run, as probed, and what is allocated.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hsev_proto::v1::{
    Host, HostCapabilities, HostRef, ListHostsRequest, SetHostStateRequest, SevCapabilities,
};
use serde_json::{json, Value};

use super::client::{
    self, print_json, print_stdout, render_table, Connection, ConnectionArgs, Fields, RemoteError,
};
use super::output::OutputFormat;

/// `hsev host ...` and its connection flags.
#[derive(Debug, Args)]
pub struct HostArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: HostCommand,
}

/// Host commands.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// List the hosts of the pool.
    List {
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Every capability of a host, as last probed, and its allocations.
    Show {
        /// Host name.
        host: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Probe a host again and show what was found.
    Probe {
        /// Host name.
        host: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Stop placing new VMs on a host (its VMs run on).
    Disable {
        /// Host name.
        host: String,
    },
    /// Place new VMs on a host again.
    Enable {
        /// Host name.
        host: String,
    },
    /// Maintenance: `enter` disables the host and cold-migrates every VM off
    /// it (what cannot move is listed, the host stays in maintenance);
    /// `exit` enables it again.
    Maintenance {
        /// `enter` or `exit`.
        #[arg(value_parser = ["enter", "exit"])]
        action: String,
        /// Host name.
        host: String,
    },
    /// Remove a host from the pool and revoke its certificate (refused while
    /// VMs are placed on it).
    Eject {
        /// Host name.
        host: String,
    },
}

/// Runs a host command.
pub fn run(args: &HostArgs) -> ExitCode {
    client::run(&args.connection, async |connection| {
        execute(connection, &args.command).await
    })
}

async fn execute(connection: &Connection, command: &HostCommand) -> Result<ExitCode, RemoteError> {
    let mut hosts = connection.hosts();
    match command {
        HostCommand::List { output } => {
            let list = hosts.list_hosts(ListHostsRequest {}).await?.into_inner();
            match output {
                OutputFormat::Json => {
                    print_json(&Value::Array(list.hosts.iter().map(host_json).collect()))?;
                }
                OutputFormat::Text if list.hosts.is_empty() => eprintln!("no hosts"),
                OutputFormat::Text => print_stdout(&host_table(&list.hosts))?,
            }
        }
        HostCommand::Show { host, output } => {
            let request = HostRef { host: host.clone() };
            print_host(&hosts.get_host(request).await?.into_inner(), *output)?;
        }
        HostCommand::Probe { host, output } => {
            let request = HostRef { host: host.clone() };
            print_host(&hosts.probe_host(request).await?.into_inner(), *output)?;
        }
        HostCommand::Disable { host } => set_state(connection, host, "disabled").await?,
        HostCommand::Enable { host } => set_state(connection, host, "up").await?,
        HostCommand::Maintenance { action, host } => {
            let state = if action == "enter" {
                "maintenance"
            } else {
                "up"
            };
            set_state(connection, host, state).await?;
        }
        HostCommand::Eject { host } => {
            let request = HostRef { host: host.clone() };
            hosts.eject_host(request).await?;
            print_stdout(&format!(
                "host {host} ejected; its certificate is revoked\n"
            ))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets a host's state, streaming an evacuation's progress; prints the
/// outcome.
async fn set_state(connection: &Connection, host: &str, state: &str) -> Result<(), RemoteError> {
    let request = SetHostStateRequest {
        host: host.to_owned(),
        state: state.to_owned(),
    };
    let mut stream = connection
        .hosts()
        .set_host_state(request)
        .await?
        .into_inner();
    let mut last = String::new();
    while let Some(step) = stream.message().await? {
        if step.step == "done" {
            last = step.detail;
        } else {
            eprintln!("[{:>3}%] {}: {}", step.percent, step.step, step.detail);
        }
    }
    print_stdout(&format!("{last}\n"))
}

fn print_host(host: &Host, output: OutputFormat) -> Result<(), RemoteError> {
    match output {
        OutputFormat::Json => print_json(&host_json(host)),
        OutputFormat::Text => print_stdout(&render_host(host)),
    }
}

/// The most protective mode the firmware offers: `sev-snp`, `sev-es`,
/// `sev` or `none`.
fn best_mode(sev: &SevCapabilities) -> &'static str {
    if sev.snp {
        "sev-snp"
    } else if sev.sev_es {
        "sev-es"
    } else if sev.sev {
        "sev"
    } else {
        "none"
    }
}

fn sev_json(sev: &SevCapabilities) -> Value {
    json!({
        "simulated": sev.simulated,
        "sev": sev.sev,
        "sev_es": sev.sev_es,
        "snp": sev.snp,
        "product": sev.product,
        "firmware_version": sev.firmware_version,
        "reported_tcb": sev.reported_tcb,
        "asids_total": sev.asids_total,
        "asids_free": sev.asids_free,
        "chip_id": sev.chip_id,
    })
}

fn capabilities_json(capabilities: &HostCapabilities) -> Value {
    json!({
        "cpus": capabilities.cpus,
        "memory_mib": capabilities.memory_mib,
        "accelerator": capabilities.accelerator,
        "accelerator_reason": capabilities.accelerator_reason,
        "driver": capabilities.driver,
        "driver_version": capabilities.driver_version,
        "sev": capabilities.sev.as_ref().map(sev_json),
        "debug_policy_allowed": capabilities.debug_policy_allowed,
    })
}

/// A host as one JSON document.
pub fn host_json(host: &Host) -> Value {
    json!({
        "name": host.name,
        "status": host.status,
        "status_reason": host.status_reason,
        "address": host.address,
        "coordinator": host.coordinator,
        "labels": host.labels,
        "capabilities": host.capabilities.as_ref().map(capabilities_json),
        "vcpus_allocated": host.vcpus_allocated,
        "memory_mib_allocated": host.memory_mib_allocated,
        "vms": host.vms,
        "probed_at": host.probed_at,
    })
}

/// What the host is in its pool.
fn role(host: &Host) -> &'static str {
    match (host.coordinator, host.address.is_empty()) {
        (true, true) => "coordinator (a pool of one host)",
        (true, false) => "coordinator",
        (false, _) => "member",
    }
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() {
        "-"
    } else {
        text
    }
}

/// Every field of a host, for people.
pub fn render_host(host: &Host) -> String {
    let mut out = String::new();
    let capabilities = host.capabilities.as_ref();
    let sev = capabilities.and_then(|capabilities| capabilities.sev.as_ref());
    if sev.is_some_and(|sev| sev.simulated) {
        out.push_str("SIMULATED SEV firmware: no confidentiality\n");
    }
    let mut fields = Fields::default();
    fields.add("name", &host.name);
    fields.add("status", or_dash(&host.status));
    fields.add_nonempty("status reason", &host.status_reason);
    fields.add("role", role(host));
    fields.add("address", or_dash(&host.address));
    if !host.labels.is_empty() {
        fields.add("labels", host.labels.join(", "));
    }
    fields.add("probed at", or_dash(&host.probed_at));
    match capabilities {
        None => fields.add("capabilities", "not probed yet"),
        Some(capabilities) => {
            fields.add("cpus", capabilities.cpus.to_string());
            fields.add("memory", format!("{} MiB", capabilities.memory_mib));
            let reason = if capabilities.accelerator_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", capabilities.accelerator_reason)
            };
            fields.add(
                "accelerator",
                format!("{}{reason}", or_dash(&capabilities.accelerator)),
            );
            let version = if capabilities.driver_version.is_empty() {
                String::new()
            } else {
                format!(" ({})", capabilities.driver_version)
            };
            fields.add(
                "driver",
                format!("{}{version}", or_dash(&capabilities.driver)),
            );
            fields.add(
                "debug policies",
                if capabilities.debug_policy_allowed {
                    "allowed"
                } else {
                    "refused"
                },
            );
            match sev {
                None => fields.add("sev", "unknown"),
                Some(sev) => {
                    fields.add(
                        "sev",
                        format!(
                            "{}sev {}, sev-es {}, sev-snp {}",
                            if sev.simulated { "SIMULATED: " } else { "" },
                            yes_no(sev.sev),
                            yes_no(sev.sev_es),
                            yes_no(sev.snp)
                        ),
                    );
                    fields.add("product", or_dash(&sev.product));
                    fields.add("firmware", or_dash(&sev.firmware_version));
                    fields.add("reported tcb", or_dash(&sev.reported_tcb));
                    fields.add("chip id", or_dash(&sev.chip_id));
                    fields.add(
                        "asids",
                        format!("{} free of {}", sev.asids_free, sev.asids_total),
                    );
                }
            }
        }
    }
    let (cpus, memory) = capabilities.map_or((String::from("?"), String::from("?")), |c| {
        (c.cpus.to_string(), c.memory_mib.to_string())
    });
    fields.add(
        "allocated",
        format!(
            "{} of {cpus} vCPUs, {} of {memory} MiB, {} VMs",
            host.vcpus_allocated, host.memory_mib_allocated, host.vms
        ),
    );
    out.push_str(&fields.render());
    out
}

/// The `list` table; the coordinator is marked `*`.
pub fn host_table(hosts: &[Host]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|host| {
            let capabilities = host.capabilities.clone().unwrap_or_default();
            let (sev, asids) = match &capabilities.sev {
                Some(sev) => {
                    let mut text = best_mode(sev).to_owned();
                    if !sev.product.is_empty() {
                        text = format!("{text} {}", sev.product);
                    }
                    if sev.simulated {
                        text.push_str(" (sim)");
                    }
                    (text, format!("{}/{}", sev.asids_free, sev.asids_total))
                }
                None => ("-".to_owned(), "-".to_owned()),
            };
            vec![
                if host.coordinator {
                    format!("{} *", host.name)
                } else {
                    host.name.clone()
                },
                or_dash(&host.status).to_owned(),
                or_dash(&host.address).to_owned(),
                or_dash(&capabilities.driver).to_owned(),
                or_dash(&capabilities.accelerator).to_owned(),
                sev,
                asids,
                format!("{}/{}", host.vcpus_allocated, capabilities.cpus),
                format!("{}/{}", host.memory_mib_allocated, capabilities.memory_mib),
                host.vms.to_string(),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "STATUS",
            "ADDRESS",
            "DRIVER",
            "ACCEL",
            "SEV",
            "ASIDS FREE",
            "VCPUS",
            "MEMORY MIB",
            "VMS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Host {
        Host {
            name: "host-a".into(),
            status: "up".into(),
            capabilities: Some(HostCapabilities {
                cpus: 16,
                memory_mib: 65536,
                accelerator: "tcg".into(),
                accelerator_reason: "no svm/vmx flag".into(),
                driver: "qemu".into(),
                driver_version: "QEMU emulator version 10.0.2".into(),
                sev: Some(SevCapabilities {
                    simulated: true,
                    sev: true,
                    sev_es: true,
                    snp: true,
                    product: "genoa".into(),
                    firmware_version: "1.55 build 40".into(),
                    reported_tcb: "bootloader=10 tee=0 snp=23 microcode=25".into(),
                    asids_total: 16,
                    asids_free: 12,
                    chip_id: "00ff".into(),
                }),
                debug_policy_allowed: false,
            }),
            vcpus_allocated: 6,
            memory_mib_allocated: 8192,
            vms: 3,
            probed_at: "2025-06-01T00:00:00Z".into(),
            address: String::new(),
            labels: Vec::new(),
            status_reason: String::new(),
            coordinator: true,
        }
    }

    #[test]
    fn show_names_every_capability() {
        let text = render_host(&sample());
        assert!(text.starts_with("SIMULATED SEV firmware: no confidentiality\n"));
        for expected in [
            "accelerator:    tcg (no svm/vmx flag)",
            "driver:         qemu (QEMU emulator version 10.0.2)",
            "sev:            SIMULATED: sev yes, sev-es yes, sev-snp yes",
            "reported tcb:   bootloader=10 tee=0 snp=23 microcode=25",
            "asids:          12 free of 16",
            "allocated:      6 of 16 vCPUs, 8192 of 65536 MiB, 3 VMs",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
    }

    #[test]
    fn the_table_sums_up_each_host() {
        assert_eq!(
            host_table(&[sample()]),
            "NAME      STATUS  ADDRESS  DRIVER  ACCEL  SEV                  ASIDS FREE  VCPUS  MEMORY MIB  VMS\n\
             host-a *  up      -        qemu    tcg    sev-snp genoa (sim)  12/16       6/16   8192/65536  3\n"
        );
        assert_eq!(
            host_json(&sample())["capabilities"]["sev"]["asids_free"],
            12
        );
    }
}

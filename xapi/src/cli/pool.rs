//! `hsev pool`: the pool itself (admins): the tokens new hosts join with,
//! and whether its HA VMs survive host failures.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use hsev_proto::v1::{CreateJoinTokenRequest, HaPlanRequest};
use serde_json::json;

use super::client::{self, print_json, print_stdout, Connection, ConnectionArgs, RemoteError};
use super::output::OutputFormat;

/// `hsev pool ...` and its connection flags.
#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: PoolCommand,
}

/// Pool commands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Join tokens.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
    /// High availability.
    #[command(subcommand)]
    Ha(HaCommand),
}

/// `hsev pool ha ...`.
#[derive(Debug, Subcommand)]
pub enum HaCommand {
    /// Whether every running HA VM could be restarted, by priority within
    /// the other hosts' capacity, if any N hosts failed; exit 1 if not.
    Plan {
        /// How many hosts may fail at once.
        #[arg(long, value_name = "N", default_value_t = 1)]
        host_failures: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// `hsev pool join-token ...`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// A single-use, expiring token for `hsevd join` on a new host: it
    /// holds the coordinator's address, a secret and the pool CA's
    /// fingerprint.
    Create {
        /// How long it may be used: `30m`, `1h`, `3600s` [default: 1h].
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// `90s`, `30m`, `2h`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30m or 1h"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    if seconds == 0 || seconds > u64::from(u32::MAX) {
        return Err(format!("{text:?}: between 1 s and 136 years"));
    }
    Ok(Duration::from_secs(seconds))
}

/// Runs a pool command.
pub fn run(args: &PoolArgs) -> ExitCode {
    client::run(&args.connection, async |connection| {
        execute(connection, &args.command).await
    })
}

async fn execute(connection: &Connection, command: &PoolCommand) -> Result<ExitCode, RemoteError> {
    match command {
        PoolCommand::JoinToken(JoinTokenCommand::Create { ttl, output }) => {
            join_token(connection, *ttl, *output).await
        }
        PoolCommand::Ha(HaCommand::Plan {
            host_failures,
            output,
        }) => ha_plan(connection, *host_failures, *output).await,
    }
}

async fn ha_plan(
    connection: &Connection,
    host_failures: u32,
    output: OutputFormat,
) -> Result<ExitCode, RemoteError> {
    let plan = connection
        .hosts()
        .plan_ha(HaPlanRequest { host_failures })
        .await?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&json!({
            "host_failures": host_failures,
            "restartable": plan.restartable,
            "scenarios": plan.scenarios,
            "shortfalls": plan.shortfalls,
        }))?,
        OutputFormat::Text => {
            let mut text = if plan.restartable {
                format!(
                    "every HA VM can be restarted if any {host_failures} hosts fail ({} cases)\n",
                    plan.scenarios
                )
            } else {
                format!(
                    "NOT every HA VM can be restarted if {host_failures} hosts fail ({} of {} \
                     cases fall short):\n",
                    plan.shortfalls.len(),
                    plan.scenarios
                )
            };
            for shortfall in &plan.shortfalls {
                text.push_str(&format!("  {shortfall}\n"));
            }
            print_stdout(&text)?;
        }
    }
    Ok(if plan.restartable {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn join_token(
    connection: &Connection,
    ttl: Option<Duration>,
    output: OutputFormat,
) -> Result<ExitCode, RemoteError> {
    let request = CreateJoinTokenRequest {
        ttl_seconds: ttl
            .map(|ttl| u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX))
            .unwrap_or(0),
    };
    let token = connection
        .hosts()
        .create_join_token(request)
        .await?
        .into_inner();
    match output {
        OutputFormat::Json => print_json(&json!({
            "token": token.token,
            "expires_at": token.expires_at,
            "ca_fingerprint": token.ca_fingerprint,
        }))?,
        OutputFormat::Text => {
            eprintln!(
                "single use, until {}; pool CA {}",
                token.expires_at, token.ca_fingerprint
            );
            print_stdout(&format!("{}\n", token.token))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

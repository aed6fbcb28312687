//! `hsev slapos`: HyperSEV as a compute node of a SlapOS master (the
//! connector itself is [`crate::slapos`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::slapos::{Config, Node};

/// SlapOS commands.
#[derive(Debug, Subcommand)]
pub enum SlaposCommand {
    /// Serve a SlapOS master as a compute node: one partition per VM slot
    /// of the pool, each instance of HyperSEV's software release a VM.
    /// Runs until SIGTERM or Ctrl-C; SIGUSR1 asks for a pass at once.
    Node(NodeArgs),
}

/// `hsev slapos node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The SlapOS master's URL (overrides `master.url` in the config).
    #[arg(long, value_name = "URL")]
    master: Option<String>,
    /// The connector's configuration (TOML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Run one pass and exit: 0 when it converged, 1 when it could not.
    #[arg(long)]
    once: bool,
}

/// Runs a SlapOS command.
pub fn run(command: &SlaposCommand) -> ExitCode {
    let SlaposCommand::Node(args) = command;
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("HSEV_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(&args.config, args.master.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("hsev: error: {error}");
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
    let outcome = runtime.block_on(async {
        let mut node = Node::new(config)?;
        if args.once {
            node.pass().await.map_err(|error| error.to_string())
        } else {
            node.run().await
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("hsev: error: {message}");
            ExitCode::from(1)
        }
    }
}

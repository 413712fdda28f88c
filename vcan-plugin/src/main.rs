//! The vcan-plugin daemon: flags, logging, and running [`vcan_plugin::daemon`]; or, with the
//! `fault` command, a client of the running daemon's control socket ([`vcan_plugin::control`]).

use std::io::IsTerminal;
use std::path::Path;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use vcan_plugin::config::{Command, Config, FaultCommand, LogFormat};
use vcan_plugin::control::{self, ActiveFault, Reply};

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::parse();
    if let Some(Command::Fault(fault)) = config.command.take() {
        // The error alone, without anyhow's backtrace: it is for the person running the
        // pipeline, and already names the cause.
        if let Err(e) = fault_command(&config.control_socket(), &fault).await {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        return Ok(());
    }
    init_logging(config.log_format);
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let signals = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down");
            shutdown.cancel();
        })
    };
    let result = vcan_plugin::daemon::run(config, shutdown).await;
    signals.abort();
    Ok(result?)
}

/// Sends the fault command's request and prints the reply; an error reply is an error (exit
/// status 1) so that a pipeline stops when its fault was not injected.
async fn fault_command(socket: &Path, command: &FaultCommand) -> anyhow::Result<()> {
    let request = command.request()?;
    match control::request(socket, &request).await? {
        Reply::Ok { message, faults } => {
            println!("{message}");
            print_faults(&faults);
            Ok(())
        }
        Reply::Error { message } => Err(anyhow::anyhow!(message)),
    }
}

/// The faults as an aligned table.
fn print_faults(faults: &[ActiveFault]) {
    if faults.is_empty() {
        return;
    }
    let rows: Vec<[String; 4]> = faults
        .iter()
        .map(|f| {
            [
                f.bus.clone(),
                f.target.to_string(),
                f.kind.to_string(),
                control::request::human_duration(f.remaining),
            ]
        })
        .collect();
    let header = ["BUS", "TARGET", "FAULT", "REMAINING"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    for row in std::iter::once(header.map(String::from)).chain(rows) {
        let line = row
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ");
        println!("{}", line.trim_end());
    }
}

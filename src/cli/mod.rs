//! The command line: `run`, `dev`, `send`, `status`, `doctor`, `migrate`, `fcm-emulator`. Exit codes: 0 ok, 1 failure,
//! 64 invalid settings or arguments.
//!
//! This module parses the arguments and dispatches; each subcommand's arguments and body are in
//! a file of its own, named after it.

mod dev;
mod doctor;
mod fcm_emulator;
mod migrate;
mod run;
mod send;
mod status;

use clap::{Parser, Subcommand};

use crate::config::{EXIT_INVALID_SETTINGS, LogFormat, Settings, SettingsArgs};

#[derive(Parser, Debug)]
#[command(
    name = "ffpush",
    version,
    about = "Sends FlutterFlow push notifications from Firestore through FCM HTTP v1"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the worker: listen to the notification collections and send (the Cloud Run entry point).
    Run(Box<SettingsArgs>),
    /// Run everything locally: Firestore emulator, FCM emulator, a key for it, and the worker.
    Dev(dev::DevArgs),
    /// Write a notification document the way FlutterFlow does.
    Send(Box<send::SendArgs>),
    /// List the latest notifications of both collections: status, counts, time taken, errors.
    Status(Box<status::StatusArgs>),
    /// Check settings, credentials, Firestore, FCM permission, and optionally one user's tokens.
    Doctor(Box<doctor::DoctorArgs>),
    /// Run the data migrations (dry run first: `--dry-run`).
    Migrate(Box<migrate::MigrateArgs>),
    /// Serve the FCM emulator (HTTP v1 send API and OAuth2 token endpoint) for tests and local runs.
    FcmEmulator(fcm_emulator::EmulatorArgs),
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ffpush: cannot start the async runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Run(args) => match Settings::from_args(&args) {
            Ok(settings) => {
                crate::logging::init(&settings.log_format);
                run::run(settings).await
            }
            Err(e) => return invalid(e),
        },
        Command::Dev(args) => {
            crate::logging::init(&LogFormat::Text);
            dev::dev(args).await
        }
        Command::Send(args) => match Settings::from_args(&args.settings) {
            Ok(settings) => send::send(settings, *args).await,
            Err(e) => return invalid(e),
        },
        Command::Status(args) => match Settings::from_args(&args.settings) {
            Ok(settings) => status::status(settings, *args).await,
            Err(e) => return invalid(e),
        },
        Command::Doctor(args) => return doctor::doctor(*args).await,
        Command::Migrate(args) => {
            if args.list {
                migrate::list();
                return 0;
            }
            match Settings::from_args(&args.settings) {
                Ok(settings) => migrate::migrate(settings, *args).await,
                Err(e) => return invalid(e),
            }
        }
        Command::FcmEmulator(args) => {
            crate::logging::init(&LogFormat::Text);
            fcm_emulator::fcm_emulator(args).await
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ffpush: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                EXIT_INVALID_SETTINGS
            } else {
                1
            }
        }
    }
}

fn invalid(errors: crate::config::ConfigErrors) -> i32 {
    for e in errors.iter() {
        eprintln!("ffpush: {e}");
    }
    EXIT_INVALID_SETTINGS
}

/// A mistake in the command's arguments (exit code 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Resolves on SIGTERM or SIGINT.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

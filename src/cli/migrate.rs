//! `ffpush migrate`: the data migrations, their plan (`--dry-run`) and their list (`--list`).

use anyhow::{Context as _, bail};

use super::Usage;
use crate::config::{Settings, SettingsArgs};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct MigrateArgs {
    #[command(flatten)]
    pub(super) settings: SettingsArgs,
    /// Print the plan (what would be created or deleted) without writing anything.
    #[arg(long)]
    dry_run: bool,
    /// Allow migrations that delete data (e.g. 002_remove_duplicate_tokens).
    #[arg(long)]
    allow_destructive: bool,
    /// Run only this migration (full id or its number, e.g. 002).
    #[arg(long)]
    only: Option<String>,
    /// List the migrations and exit.
    #[arg(long)]
    pub(super) list: bool,
}

/// `--list`: every migration, one line each.
pub(super) fn list() {
    for (id, description, destructive) in crate::migrate::list() {
        let mark = if destructive { " (destructive)" } else { "" };
        println!("{id}{mark}: {description}");
    }
}

pub(super) async fn migrate(settings: Settings, args: MigrateArgs) -> anyhow::Result<()> {
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let options = crate::migrate::MigrateOptions {
        dry_run: args.dry_run,
        allow_destructive: args.allow_destructive,
        only: args.only,
    };
    let reports = crate::migrate::run(&store, &options)
        .await
        .map_err(|e| match e {
            crate::migrate::Error::UnknownMigration(..) => anyhow::Error::new(Usage(e.to_string())),
            e => anyhow::Error::new(e),
        })?;
    let mut refused = false;
    for report in &reports {
        println!("{report}");
        refused |= matches!(
            report.status,
            crate::migrate::MigrationStatus::RefusedDestructive
                | crate::migrate::MigrationStatus::Blocked
        );
    }
    if refused {
        bail!(
            "some migrations did not run: re-run with --allow-destructive after reading the plan above"
        );
    }
    Ok(())
}

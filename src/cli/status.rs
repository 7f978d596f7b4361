//! `ffpush status`: the latest notifications of both collections, once or refreshed (`--watch`).

use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;

use super::{Usage, terminated};
use crate::config::{Settings, SettingsArgs, parse_duration};
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    pub(super) settings: SettingsArgs,
    /// How many notifications to list (1-1000), most recent activity first.
    #[arg(long, default_value_t = 20)]
    limit: usize,
    /// Only failed notifications.
    #[arg(long)]
    failed: bool,
    /// Only notifications created, started or finished this recently, e.g. 1h, 30m.
    #[arg(long)]
    since: Option<String>,
    /// Print a JSON array instead of the table: every field, the whole error and warning.
    #[arg(long)]
    json: bool,
    /// Refresh until Ctrl-C, like top.
    #[arg(long)]
    watch: bool,
    /// How often --watch refreshes.
    #[arg(long, default_value = "5s")]
    interval: String,
}

pub(super) async fn status(settings: Settings, args: StatusArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    if !(1..=1000).contains(&args.limit) {
        return Err(Usage(format!("--limit {}: give 1 to 1000", args.limit)).into());
    }
    let since = match &args.since {
        Some(raw) => Some(
            parse_duration(raw)
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    Usage(format!(
                        "--since {raw:?}: use a duration such as 1h, 30m or 90s"
                    ))
                })?,
        ),
        None => None,
    };
    let interval = parse_duration(&args.interval)
        .filter(|d| *d >= Duration::from_secs(1))
        .ok_or_else(|| {
            Usage(format!(
                "--interval {:?}: use a duration of 1s or more, such as 5s",
                args.interval
            ))
        })?;
    let options = crate::recent::Options {
        limit: args.limit,
        failed_only: args.failed,
        since,
    };
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let collections = [
        settings.collection.as_str(),
        settings.user_collection.as_str(),
    ];
    let render = |entries: &[crate::recent::Entry], now| -> anyhow::Result<String> {
        Ok(if args.json {
            serde_json::to_string_pretty(entries)? + "\n"
        } else {
            crate::recent::table(entries, now)
        })
    };
    if !args.watch {
        let now = Utc::now();
        let entries = crate::recent::latest(&store, &collections, &options, now)
            .await
            .context("reading the notifications")?;
        print!("{}", render(&entries, now)?);
        return Ok(());
    }
    let stop = terminated();
    tokio::pin!(stop);
    loop {
        let now = Utc::now();
        // Like top: clear the screen and redraw (JSON is printed one array after another).
        let mut screen = if args.json {
            String::new()
        } else {
            format!(
                "\x1b[H\x1b[2Jffpush status · project {} · {} UTC · every {}s · Ctrl-C stops\n\n",
                settings.project,
                now.format("%H:%M:%S"),
                interval.as_secs()
            )
        };
        match crate::recent::latest(&store, &collections, &options, now).await {
            Ok(entries) => screen.push_str(&render(&entries, now)?),
            // Keep watching: Firestore being briefly unavailable is what one may be watching for.
            Err(e) => screen.push_str(&format!(
                "reading the notifications failed: {e}; trying again in {}s\n",
                interval.as_secs()
            )),
        }
        print!("{screen}");
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

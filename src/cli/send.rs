//! `ffpush send`: a notification document written the way FlutterFlow does, and `--wait` for
//! its outcome.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};

use super::Usage;
use crate::config::{Settings, SettingsArgs, parse_duration};
use crate::fields;
use crate::model::pb::value::ValueType;
use crate::model::user_doc_path;
use crate::store::{self, Store};

#[derive(clap::Args, Debug)]
pub(super) struct SendArgs {
    #[command(flatten)]
    pub(super) settings: SettingsArgs,
    /// notification_title (optional with --silent)
    #[arg(long)]
    title: Option<String>,
    /// notification_text (optional with --silent)
    #[arg(long)]
    text: Option<String>,
    /// A recipient: a user document path (`users/ID`), or `ID` in the users collection; repeat
    /// for more. None: a broadcast.
    #[arg(long = "user")]
    users: Vec<String>,
    /// Broadcast only: "All", "iOS", "Android".
    #[arg(long)]
    audience: Option<String>,
    /// Broadcast only: `INDEX/COUNT` of FlutterFlow batch notifications, e.g. 3/10.
    #[arg(long)]
    batch: Option<String>,
    #[arg(long)]
    image: Option<String>,
    #[arg(long)]
    sound: Option<String>,
    /// initial_page_name
    #[arg(long)]
    page: Option<String>,
    /// parameter_data (JSON text)
    #[arg(long)]
    params: Option<String>,
    /// Send at this time (RFC 3339, e.g. 2026-11-25T17:00:00Z) instead of now.
    #[arg(long)]
    at: Option<String>,
    /// notification_badge: the app icon's badge count (0 or more).
    #[arg(long)]
    badge: Option<i64>,
    /// android_channel_id: the Android notification channel.
    #[arg(long)]
    channel: Option<String>,
    /// priority: "high" or "normal".
    #[arg(long)]
    priority: Option<String>,
    /// ttl_seconds: how long FCM and APNs keep trying an offline device (0-2419200).
    #[arg(long)]
    ttl: Option<i64>,
    /// collapse_key: a newer message with this key replaces an undelivered older one.
    #[arg(long)]
    collapse_key: Option<String>,
    /// silent: a background data message; nothing is shown.
    #[arg(long)]
    silent: bool,
    /// A `data` entry, KEY=VALUE; repeat for more.
    #[arg(long = "data")]
    data: Vec<String>,
    /// analytics_label: FCM's label for delivery reports (^[a-zA-Z0-9-_.~%]{1,50}$).
    #[arg(long)]
    analytics_label: Option<String>,
    /// The title in a language, LANG=TEXT (notification_title_i18n); repeat for more.
    #[arg(long = "title-i18n")]
    title_i18n: Vec<String>,
    /// The text in a language, LANG=TEXT (notification_text_i18n); repeat for more.
    #[arg(long = "text-i18n")]
    text_i18n: Vec<String>,
    /// dry_run: count the recipients and have FCM validate the message; deliver nothing.
    #[arg(long)]
    dry_run: bool,
    /// target_topic: send to the subscribers of this topic (one request) instead of users.
    #[arg(long)]
    topic: Option<String>,
    /// target_condition: send to the devices matching this condition of topics, e.g.
    /// "'a' in topics && 'b' in topics".
    #[arg(long)]
    condition: Option<String>,
    /// Write into the app users' collection (ff_user_push_notifications) instead.
    #[arg(long)]
    app: bool,
    /// Wait for the worker and print the outcome.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s")]
    wait_timeout: String,
}

pub(super) async fn send(settings: Settings, args: SendArgs) -> anyhow::Result<()> {
    let fields = notification_fields(&args, &settings.users_collection)?;
    let wait_limit = parse_duration(&args.wait_timeout).ok_or_else(|| {
        Usage(format!(
            "--wait-timeout {:?}: use a duration such as 60s",
            args.wait_timeout
        ))
    })?;
    let store = Store::connect(&settings)
        .await
        .context("connecting to Firestore")?;
    let collection = if args.app {
        &settings.user_collection
    } else {
        &settings.collection
    };
    let name = store
        .create(collection, fields)
        .await
        .context("writing the notification")?;
    let relative = store.relative(&name).to_string();
    println!("{relative}");
    if !args.wait {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + wait_limit;
    loop {
        if let Some(doc) = store.get(&relative).await?
            && let status = crate::model::Status::of(&doc)
            && status.is_finished()
        {
            println!("{}", outcome_json(&doc, status.as_str()));
            if matches!(
                status,
                crate::model::Status::Succeeded | crate::model::Status::Validated
            ) {
                return Ok(());
            }
            bail!("the notification {status}");
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no outcome after {wait_limit:?}: is `ffpush run` (or `ffpush dev`) running against this project?"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn outcome_json(doc: &crate::model::pb::Document, status: &str) -> String {
    let mut out = serde_json::Map::new();
    out.insert(fields::STATUS.into(), status.into());
    for field in [
        fields::NUM_SENT,
        fields::NUM_TOKENS,
        fields::NUM_FAILED,
        fields::NUM_TOKENS_REMOVED,
        fields::NUM_USERS_WITHOUT_TOKENS,
    ] {
        if let Some(n) = store::integer_field(doc, field) {
            out.insert(field.into(), n.into());
        }
    }
    for field in [fields::ERROR, fields::WARNING] {
        if let Some(s) = doc.fields.get(field).and_then(crate::model::string_value) {
            out.insert(field.into(), s.into());
        }
    }
    if let Some(counts) = doc.fields.get(fields::ERROR_COUNTS) {
        let counts: serde_json::Map<String, serde_json::Value> =
            crate::claim::read_error_counts(counts)
                .iter()
                .map(|(code, n)| (code.as_str().to_string(), n.into()))
                .collect();
        out.insert(fields::ERROR_COUNTS.into(), counts.into());
    }
    for field in [fields::STARTED_AT, fields::COMPLETED_AT] {
        if let Some(t) = store::timestamp_field(doc, field) {
            out.insert(field.into(), t.to_rfc3339().into());
        }
    }
    serde_json::Value::Object(out).to_string()
}

/// The document FlutterFlow would write for these arguments; a bare `--user` id is a document
/// of the `users` collection.
fn notification_fields(
    args: &SendArgs,
    users: &str,
) -> Result<HashMap<String, crate::model::pb::Value>, Usage> {
    let mut f = HashMap::new();
    // As FlutterFlow: only empty fails; a title of spaces makes a body-only notification. A
    // silent message shows nothing: its text is optional.
    for (name, flag, text) in [
        ("notification_title", "--title", &args.title),
        ("notification_text", "--text", &args.text),
    ] {
        match text.as_deref() {
            Some("") if !args.silent => {
                return Err(Usage(format!("{flag} must not be empty")));
            }
            None if !args.silent => {
                return Err(Usage(format!("{flag} is required (except with --silent)")));
            }
            Some(text) => {
                f.insert(name.to_string(), store::string(text));
            }
            None => {}
        }
    }
    message_options(args, &mut f)?;
    let optional = [
        ("notification_image_url", &args.image),
        ("notification_sound", &args.sound),
        ("initial_page_name", &args.page),
        ("parameter_data", &args.params),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            f.insert(name.to_string(), store::string(v));
        }
    }
    if let Some(params) = &args.params
        && serde_json::from_str::<serde_json::Value>(params).is_err()
    {
        return Err(Usage(format!(
            "--params {params:?} is not JSON text (the app parses it as JSON)"
        )));
    }
    let target = match (&args.topic, &args.condition) {
        (Some(topic), None) => Some(("target_topic", topic)),
        (None, Some(condition)) => Some(("target_condition", condition)),
        (None, None) => None,
        (Some(_), Some(_)) => return Err(Usage("give --topic or --condition, not both".into())),
    };
    if let Some((field, value)) = target {
        if !args.users.is_empty() || args.audience.is_some() || args.batch.is_some() || args.app {
            return Err(Usage(
                "--topic and --condition are their own audience: leave out --user, --audience, --batch and --app".into(),
            ));
        }
        f.insert(field.to_string(), store::string(value));
    } else if !args.users.is_empty() {
        let mut paths = Vec::new();
        for user in &args.users {
            let path = if user.contains('/') {
                user.clone()
            } else {
                format!("{users}/{user}")
            };
            paths.push(user_doc_path(&path).map_err(|e| Usage(format!("--user: {e}")))?);
        }
        f.insert("user_refs".into(), store::string(&paths.join(",")));
        if args.audience.is_some() || args.batch.is_some() {
            return Err(Usage(
                "--audience and --batch are for broadcasts; leave out --user".into(),
            ));
        }
    } else {
        if args.app {
            return Err(Usage(
                "--app notifications need at least one --user (they are never broadcast)".into(),
            ));
        }
        f.insert(
            "target_audience".into(),
            store::string(args.audience.as_deref().unwrap_or("All")),
        );
        if let Some(batch) = &args.batch {
            let parsed = batch
                .split_once('/')
                .and_then(|(i, n)| {
                    Some((i.trim().parse::<i64>().ok()?, n.trim().parse::<i64>().ok()?))
                })
                .filter(|(i, n)| *n > 0 && (0..*n).contains(i));
            let (index, count) = parsed.ok_or_else(|| {
                Usage(format!(
                    "--batch {batch:?}: use INDEX/COUNT with 0 <= INDEX < COUNT, e.g. 3/10"
                ))
            })?;
            f.insert("batch_index".into(), store::integer(index));
            f.insert("num_batches".into(), store::integer(count));
        }
    }
    if let Some(at) = &args.at {
        let at: DateTime<Utc> = DateTime::parse_from_rfc3339(at)
            .map_err(|_| {
                Usage(format!(
                    "--at {at:?}: use RFC 3339, e.g. 2026-11-25T17:00:00Z"
                ))
            })?
            .with_timezone(&Utc);
        f.insert("scheduled_time".into(), store::timestamp(at));
    }
    f.insert("timestamp".into(), store::timestamp(Utc::now()));
    // What the worker would fail the document for, said now instead.
    let source = if args.app {
        crate::model::Source::App
    } else {
        crate::model::Source::Console
    };
    crate::model::Notification::parse(source, &f).map_err(|e| Usage(e.0))?;
    Ok(f)
}

fn pb_value(value: ValueType) -> crate::model::pb::Value {
    crate::model::pb::Value {
        value_type: Some(value),
    }
}

/// The message options' fields from their flags; the values are checked with the document.
fn message_options(
    args: &SendArgs,
    f: &mut HashMap<String, crate::model::pb::Value>,
) -> Result<(), Usage> {
    let texts = [
        ("android_channel_id", &args.channel),
        ("priority", &args.priority),
        ("collapse_key", &args.collapse_key),
        ("analytics_label", &args.analytics_label),
    ];
    for (name, value) in texts {
        if let Some(v) = value {
            f.insert(name.to_string(), store::string(v));
        }
    }
    for (name, value) in [
        ("notification_badge", args.badge),
        ("ttl_seconds", args.ttl),
    ] {
        if let Some(n) = value {
            f.insert(name.to_string(), store::integer(n));
        }
    }
    if args.dry_run {
        f.insert("dry_run".into(), pb_value(ValueType::BooleanValue(true)));
    }
    if args.silent {
        f.insert("silent".into(), pb_value(ValueType::BooleanValue(true)));
    }
    for (field, flag, entries, example) in [
        ("data", "data", &args.data, "kind=chat"),
        (
            "notification_title_i18n",
            "title-i18n",
            &args.title_i18n,
            "de=Hallo",
        ),
        (
            "notification_text_i18n",
            "text-i18n",
            &args.text_i18n,
            "pt-BR=Olá",
        ),
    ] {
        if !entries.is_empty() {
            f.insert(field.into(), string_map(flag, entries, example)?);
        }
    }
    Ok(())
}

/// A map field from repeated `--flag KEY=VALUE` entries.
fn string_map(
    flag: &str,
    entries: &[String],
    example: &str,
) -> Result<crate::model::pb::Value, Usage> {
    let mut map = HashMap::new();
    for entry in entries {
        let (key, value) = entry.split_once('=').ok_or_else(|| {
            Usage(format!(
                "--{flag} {entry:?}: use KEY=VALUE, e.g. --{flag} {example}"
            ))
        })?;
        map.insert(key.to_string(), store::string(value));
    }
    Ok(pb_value(ValueType::MapValue(crate::model::pb::MapValue {
        fields: map,
    })))
}

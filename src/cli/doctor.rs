//! `ffpush doctor`: the operator's checks, one line each; exit code 1 if any failed.

use crate::config::SettingsArgs;

#[derive(clap::Args, Debug)]
pub(super) struct DoctorArgs {
    #[command(flatten)]
    settings: SettingsArgs,
    /// Also check this user's device tokens: `users/UID` or `UID`.
    #[arg(long)]
    user: Option<String>,
}

pub(super) async fn doctor(args: DoctorArgs) -> i32 {
    let checks = crate::doctor::run(&args.settings, args.user.as_deref()).await;
    for check in &checks {
        println!("{check}");
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    println!("{} passed, {failed} failed", checks.len() - failed);
    if failed == 0 { 0 } else { 1 }
}

//! Documents edited or deleted while they are offered, claimed or sent.

mod mid_send {
    //! Edited or deleted while being sent: the lease keeper's next write meets a precondition
    //! failure that is not a takeover.

    use std::collections::HashMap;
    use std::time::Duration;

    use ffpush::config::Settings;
    use ffpush::dev::fcm_emulator::Script;
    use futures::StreamExt;

    use crate::{TestApp, assert_succeeded, num, s, text, wait_until};

    const RATE: u32 = 40;
    const CONCURRENCY: usize = 8;
    const INTERVAL: Duration = Duration::from_millis(200);

    fn tune(s: &mut Settings) {
        s.concurrency = CONCURRENCY;
        s.fcm_rate = RATE;
        s.lease = Duration::from_secs(3);
        s.progress_interval = INTERVAL;
    }

    /// `n` tokens of user `big`, each answered after 20 ms.
    async fn audience(app: &TestApp, n: usize) -> Vec<String> {
        let tokens: Vec<String> = (0..n)
            .map(|i| format!("{}-big-{i:03}", app.project))
            .collect();
        for token in &tokens {
            app.fcm()
                .script(token, Script::Latency(Duration::from_millis(20)));
        }
        futures::stream::iter(tokens.iter().enumerate())
            .for_each_concurrent(16, |(i, token)| async move {
                app.add_token("big", &format!("t{i:03}"), token, "Android")
                    .await
            })
            .await;
        tokens
    }

    fn per_token(app: &TestApp) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for (token, _) in app.delivered() {
            *counts.entry(token).or_insert(0) += 1;
        }
        counts
    }

    /// An app or console write to the document while it is sent (another field, or the
    /// title): the lease is still ours, so the send goes on and nothing is sent twice.
    #[tokio::test]
    async fn a_document_edited_while_it_is_sent_is_finished_by_its_worker_without_duplicates() {
        let app = TestApp::with(tune).await;
        let tokens = audience(&app, 120).await;
        let (worker, _) = app.start_worker().await;
        let doc = app.notify("edited", "users/big").await;
        let name = app.store.doc_name(&doc);
        for (at, field, value) in [
            (30, "note", "edited by the app"),
            (60, "notification_title", "edited title"),
        ] {
            wait_until(Duration::from_secs(60), || app.delivered().len() >= at).await;
            let mut f = HashMap::new();
            f.insert(field.to_string(), s(value));
            app.store
                .update_existing(&name, f, &[])
                .await
                .expect("the app's edit");
        }
        let done = app.finished(&doc).await;
        assert_succeeded(&done);
        assert_eq!(num(&done, "num_sent"), Some(120));
        assert_eq!(
            text(&done, "ffpush_worker"),
            Some(app.settings.worker_id.clone()),
            "finished by the worker that claimed it"
        );
        let counts = per_token(&app);
        assert_eq!(counts.len(), tokens.len(), "every token got it");
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "sent twice: {twice:?}");
        worker.stop().await;
    }

    /// Deleted while sent: sending stops at the next lease write, nothing is written back
    /// (the document is not recreated), and the worker goes on with other work.
    #[tokio::test]
    async fn a_document_deleted_while_it_is_sent_stops_the_send_and_is_not_recreated() {
        let app = TestApp::with(tune).await;
        audience(&app, 120).await;
        let (worker, _) = app.start_worker().await;
        let doc = app.notify("deleted", "users/big").await;
        wait_until(Duration::from_secs(60), || app.delivered().len() >= 30).await;
        app.store
            .delete(&app.store.doc_name(&doc))
            .await
            .expect("deleting it");
        let at_delete = app.delivered().len();
        wait_until(Duration::from_secs(30), || worker.worker.tasks.is_empty()).await;
        let after = app.delivered().len() - at_delete;
        // In flight, plus the paced rate until the next lease write finds it gone.
        let bound =
            CONCURRENCY + (f64::from(RATE) * (2.0 * INTERVAL.as_secs_f64() + 0.05)).ceil() as usize;
        eprintln!("deleted mid-send: {after} sends after the delete (bound {bound})");
        assert!(
            after <= bound,
            "{after} sends after the delete (bound {bound})"
        );
        assert!(app.delivered().len() < 120, "the send was stopped");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            app.store.get(&doc).await.unwrap().is_none(),
            "the deleted document must not be recreated"
        );

        app.add_token("solo", "t", &format!("{}-solo", app.project), "iOS")
            .await;
        let next = app.notify("next", "users/solo").await;
        assert_succeeded(&app.finished(&next).await);
        worker.stop().await;
    }
}

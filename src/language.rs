//! Text in the user's language: the message variants of a notification with
//! `notification_title_i18n` / `notification_text_i18n`, and the reads of the recipients'
//! language field (`FFPUSH_LANGUAGE_FIELD`) that pick one per token. A notification without
//! those maps has one message and costs no read here.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use firestore::gcloud_sdk::google::firestore::v1::{
    BatchGetDocumentsRequest, DocumentMask, Value, batch_get_documents_response, value,
};
use futures::StreamExt;

use crate::fcm::MessageTemplate;
use crate::metrics::Metrics;
use crate::model::{Invalid, Notification, Variant};
use crate::store::{self, DeviceToken, Store};

/// A user's language code as read from their document; `None`: no language (no document, no
/// field, or not a string).
pub type Language = Option<Arc<str>>;

/// The messages of one notification: its plain message, and for a notification with
/// translations what is needed to build each language's (built once, on first use).
#[derive(Clone, Debug)]
pub struct Messages {
    plain: Arc<MessageTemplate>,
    /// `Some` when the notification has translations.
    localized: Option<Arc<Notification>>,
}

impl From<MessageTemplate> for Messages {
    fn from(plain: MessageTemplate) -> Messages {
        Messages {
            plain: Arc::new(plain),
            localized: None,
        }
    }
}

impl Messages {
    /// The notification's messages. Every variant a user's language can pick is built once
    /// here, so that one over FCM's size limit fails the document before any send, naming
    /// its language.
    pub fn new(n: &Notification) -> Result<Messages, Invalid> {
        let plain = MessageTemplate::new(n)?;
        let translations = &n.options.translations;
        if translations.is_empty() {
            return Ok(plain.into());
        }
        for variant in translations.variants().into_iter().skip(1) {
            template(n, &variant)?;
        }
        Ok(Messages {
            plain: Arc::new(plain),
            localized: Some(Arc::new(n.clone())),
        })
    }

    /// Whether the recipients' languages are needed.
    pub fn is_localized(&self) -> bool {
        self.localized.is_some()
    }

    /// A per-run cache of the templates built.
    pub fn picker(&self) -> Picker<'_> {
        Picker {
            messages: self,
            by_variant: HashMap::new(),
            by_language: HashMap::new(),
        }
    }
}

/// The template of one variant; a size error names the language.
fn template(n: &Notification, variant: &Variant) -> Result<MessageTemplate, Invalid> {
    let t = &n.options.translations;
    let title = variant.title.as_ref().and_then(|k| t.title.get(k));
    let text = variant.text.as_ref().and_then(|k| t.text.get(k));
    MessageTemplate::with_text(n, title.unwrap_or(&n.title), text.unwrap_or(&n.body)).map_err(
        |Invalid(why)| {
            let named: Vec<String> = [
                ("notification_title_i18n", &variant.title),
                ("notification_text_i18n", &variant.text),
            ]
            .into_iter()
            .filter_map(|(field, key)| key.as_ref().map(|k| format!("{field}.{k}")))
            .collect();
            Invalid(format!("in {}: {why}", named.join(" with ")))
        },
    )
}

/// Distinct language values a picker remembers before it starts over (users may hold any
/// string; the templates themselves are one per variant).
const MAX_REMEMBERED_LANGUAGES: usize = 1024;

/// Picks each token's message by its user's language, building each variant's template once.
pub struct Picker<'a> {
    messages: &'a Messages,
    by_variant: HashMap<Variant, Arc<MessageTemplate>>,
    by_language: HashMap<Arc<str>, Arc<MessageTemplate>>,
}

impl Picker<'_> {
    /// The template for a user whose language is `language`.
    pub fn template(&mut self, language: &Language) -> Arc<MessageTemplate> {
        let (Some(n), Some(code)) = (&self.messages.localized, language) else {
            return self.messages.plain.clone();
        };
        if let Some(t) = self.by_language.get(code) {
            return t.clone();
        }
        let variant = n.options.translations.pick(Some(code));
        let plain = &self.messages.plain;
        let t = self
            .by_variant
            .entry(variant)
            .or_insert_with_key(|variant| {
                if *variant == Variant::default() {
                    return plain.clone();
                }
                // Checked when the messages were made: not reached, but never worse than
                // the plain text.
                template(n, variant).map(Arc::new).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "a translation's message could not be built; sending the plain text");
                    plain.clone()
                })
            })
            .clone();
        if self.by_language.len() >= MAX_REMEMBERED_LANGUAGES {
            self.by_language.clear();
        }
        self.by_language.insert(code.clone(), t.clone());
        t
    }

    /// The request body for `token`, in its user's language.
    pub fn body_for(&mut self, language: &Language, token: &str) -> Bytes {
        self.template(language).body_for(token)
    }

    /// Variants built so far (the plain one counted once it is used).
    pub fn built(&self) -> usize {
        self.by_variant.len()
    }
}

/// Reads the language of the users whose tokens are sent: each user document once per
/// notification, only its language field (a field mask), many in one `BatchGetDocuments`.
#[derive(Clone)]
pub struct LanguageReader {
    store: Store,
    /// `FFPUSH_LANGUAGE_FIELD`, possibly a dotted path.
    field: String,
    metrics: Arc<Metrics>,
    /// The users of the last page and their languages. Tokens come in document-path order,
    /// so a user's tokens are consecutive: a user spread over two pages is found here.
    last: Arc<Mutex<HashMap<String, Language>>>,
}

/// User documents asked for in one `BatchGetDocuments`.
const BATCH: usize = 500;

impl LanguageReader {
    pub fn new(store: Store, field: String, metrics: Arc<Metrics>) -> LanguageReader {
        LanguageReader {
            store,
            field,
            metrics,
            last: Arc::default(),
        }
    }

    /// The language of each token's user (the document holding its `fcm_tokens`).
    pub async fn languages(&self, tokens: &[DeviceToken]) -> Result<Vec<Language>, store::Error> {
        let parents: Vec<&str> = tokens.iter().map(|t| user_of(&t.doc_name)).collect();
        let mut known: HashMap<String, Language> = HashMap::new();
        let mut wanted: Vec<String> = Vec::new();
        {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashSet::new();
            for parent in &parents {
                if !seen.insert(*parent) {
                    continue;
                }
                match last.get(*parent) {
                    Some(language) => {
                        known.insert(parent.to_string(), language.clone());
                    }
                    None => wanted.push(parent.to_string()),
                }
            }
        }
        for chunk in wanted.chunks(BATCH) {
            known.extend(self.read(chunk).await?);
        }
        let languages = parents
            .iter()
            .map(|p| known.get(*p).cloned().flatten())
            .collect();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = known;
        Ok(languages)
    }

    /// The language of one user document (a relative path such as `users/abc`).
    pub async fn language_of(&self, user: &str) -> Result<Language, store::Error> {
        let name = self.store.doc_name(user);
        let mut found = self.read(std::slice::from_ref(&name)).await?;
        Ok(found.remove(&name).flatten())
    }

    /// Reads `names` (full document names), riding out short Firestore outages.
    async fn read(&self, names: &[String]) -> Result<HashMap<String, Language>, store::Error> {
        let policy = store::backoff(
            Duration::from_millis(200),
            Duration::from_secs(10),
            Some(Duration::from_secs(30)),
        );
        let found = store::retry("reading users' language failed", policy, None, || {
            self.read_once(names)
        })
        .await?;
        self.metrics.user_documents_read.inc_by(names.len() as u64);
        Ok(found)
    }

    async fn read_once(&self, names: &[String]) -> Result<HashMap<String, Language>, store::Error> {
        let request = BatchGetDocumentsRequest {
            database: self.store.database_path().to_string(),
            documents: names.to_vec(),
            mask: Some(DocumentMask {
                field_paths: vec![self.field.clone()],
            }),
            ..Default::default()
        };
        let mut stream = self
            .store
            .client()
            .batch_get_documents(request)
            .await
            .map_err(store::Error::from)?
            .into_inner();
        let mut found = HashMap::with_capacity(names.len());
        while let Some(item) = stream.next().await {
            match item.map_err(store::Error::from)?.result {
                Some(batch_get_documents_response::Result::Found(doc)) => {
                    let language = field_at(&doc.fields, &self.field).map(Arc::from);
                    found.insert(doc.name, language);
                }
                Some(batch_get_documents_response::Result::Missing(name)) => {
                    found.insert(name, None);
                }
                None => {}
            }
        }
        Ok(found)
    }
}

/// The user document of a token document: `…/users/u/fcm_tokens/t` → `…/users/u`.
fn user_of(token_doc: &str) -> &str {
    token_doc.rsplitn(3, '/').nth(2).unwrap_or(token_doc)
}

/// The string at a dotted `path` of the fields; `None` when absent, blank or not a string.
fn field_at<'a>(fields: &'a HashMap<String, Value>, path: &str) -> Option<&'a str> {
    let (head, rest) = match path.split_once('.') {
        Some((head, rest)) => (head, Some(rest)),
        None => (path, None),
    };
    match (fields.get(head)?.value_type.as_ref()?, rest) {
        (value::ValueType::StringValue(s), None) if !s.trim().is_empty() => Some(s),
        (value::ValueType::MapValue(map), Some(rest)) => field_at(&map.fields, rest),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Audience, MessageOptions, Translations};

    fn notification(title: &[(&str, &str)], text: &[(&str, &str)]) -> Notification {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Notification {
            title: "Hello".into(),
            body: "plain".into(),
            image: None,
            sound: None,
            initial_page: None,
            parameter_data: None,
            audience: Audience::Users(vec!["users/a".into()]),
            scheduled_time: None,
            options: MessageOptions {
                translations: Translations {
                    title: map(title),
                    text: map(text),
                },
                ..Default::default()
            },
        }
    }

    fn shown(picker: &mut Picker<'_>, language: Option<&str>) -> (String, String) {
        let m = picker.template(&language.map(Arc::from)).message_for("t");
        let n = &m["message"]["notification"];
        (
            n["title"].as_str().unwrap_or_default().to_string(),
            n["body"].as_str().unwrap_or_default().to_string(),
        )
    }

    #[test]
    fn a_language_picks_its_text_then_its_primary_subtag_then_the_plain_text() {
        let n = notification(
            &[("de", "Hallo"), ("pt", "Olá"), ("pt-br", "Oi")],
            &[("de", "Text"), ("pt", "texto")],
        );
        let messages = Messages::new(&n).unwrap();
        let mut p = messages.picker();
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(shown(&mut p, Some("de")), pair("Hallo", "Text"));
        assert_eq!(shown(&mut p, Some("DE-at")), pair("Hallo", "Text"));
        assert_eq!(shown(&mut p, Some("pt_BR")), pair("Oi", "texto"));
        assert_eq!(shown(&mut p, Some("pt-PT")), pair("Olá", "texto"));
        assert_eq!(shown(&mut p, Some("fr")), pair("Hello", "plain"));
        assert_eq!(shown(&mut p, None), pair("Hello", "plain"));
        // One template per variant, not per language value or token.
        assert_eq!(p.built(), 4);
    }

    #[test]
    fn an_oversized_translation_names_its_language() {
        let long = "ü".repeat(2100);
        let n = notification(&[("de", "Hallo")], &[("de", &long)]);
        let err = Messages::new(&n).unwrap_err().0;
        assert!(
            err.starts_with(
                "in notification_title_i18n.de with notification_text_i18n.de: the message is"
            ),
            "{err}"
        );
        // Reached through its primary subtag only: still checked.
        let n = notification(&[], &[("pt", &long)]);
        assert!(
            Messages::new(&n)
                .unwrap_err()
                .0
                .contains("notification_text_i18n.pt:")
        );
        assert!(Messages::new(&notification(&[("de", "Hallo")], &[])).is_ok());
    }

    #[test]
    fn the_user_of_a_token_and_a_dotted_field() {
        assert_eq!(
            user_of("projects/p/databases/(default)/documents/users/u/fcm_tokens/t"),
            "projects/p/databases/(default)/documents/users/u"
        );
        let inner: HashMap<String, Value> = [("language".to_string(), store::string("de"))].into();
        let fields: HashMap<String, Value> = [
            (
                "settings".to_string(),
                Value {
                    value_type: Some(value::ValueType::MapValue(
                        firestore::gcloud_sdk::google::firestore::v1::MapValue { fields: inner },
                    )),
                },
            ),
            ("language".to_string(), store::integer(3)),
        ]
        .into();
        assert_eq!(field_at(&fields, "settings.language"), Some("de"));
        assert_eq!(field_at(&fields, "language"), None);
        assert_eq!(field_at(&fields, "settings"), None);
        assert_eq!(field_at(&fields, "nope.language"), None);
    }
}

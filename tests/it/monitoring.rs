//! `deploy/dashboard.json` and `deploy/alerts/*.json` against the metrics ffpush exports: every
//! metric they name exists, with the kind Managed Service for Prometheus stores it under
//! (`prometheus.googleapis.com/<name>/<counter|gauge|histogram>`), read the way that kind can
//! be read (rates of counters, levels of gauges, percentiles of the histogram), and only with
//! labels (and label values) ffpush writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::Value;

/// One metric family of `/metrics`: its kind and the values each label takes.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// What ffpush exports, read from the rendering `/metrics` serves.
fn exported() -> BTreeMap<String, Family> {
    let text = ffpush::metrics::Metrics::default().render();
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            families.entry(name.to_string()).or_default().kind = kind.to_string();
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.split_once(' ').expect("series value").0;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                (families.get(base)?.kind == "histogram").then_some(base)
            })
            .unwrap_or(name);
        let family = families
            .get_mut(family)
            .unwrap_or_else(|| panic!("{name} has no # TYPE line"));
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (label, value) = pair.split_once('=').expect("label=\"value\"");
            if label == "le" {
                continue;
            }
            family
                .labels
                .entry(label.to_string())
                .or_default()
                .insert(value.trim_matches('"').to_string());
        }
    }
    families
}

fn deploy_file(relative: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{relative} is not JSON: {e}"))
}

fn alert_files() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/alerts");
    let mut files: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("deploy/alerts")
        .map(|f| {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            let value = deploy_file(&format!("deploy/alerts/{name}"));
            (name, value)
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!files.is_empty(), "no alert policies");
    files
}

/// Every object in `value` (depth first) that has `key`.
fn objects_with<'a>(value: &'a Value, key: &str, found: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if map.contains_key(key) {
                found.push(value);
            }
            map.values().for_each(|v| objects_with(v, key, found));
        }
        Value::Array(items) => items.iter().for_each(|v| objects_with(v, key, found)),
        _ => {}
    }
}

/// A quoted string at the start of `s`: its content and the rest.
fn quoted(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let s = s
        .strip_prefix('"')
        .unwrap_or_else(|| panic!("a quoted value at {s:?}"));
    let end = s.find('"').expect("closing quote");
    (&s[..end], &s[end + 1..])
}

/// A Cloud Monitoring filter: the metric it selects and its `metric.label` comparisons.
fn filter_terms(filter: &str) -> (String, String, Vec<(String, String)>) {
    let (_, rest) = filter
        .split_once("metric.type")
        .unwrap_or_else(|| panic!("no metric.type in {filter}"));
    let (metric_type, _) = quoted(rest.trim_start().trim_start_matches('='));
    let path = metric_type
        .strip_prefix("prometheus.googleapis.com/")
        .unwrap_or_else(|| panic!("{metric_type}: not a Managed Prometheus metric"));
    let (name, kind) = path.rsplit_once('/').expect("<name>/<kind>");
    let mut labels = Vec::new();
    for (i, _) in filter.match_indices("metric.label") {
        let rest = filter[i + "metric.label".len()..]
            .trim_start_matches('s')
            .trim_start_matches('.');
        let (label, rest) = if rest.starts_with('"') {
            quoted(rest)
        } else {
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'));
            rest.split_at(end.unwrap_or(rest.len()))
        };
        let rest = rest
            .trim_start()
            .strip_prefix('=')
            .expect("metric.label.X = \"v\"");
        let (value, _) = quoted(rest);
        labels.push((label.to_string(), value.to_string()));
    }
    (name.to_string(), kind.to_string(), labels)
}

/// The labels of the `prometheus_target` resource Managed Service for Prometheus writes to
/// (https://cloud.google.com/monitoring/api/resources#tag_prometheus_target); on Cloud Run,
/// `instance` tells the instances apart.
const TARGET_LABELS: [&str; 6] = [
    "project_id",
    "location",
    "cluster",
    "namespace",
    "job",
    "instance",
];

/// `resource.label."instance"` (a groupByFields entry) → `instance`; `None` for a metric label.
fn resource_label(field: &str) -> Option<&str> {
    field
        .strip_prefix("resource.label.")
        .or_else(|| field.strip_prefix("resource.labels."))
        .map(|label| label.trim_matches('"'))
}

/// `metric.label."status"` (a groupByFields entry) → `status`.
fn group_label(field: &str) -> String {
    field
        .strip_prefix("metric.label.")
        .or_else(|| field.strip_prefix("metric.labels."))
        .unwrap_or_else(|| panic!("group by {field}: only metric labels"))
        .trim_matches('"')
        .to_string()
}

/// Managed Prometheus's kind for a Prometheus type.
fn gmp_kind(prometheus_type: &str) -> &'static str {
    match prometheus_type {
        "counter" => "counter",
        "gauge" => "gauge",
        "histogram" => "histogram",
        other => panic!("no Managed Prometheus kind for {other}"),
    }
}

fn check_label(metrics: &BTreeMap<String, Family>, metric: &str, label: &str, value: &str) {
    let family = &metrics[metric];
    let values = family
        .labels
        .get(label)
        .unwrap_or_else(|| panic!("{metric} has no label {label} (it has {:?})", family.labels));
    for alternative in value.split('|') {
        assert!(
            values.contains(alternative),
            "{metric}{{{label}}} is never {alternative:?} (it is one of {values:?})"
        );
    }
}

#[test]
fn the_dashboard_charts_only_what_ffpush_exports_read_as_its_kind() {
    let metrics = exported();
    let dashboard = deploy_file("deploy/dashboard.json");
    let mut queries = Vec::new();
    objects_with(&dashboard, "timeSeriesFilter", &mut queries);
    assert!(!queries.is_empty(), "no charts");
    let mut charted = BTreeSet::new();
    let mut percentiles = BTreeSet::new();
    for query in queries {
        let query = &query["timeSeriesFilter"];
        let filter = query["filter"].as_str().expect("filter");
        assert!(
            filter.contains("resource.type=\"prometheus_target\""),
            "{filter}: Managed Prometheus writes to prometheus_target"
        );
        let (name, kind, labels) = filter_terms(filter);
        let family = metrics
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is not a metric ffpush exports"));
        assert_eq!(kind, gmp_kind(&family.kind), "{name} is a {}", family.kind);
        for (label, value) in &labels {
            check_label(&metrics, &name, label, value);
        }
        let aggregation = &query["aggregation"];
        for field in aggregation["groupByFields"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let field = field.as_str().expect("a string");
            if let Some(label) = resource_label(field) {
                assert!(
                    TARGET_LABELS.contains(&label),
                    "{name}: prometheus_target has no label {label}"
                );
                continue;
            }
            let label = group_label(field);
            assert!(
                family.labels.contains_key(&label),
                "{name} has no label {label} to group by"
            );
        }
        let aligner = aggregation["perSeriesAligner"]
            .as_str()
            .expect("perSeriesAligner");
        let reducer = aggregation["crossSeriesReducer"]
            .as_str()
            .expect("crossSeriesReducer");
        match family.kind.as_str() {
            // A cumulative count means something only as a rate or a change.
            "counter" => assert!(
                matches!(aligner, "ALIGN_RATE" | "ALIGN_DELTA"),
                "{name}: {aligner} on a counter"
            ),
            "gauge" => assert!(
                matches!(
                    aligner,
                    "ALIGN_MEAN" | "ALIGN_MAX" | "ALIGN_MIN" | "ALIGN_NEXT_OLDER"
                ),
                "{name}: {aligner} on a gauge"
            ),
            "histogram" => {
                assert_eq!(
                    aligner, "ALIGN_DELTA",
                    "{name}: the distribution of one period"
                );
                let p = reducer
                    .strip_prefix("REDUCE_PERCENTILE_")
                    .unwrap_or_else(|| panic!("{name}: {reducer}, not a percentile"));
                percentiles.insert(p.to_string());
            }
            other => panic!("{name}: {other}"),
        }
        charted.insert(name);
    }
    // Every metric has a chart: a new one needs its place on the dashboard.
    let all: BTreeSet<String> = metrics.keys().cloned().collect();
    assert_eq!(
        charted, all,
        "metrics without a chart, or charts of unknown metrics"
    );
    assert_eq!(
        percentiles,
        ["50", "95", "99"].map(String::from).into(),
        "latency percentiles"
    );
}

/// One metric named in a PromQL expression: its name, matchers, and the function applied.
#[derive(Debug)]
struct Reference {
    name: String,
    matchers: Vec<(String, String, String)>,
    function: String,
}

/// The `ffpush_*` metrics of a PromQL expression, and the labels its `by (…)` clauses name.
fn promql(query: &str) -> (Vec<Reference>, Vec<String>) {
    let bytes = query.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut references = Vec::new();
    let mut grouped = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !(bytes[i].is_ascii_alphabetic() || bytes[i] == b'_')
            || (i > 0 && is_ident(bytes[i - 1]))
        {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let word = &query[start..i];
        let rest = &query[i..];
        if matches!(word, "by" | "without") {
            let inner = rest.trim_start().strip_prefix('(').expect("by (…)");
            let inner = &inner[..inner.find(')').expect("by (…)")];
            grouped.extend(inner.split(',').map(|l| l.trim().to_string()));
            continue;
        }
        if !word.starts_with("ffpush_") {
            continue;
        }
        // The function whose parenthesis opens right before the metric.
        let before = query[..start]
            .trim_end()
            .strip_suffix('(')
            .unwrap_or("")
            .trim_end();
        let function = before
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("")
            .to_string();
        let mut matchers = Vec::new();
        if let Some(block) = rest.strip_prefix('{') {
            let block = &block[..block.find('}').expect("closing }")];
            for matcher in block.split(',').filter(|m| !m.trim().is_empty()) {
                let matcher = matcher.trim();
                let end = matcher.find(['=', '!']).expect("label op \"value\"");
                let (label, rest) = matcher.split_at(end);
                let op_end = rest.find('"').expect("a quoted value");
                let (op, value) = rest.split_at(op_end);
                matchers.push((
                    label.trim().to_string(),
                    op.trim().to_string(),
                    value.trim_matches('"').to_string(),
                ));
            }
        }
        references.push(Reference {
            name: word.to_string(),
            matchers,
            function,
        });
    }
    (references, grouped)
}

#[test]
fn the_alert_policies_query_only_what_ffpush_exports_read_as_its_kind() {
    let metrics = exported();
    let mut queried = BTreeSet::new();
    for (file, policy) in alert_files() {
        let display = policy["displayName"].as_str().expect("displayName");
        assert!(display.starts_with("ffpush: "), "{file}: {display}");
        assert!(
            policy["documentation"]["content"]
                .as_str()
                .is_some_and(|d| d.len() > 80),
            "{file}: say what to do in documentation.content"
        );
        assert_eq!(
            policy["documentation"]["mimeType"], "text/markdown",
            "{file}"
        );
        assert!(
            matches!(
                policy["severity"].as_str(),
                Some("CRITICAL" | "ERROR" | "WARNING")
            ),
            "{file}"
        );
        assert_eq!(policy["enabled"], true, "{file}");
        let conditions = policy["conditions"].as_array().expect("conditions");
        assert_eq!(
            conditions.len(),
            1,
            "{file}: one PromQL condition per policy"
        );
        let condition = &conditions[0]["conditionPrometheusQueryLanguage"];
        let query = condition["query"].as_str().expect("a PromQL query");
        for field in ["duration", "evaluationInterval"] {
            let value = condition[field].as_str().expect(field);
            assert!(
                value.ends_with('s') && value[..value.len() - 1].parse::<u64>().is_ok(),
                "{file}: {field} {value} is not a duration in seconds"
            );
        }
        let (references, grouped) = promql(query);
        assert!(
            !references.is_empty(),
            "{file}: {query} names no ffpush metric"
        );
        for r in &references {
            let family = metrics
                .get(&r.name)
                .unwrap_or_else(|| panic!("{file}: {} is not a metric ffpush exports", r.name));
            match family.kind.as_str() {
                "counter" => assert!(
                    matches!(r.function.as_str(), "rate" | "increase" | "irate"),
                    "{file}: counter {} read with {:?}, not a rate",
                    r.name,
                    r.function
                ),
                "gauge" => assert!(
                    !matches!(r.function.as_str(), "rate" | "increase" | "irate"),
                    "{file}: gauge {} read as a counter",
                    r.name
                ),
                other => panic!("{file}: alerting on a {other} is not expected here"),
            }
            for (label, op, value) in &r.matchers {
                assert!(
                    matches!(op.as_str(), "=" | "=~"),
                    "{file}: {label}{op}: only = and =~"
                );
                check_label(&metrics, &r.name, label, value);
            }
            queried.insert((
                r.name.clone(),
                r.matchers
                    .iter()
                    .map(|(l, _, v)| format!("{l}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ));
        }
        for label in grouped {
            assert!(
                references
                    .iter()
                    .any(|r| metrics[&r.name].labels.contains_key(&label)),
                "{file}: by ({label}): no metric in {query} has it"
            );
        }
    }
    // The "worth an alert" list in docs/operations.md, each one a policy.
    for wanted in [
        ("ffpush_notifications_total", "status=failed"),
        (
            "ffpush_fcm_messages_total",
            "outcome=fatal|auth|unauthenticated",
        ),
        ("ffpush_listener_reconnects_total", ""),
        ("ffpush_ready", ""),
    ] {
        let wanted = (wanted.0.to_string(), wanted.1.to_string());
        assert!(
            queried.contains(&wanted),
            "no alert on {wanted:?} in {queried:?}"
        );
    }
}

#[test]
fn the_operations_guide_lists_every_alert_policy() {
    let guide = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .unwrap();
    for (file, _) in alert_files() {
        assert!(
            guide.contains(&format!("deploy/alerts/{file}")),
            "docs/operations.md does not mention deploy/alerts/{file}"
        );
    }
}

#[test]
fn the_parsers_here_see_what_they_should() {
    let (name, kind, labels) = filter_terms(
        r#"metric.type="prometheus.googleapis.com/ffpush_x_total/counter" resource.type="prometheus_target" metric.label."outcome"="sent" metric.labels.state = "a""#,
    );
    assert_eq!(
        (name.as_str(), kind.as_str()),
        ("ffpush_x_total", "counter")
    );
    assert_eq!(
        labels,
        [
            ("outcome".into(), "sent".into()),
            ("state".into(), "a".into())
        ]
    );
    let (refs, grouped) = promql(
        r#"sum by (outcome) (rate(ffpush_a_total{outcome=~"x|y"}[5m])) > 0 or absent_over_time(ffpush_b[15m])"#,
    );
    assert_eq!(grouped, ["outcome"]);
    assert_eq!(refs.len(), 2);
    assert_eq!(refs[0].name, "ffpush_a_total");
    assert_eq!(refs[0].function, "rate");
    assert_eq!(
        refs[0].matchers,
        [("outcome".into(), "=~".into(), "x|y".into())]
    );
    assert_eq!(refs[1].function, "absent_over_time");
    let metrics = exported();
    assert_eq!(
        metrics["ffpush_fcm_request_duration_seconds"].kind,
        "histogram"
    );
    assert!(metrics["ffpush_fcm_messages_total"].labels["outcome"].contains("sent"));
    assert_eq!(metrics["ffpush_ready"].kind, "gauge");
}

//! Scenario/event datasets (SEV, Wang et al. 2025): one JSON object per line with a `scenario`
//! (text), an `event` object mapping each variant name to that variant's event text, and
//! optionally a `skeleton_id` naming the scenario. The SEV file holds three valence variants of
//! each scenario's event (`positive`, `neutral`, `negative`); every line must have the same
//! variants.
//!
//! Each (scenario, variant) becomes one [`Example`] whose text is the context template with
//! `{scenario}` and `{event}` filled in ([`DEFAULT_CONTEXT`]: `{scenario}. {event}`, as SEV's
//! scenarios have no final stop and its events do) and whose label is the variant; the prompt
//! template (`data::template`) then wraps that text as for any dataset. Examples go scenario by
//! scenario (file order), the variants of a scenario in the order asked.

use std::collections::BTreeSet;
use std::path::Path;

use super::dataset::{Dataset, DatasetSpec, Example, Format};
use crate::{Error, Result};

/// The context template of a variant: the scenario, a stop, the event.
pub const DEFAULT_CONTEXT: &str = "{scenario}. {event}";

/// The examples of an SEV file and each example's scenario.
pub struct SevDataset {
    /// One example per (scenario, variant); `label` is the variant.
    pub dataset: Dataset,
    /// Each example's scenario: its index in file order (`[n_examples]`).
    pub scenario: Vec<usize>,
    /// The variants in the file, sorted.
    pub variants: Vec<String>,
}

/// Checks a context template: exactly one `{scenario}` and one `{event}`.
pub fn check_context(context: &str) -> Result<()> {
    if context.matches("{scenario}").count() != 1 || context.matches("{event}").count() != 1 {
        return Err(Error::input(format!("context template `{context}` needs exactly one {{scenario}} and one {{event}} (default `{DEFAULT_CONTEXT}`)")));
    }
    Ok(())
}

/// A variant's context text (the two texts go in verbatim, whatever braces they hold).
pub fn render_context(context: &str, scenario: &str, event: &str) -> String {
    let (pre, post) = context.split_once("{scenario}").unwrap_or((context, ""));
    let fill = |s: &str| s.replacen("{event}", event, 1);
    format!("{}{scenario}{}", fill(pre), fill(post))
}

/// Loads an SEV file: the variants `wanted` (None: all, sorted) of the first `limit` scenarios
/// (None: all), rendered through `context`. Errors name the file and line: not JSON, no
/// `scenario` text, no `event` object, an event that is not text, variants that differ from the
/// first line's, a wanted variant the file does not have.
pub fn load(path: &Path, context: &str, wanted: Option<&[String]>, limit: Option<usize>) -> Result<SevDataset> {
    check_context(context)?;
    let bytes = crate::error::read_file(path)?;
    let file_sha256 = {
        use sha2::{Digest, Sha256};
        Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    let text = String::from_utf8(bytes).map_err(|e| Error::file(path, format!("not valid UTF-8 at byte {}", e.utf8_error().valid_up_to())))?;
    let mut variants: Option<Vec<String>> = None;
    let mut picked: Vec<String> = Vec::new();
    let (mut examples, mut scenario) = (Vec::new(), Vec::new());
    let mut rows_read = 0;
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if limit.is_some_and(|n| rows_read >= n) {
            break;
        }
        let row = i + 1;
        let at = |msg: String| Error::file(path, format!("line {row}: {msg}"));
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let scen = value.get("scenario").and_then(|s| s.as_str()).filter(|s| !s.trim().is_empty()).ok_or_else(|| at("no `scenario` text".into()))?;
        let events = value.get("event").and_then(|e| e.as_object()).ok_or_else(|| at("no `event` object (variant name -> event text)".into()))?;
        let names: Vec<String> = events.keys().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        match &variants {
            None => {
                picked = match wanted {
                    None => names.clone(),
                    Some(w) => {
                        if let Some(bad) = w.iter().find(|v| !names.contains(v)) {
                            return Err(at(format!("no event variant `{bad}` (the variants are: {})", names.join(", "))));
                        }
                        w.to_vec()
                    }
                };
                variants = Some(names);
            }
            Some(first) if *first != names => return Err(at(format!("event variants [{}] differ from the first line's [{}]", names.join(", "), first.join(", ")))),
            Some(_) => {}
        }
        for v in &picked {
            let event = events[v].as_str().filter(|e| !e.trim().is_empty()).ok_or_else(|| at(format!("event `{v}` is not a text")))?;
            examples.push(Example { row, text: render_context(context, scen, event), label: Some(v.clone()), numeric: Vec::new() });
            scenario.push(rows_read);
        }
        rows_read += 1;
    }
    let variants = variants.ok_or_else(|| Error::file(path, "empty dataset: the file has no rows"))?;
    let mut spec = DatasetSpec::new(path, format!("scenario + event ({context})"));
    spec.format = Some(Format::Jsonl);
    spec.label_column = Some("event variant".into());
    spec.allowed_labels = Some(picked);
    spec.limit = limit;
    Ok(SevDataset { dataset: Dataset { spec, examples, file_sha256, rows_read }, scenario, variants })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_render_scenario_by_scenario_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.jsonl");
        let line = |s: &str, p: &str| format!(r#"{{"scenario": "{s}", "event": {{"positive": "{p} good.", "neutral": "{p} so-so.", "negative": "{p} bad."}}}}"#);
        std::fs::write(&path, format!("{}\n\n{}\n{}\n", line("I {x} left", "It"), line("I came", "They"), line("I sat", "We"))).unwrap();
        let s = load(&path, DEFAULT_CONTEXT, Some(&["positive".into(), "neutral".into()]), Some(2)).unwrap();
        assert_eq!(s.variants, ["negative", "neutral", "positive"]);
        let got: Vec<(usize, &str, Option<&str>, usize)> = s.dataset.examples.iter().zip(&s.scenario).map(|(e, &k)| (e.row, e.text.as_str(), e.label.as_deref(), k)).collect();
        assert_eq!(got, [(1, "I {x} left. It good.", Some("positive"), 0), (1, "I {x} left. It so-so.", Some("neutral"), 0), (3, "I came. They good.", Some("positive"), 1), (3, "I came. They so-so.", Some("neutral"), 1)]);
        assert_eq!(s.dataset.rows_read, 2);
        assert_eq!(load(&path, "{event} after {scenario}", None, None).unwrap().dataset.examples[0].text, "It bad. after I {x} left");

        let err = |body: &str, context: &str, wanted: Option<&[String]>| {
            std::fs::write(&path, body).unwrap();
            load(&path, context, wanted, None).err().unwrap().to_string()
        };
        let ok = line("I ran", "It");
        assert!(err(&ok, "{scenario}", None).contains("needs exactly one {scenario} and one {event}"));
        assert!(err(&ok, DEFAULT_CONTEXT, Some(&["happy".into()])).ends_with("line 1: no event variant `happy` (the variants are: negative, neutral, positive)"));
        assert!(err(&format!("{ok}\n{{\"scenario\": \"x\", \"event\": {{\"neutral\": \"n\"}}}}"), DEFAULT_CONTEXT, None).ends_with("line 2: event variants [neutral] differ from the first line's [negative, neutral, positive]"));
        assert!(err(r#"{"event": {"neutral": "n"}}"#, DEFAULT_CONTEXT, None).ends_with("line 1: no `scenario` text"));
        assert!(err(r#"{"scenario": "s", "event": "n"}"#, DEFAULT_CONTEXT, None).ends_with("line 1: no `event` object (variant name -> event text)"));
        assert!(err(r#"{"scenario": "s", "event": {"neutral": 3}}"#, DEFAULT_CONTEXT, None).ends_with("line 1: event `neutral` is not a text"));
        assert!(err("{", DEFAULT_CONTEXT, None).contains("line 1: not JSON"));
        assert!(err("\n", DEFAULT_CONTEXT, None).ends_with("empty dataset: the file has no rows"));
    }
}

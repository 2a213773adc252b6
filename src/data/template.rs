//! Prompt templates: `{text}` substitution, the study's templates as named presets, optional
//! few-shot examples, optional chat template of the model, and token length statistics.
//!
//! A template is a string with one `{text}` and optionally one `{shots}`. Few-shot examples
//! are rendered each as ` Context: {text} Answer: {answer}` (the study's format, leading space
//! included) and concatenated into `{shots}`. Texts are substituted verbatim. With `chat`, the
//! rendered prompt is one user message in the model's chat template (with the generation
//! prompt), encoded without special tokens as transformers does; otherwise it is encoded as
//! `tokenizer(prompt)` (BOS as the tokenizer adds it).
//!
//! The presets and the built-in shots reproduce `prompt_manager.build_prompt` of Tak et al. 2025
//! (whose default is two shots, joy and sadness: `--template tak --shots tak`).

use std::path::Path;

use crate::model::tokenizer::{ChatMessage, PromptTokenizer};
use crate::{Error, Result};

/// The named templates: (name, template). `tak` is the study's main one.
pub const PRESETS: [(&str, &str); 4] = [
    ("tak", "What are the inferred emotions in the following contexts?{shots} Context: {text} Answer:"),
    ("tak-list", "Consider this list of emotions: anger, boredom, disgust, fear, guilt, joy, pride, relief, sadness, shame, surprise, trust, neutral. What are the inferred emotions in the following contexts?{shots} Context: {text} Answer:"),
    ("tak-guess", "Guess the emotion.{shots} Context: {text} Answer:"),
    ("plain", "{text}"),
];

/// The study's sample shots, one per emotion: (emotion, context).
pub const STUDY_SHOTS: [(&str, &str); 13] = [
    ("anger", "My husband missed an important call, because his phone was on silent AGAIN!"),
    ("boredom", "At work, my job is far to mind numbing and it does not challenge me."),
    ("disgust", "I saw mouldy food."),
    ("fear", "I was confronted by a thief."),
    ("guilt", "I booked a night away with friends and my children were upset that I was going to a hotel without them."),
    ("joy", "My first child was born."),
    ("neutral", "I walked to the village near my home."),
    ("pride", "I was recognised for doing well at work by my line manager."),
    ("relief", "I found out my mam didn't need a serious surgery."),
    ("sadness", "My dog died last week."),
    ("shame", "I failed a maths test and the teacher called me out in front of the class."),
    ("surprise", "I saw my teacher on an aeroplane!"),
    ("trust", "I gave my wallet to a friend."),
];

/// A few-shot example: a context and its answer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shot {
    pub text: String,
    pub answer: String,
}

/// The first `{name}` in `body` (a brace-enclosed identifier) other than `{text}` and
/// `{shots}`: a placeholder the user expects filled that no one fills. Other braces (JSON, a
/// lone `{`) are text.
fn unknown_placeholder(body: &str) -> Option<&str> {
    let mut rest = body;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let name_len = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
        let name = &after[..name_len];
        let is_ident = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if is_ident && after[name_len..].starts_with('}') && name != "text" && name != "shots" {
            return Some(&rest[open..open + name_len + 2]);
        }
        rest = after;
    }
    None
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Template {
    /// The preset name, or "custom".
    pub name: String,
    /// The template: one `{text}`, at most one `{shots}`.
    pub body: String,
    pub shots: Vec<Shot>,
    /// Wrap in the model's chat template.
    pub chat: bool,
}

impl Template {
    /// A preset name, or a literal template containing `{text}` (and optionally `{shots}`).
    pub fn parse(spec: &str) -> Result<Template> {
        if let Some((name, body)) = PRESETS.iter().find(|(n, _)| *n == spec) {
            return Ok(Template { name: name.to_string(), body: body.to_string(), shots: Vec::new(), chat: false });
        }
        if spec.matches("{text}").count() != 1 || spec.matches("{shots}").count() > 1 {
            return Err(Error::input(format!(
                "template `{spec}` is neither a preset ({}) nor a template with one {{text}} (and at most one {{shots}})",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            )));
        }
        if let Some(unknown) = unknown_placeholder(spec) {
            return Err(Error::input(format!("template `{spec}`: `{unknown}` is not a placeholder patchbay fills (only {{text}} and {{shots}}); it would stay in every prompt as written")));
        }
        Ok(Template { name: "custom".into(), body: spec.to_string(), shots: Vec::new(), chat: false })
    }

    /// Sets the few-shot examples; the template must have a `{shots}` slot.
    pub fn with_shots(mut self, shots: Vec<Shot>) -> Result<Template> {
        if !shots.is_empty() && !self.body.contains("{shots}") {
            return Err(Error::input(format!("template `{}` has no {{shots}} slot for few-shot examples", self.body)));
        }
        self.shots = shots;
        Ok(self)
    }

    /// Few-shot examples from a spec: `tak` (the study's default: joy, sadness), `tak:E1,E2,...`
    /// (the study's sample shots of those emotions, in that order), or a JSONL file with one
    /// `{"text": ..., "answer": ...}` per line.
    pub fn load_shots(spec: &str) -> Result<Vec<Shot>> {
        let study = |names: &[&str]| -> Result<Vec<Shot>> {
            names
                .iter()
                .map(|n| {
                    STUDY_SHOTS.iter().find(|(e, _)| e == n).map(|(e, t)| Shot { text: t.to_string(), answer: e.to_string() }).ok_or_else(|| {
                        Error::input(format!("no built-in shot for `{n}` (there are: {})", STUDY_SHOTS.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")))
                    })
                })
                .collect()
        };
        if spec == "tak" {
            return study(&["joy", "sadness"]);
        }
        if let Some(list) = spec.strip_prefix("tak:") {
            return study(&list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>());
        }
        let path = Path::new(spec);
        let bytes = crate::error::read_file(path)?;
        let text = String::from_utf8(bytes).map_err(|_| Error::file(path, "not UTF-8"))?;
        let mut shots = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let shot: Shot = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: expected {{\"text\": ..., \"answer\": ...}}: {e}", i + 1)))?;
            shots.push(shot);
        }
        if shots.is_empty() {
            return Err(Error::file(path, "no few-shot examples"));
        }
        Ok(shots)
    }

    /// The prompt text for one context (before any chat template).
    pub fn render(&self, text: &str) -> String {
        let shots: String = self.shots.iter().map(|s| format!(" Context: {} Answer: {}", s.text, s.answer)).collect();
        // The text goes in verbatim, whatever braces it contains.
        let (pre, post) = self.body.split_once("{text}").unwrap_or((&self.body, ""));
        format!("{}{text}{}", pre.replacen("{shots}", &shots, 1), post.replacen("{shots}", &shots, 1))
    }

    /// Token ids of the prompt for one context.
    pub fn encode(&self, tok: &PromptTokenizer, text: &str) -> Result<Vec<u32>> {
        let prompt = self.render(text);
        if self.chat { tok.encode_chat(&[ChatMessage::new("user", prompt)], true) } else { tok.encode(&prompt) }
    }
}

/// Length distribution of the tokenised prompts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenStats {
    pub n: usize,
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub median: usize,
    pub p95: usize,
    pub total: usize,
}

impl TokenStats {
    pub fn of(prompts: &[Vec<u32>]) -> TokenStats {
        let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        lens.sort_unstable();
        let n = lens.len();
        let q = |f: f64| if n == 0 { 0 } else { lens[((n - 1) as f64 * f).round() as usize] };
        let total: usize = lens.iter().sum();
        TokenStats {
            n,
            min: lens.first().copied().unwrap_or(0),
            max: lens.last().copied().unwrap_or(0),
            mean: if n == 0 { 0.0 } else { total as f64 / n as f64 },
            median: q(0.5),
            p95: q(0.95),
            total,
        }
    }

    pub fn describe(&self) -> String {
        format!("{} prompts, tokens min {} / median {} / mean {:.1} / p95 {} / max {} ({} total)", self.n, self.min, self.median, self.mean, self.p95, self.max, self.total)
    }
}

//! Label sets: label names and the token each is scored by.
//!
//! A label is scored by the first token of `" " + label` encoded without special tokens (the
//! word as it would follow "Answer:"), so " anger" -> its first id. Two labels resolving to the
//! same token would be indistinguishable: that is an error naming both.

use crate::model::tokenizer::{PromptTokenizer, unknown_token};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LabelSet {
    pub names: Vec<String>,
    /// The scored token of each label.
    pub token_ids: Vec<u32>,
    /// The token strings (for reports).
    pub tokens: Vec<String>,
}

/// Splits a comma-separated list, trimming and dropping empty items; duplicates are an error.
pub fn parse_list(spec: &str, what: &str) -> Result<Vec<String>> {
    let items: Vec<String> = spec.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if items.is_empty() {
        return Err(Error::input(format!("empty {what} list")));
    }
    for (i, a) in items.iter().enumerate() {
        if items[..i].contains(a) {
            return Err(Error::input(format!("{what} `{a}` is listed twice")));
        }
    }
    Ok(items)
}

impl LabelSet {
    /// Resolves each label to the first token of " label".
    pub fn resolve(names: &[String], tok: &PromptTokenizer) -> Result<LabelSet> {
        let mut token_ids = Vec::with_capacity(names.len());
        for name in names {
            let ids = tok.encode_plain(&format!(" {name}"))?;
            let &first = ids.first().ok_or_else(|| Error::input(format!("label `{name}` encodes to no token")))?;
            token_ids.push(first);
        }
        let tokens = tok.token_strings(&token_ids);
        LabelSet::from_ids(names.to_vec(), token_ids, tokens)
    }

    /// Explicit token ids: `name=id,...`, or plain ids named by their token strings.
    pub fn parse_ids(spec: &str, tok: Option<&PromptTokenizer>) -> Result<LabelSet> {
        let mut names = Vec::new();
        let mut ids = Vec::new();
        for item in parse_list(spec, "label token id")? {
            let (name, id) = match item.split_once('=') {
                Some((n, i)) => (Some(n.trim().to_string()), i.trim()),
                None => (None, item.as_str()),
            };
            let id: u32 = id.parse().map_err(|_| Error::input(format!("label token id `{item}`: expected ID or NAME=ID")))?;
            let name = name.unwrap_or_else(|| tok.and_then(|t| t.id_to_token(id)).map_or_else(|| id.to_string(), |s| s.trim_start_matches(['Ġ', '▁', ' ']).to_string()));
            names.push(name);
            ids.push(id);
        }
        let tokens = match tok {
            Some(t) => t.token_strings(&ids),
            None => ids.iter().map(|&id| unknown_token(id)).collect(),
        };
        LabelSet::from_ids(names, ids, tokens)
    }

    fn from_ids(names: Vec<String>, token_ids: Vec<u32>, tokens: Vec<String>) -> Result<LabelSet> {
        for i in 0..names.len() {
            for j in 0..i {
                if names[i] == names[j] {
                    return Err(Error::input(format!("label `{}` is listed twice", names[i])));
                }
                if token_ids[i] == token_ids[j] {
                    return Err(Error::input(format!(
                        "labels `{}` and `{}` both resolve to token {} ({:?}): they cannot be told apart by the next token; rename one (e.g. --rename {}=...) or pass --label-token-ids",
                        names[j], names[i], token_ids[i], tokens[i], names[i]
                    )));
                }
            }
        }
        Ok(LabelSet { names, token_ids, tokens })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Checks every id against the model's vocabulary.
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        match self.token_ids.iter().zip(&self.names).find(|(id, _)| **id as usize >= vocab_size) {
            Some((id, n)) => Err(Error::input(format!("label `{n}`: token id {id} is out of range (vocab_size {vocab_size})"))),
            None => Ok(()),
        }
    }
}

//! `patchbay generate`: text generation (KV-cache decoding) on any device, with interventions
//! at every step plugged in through [`Interventions`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::ProgressBar;
use serde_json::{Value, json};

use super::inputs::{InputArgs, encode_dataset};
use super::interventions::{InterventionArgs, parse_numbers};
use super::{command_manifest, merge, model_json, progress_bar};
use patchbay::backend::ops::sample::SampleParams;
use patchbay::data::prompts::{PromptEntry, PromptSource, load_prompts, read_prompts_file};
use patchbay::data::dataset::Dataset;
use patchbay::data::template::{Template, TokenStats};
use patchbay::experiments::dataset_files::dataset_json;
use patchbay::experiments::patch_files::write_manifest;
use patchbay::engine::Engine;
use patchbay::experiments::generate::{GenerateSpec, Generation, StepIntervention, StopReason, generate};
use patchbay::intervene::Op;
use patchbay::io::plot::distinct;
use patchbay::experiments::steer::{random_controls, step_intervention};
use patchbay::experiments::circuit::{Circuit, CircuitFile};
use patchbay::intervene::spec::{Condition, resolve_all};
use patchbay::io::JsonlFile;
use patchbay::sites::TokenScope;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

const GENERATE_HELP: &str = "Examples:
  patchbay generate --model M --prompts prompts.txt --max-new-tokens 64 --out runs/gen
  patchbay generate --model M --prompts chat.jsonl --chat --temperature 0.7 --top-p 0.9 --seed 1 --stop $'\\n\\n' --out runs/chat
  patchbay generate --model M --dataset envent_gen.csv --preset envent --template tak --limit 100 --max-new-tokens 8 --device cuda --out runs/tak
  patchbay generate --model M --token-ids ids.json --max-new-tokens 16 --device emu --out runs/ids
  patchbay generate --model M --prompts scenarios.txt --vector runs/dirs/directions.safetensors:anger --site resid_post --layers 3,4 --positions last:4+generated --betas=0,4,8 --normalise --out runs/angry
  patchbay generate --model M --prompts scenarios.txt --circuit runs/circuits.json --emotion joy --alpha=0,1,2 --positions last:4+generated --out runs/joy-circuit

Prompts: --prompts FILE (one prompt per line, or a .jsonl file of {\"prompt\"} / {\"text\"} /
{\"messages\": [...]} objects), --dataset through --template, or --token-ids (a JSON list of lists
of ids, used verbatim). Texts go through --template (default plain: the text itself); --chat wraps
each as one user message in the model's chat template with the generation prompt (messages always
use it).

Decoding: greedy at --temperature 0 (the default), else temperature and nucleus (--top-p) sampling.
A prompt's draws depend only on --seed and its index in the input (its `seed`), never on the batch
it runs in. A prompt stops at an eos id of the checkpoint (config.json / generation_config.json),
when its text contains a --stop string (in bash, $'\\n' is a line break), after --max-new-tokens,
or when the model's context (max_position_embeddings) is full.

Interventions (the grammar of `steer`: --vector, --project, --site, --layers, --positions,
--betas, --normalise, or --spec FILE.json): one generation pass per (direction, beta), in the
order listed, applying that direction at that beta at every listed layer (and every spec of a
--spec file that names the same vector) together; `--vector FILE:A,B` lists two directions (A+B
steers along their sum). --positions here also takes `generated` (each generated token as it is fed
back) and `X+generated` (prompt positions X and the generated tokens); `last:K` alone steers
only the last K prompt tokens, whose keys and values then steer every later token through the
cache. A prompt's seed is the same in every pass, so passes differ only by the intervention.
--random-control follows each steered pass with one where every vector is replaced by a random
Gaussian direction of the same norm (seeded by --seed; one per direction and layer, shared by
the betas): the control steering studies compare against.

Outputs in --out: generations.jsonl, one object per (pass, prompt), passes in beta order and
prompts in input order, appended and flushed after each batch: index, prompt (the text before --chat's template, a messages line as rendered;
null with --token-ids), text (the generated text, without a final eos, cut before a stop string),
tokens (every generated id, the eos or the token completing a stop string included), stop (eos |
stop_string | length), beta and direction (the pass's direction names, `random` for a control;
null without interventions), interventions (what the pass applied:
direction, site, layer, op, beta, positions, units; [] without), seed. manifest.json: the
command line, model, device, inputs, sampling, timings.

Circuits (--circuit FILE from `patchbay circuit build`; one file may hold circuits for several
emotions: pick one with --emotion): one pass per --alpha A (a comma list), every component of
the circuit acting at --positions (the grammar above, e.g. last:4+generated): a `scale`
component of weight w has its units (a head's slice of the o_proj input, a group's neurons of
the down_proj input) multiplied by 1 + A w, an `add` component's units get A w u, u = W^T d /
|W^T d| (W the component's write matrix, d the circuit's vector: `patchbay ablate --op add`).
A = 0 is the clean generation token for token. Rows: direction `circuit:<emotion>`, beta A,
interventions one per component (with its units).";

#[derive(Args)]
#[command(after_help = GENERATE_HELP)]
pub struct GenerateArgs {
    #[command(flatten)]
    inputs: InputArgs,
    /// Prompts file: one prompt per line, or JSONL (.jsonl) with a `prompt` or `text` (or `messages`) field per line.
    #[arg(long, conflicts_with_all = ["dataset", "token_ids"])]
    prompts: Option<PathBuf>,
    /// JSON file: a list of lists of token ids, used verbatim (no BOS added).
    #[arg(long, conflicts_with = "dataset")]
    token_ids: Option<PathBuf>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Seed of the sampling draws (and of --random-control's directions).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    interventions: InterventionArgs,
    /// After each steered pass, a pass with a same-norm random direction in place of each vector (seeded by --seed; `add` interventions only).
    #[arg(long)]
    random_control: bool,
    /// A circuit file (`patchbay circuit build`): generate under the circuit of --emotion at each --alpha, at --positions.
    #[arg(long, conflicts_with_all = ["vector", "project", "spec", "random_control"])]
    circuit: Option<PathBuf>,
    /// The circuit's emotion (needed when the file holds several).
    #[arg(long, requires = "circuit")]
    emotion: Option<String>,
    /// Circuit strengths, comma-separated, one pass each (write --alpha=-2,2 when the first is negative).
    #[arg(long, requires = "circuit", allow_hyphen_values = true)]
    alpha: Option<String>,
}

/// How generation decodes: the flags `generate` and `steer --mode generate` share.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// New tokens per prompt at most.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Stop a prompt when its generated text contains this string (repeatable); the text is cut before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prompts generated together (one batched forward per step).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
}

impl SamplingArgs {
    /// The generation spec, stopping at the model's eos ids; draws seeded by `seed`.
    pub fn spec(&self, model: &Model, seed: u64) -> GenerateSpec {
        let sample = SampleParams { temperature: self.temperature, top_p: self.top_p, seed };
        GenerateSpec { max_new_tokens: self.max_new_tokens, sample, eos_ids: model.cfg.eos_token_ids.clone(), stop: self.stop.clone(), batch_size: self.batch_size }
    }
}

/// The manifest fields of a generation run: model, device (and the non-finite values it
/// returned, kept by --allow-nonfinite), inputs, chat, token statistics, sampling, prompt count,
/// peak memory.
pub fn generation_fields(model: &Model, engine: &dyn Engine, inputs: &Inputs, chat: bool, stats: &TokenStats, spec: &GenerateSpec) -> Value {
    json!({
        "model": model_json(model),
        "device": engine.device_name(),
        "nonfinite_values": engine.nonfinite_values(),
        "inputs": inputs.source,
        "chat": chat,
        "token_stats": stats,
        "sampling": sampling_json(spec),
        "n_prompts": inputs.ids.len(),
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
    })
}

/// What a manifest says about decoding.
pub fn sampling_json(spec: &GenerateSpec) -> Value {
    json!({"max_new_tokens": spec.max_new_tokens, "temperature": spec.sample.temperature, "top_p": spec.sample.top_p, "seed": spec.sample.seed, "stop": spec.stop, "eos_ids": spec.eos_ids, "batch_size": spec.batch_size})
}

/// Interventions a generation pass applies at every step, and their JSON description (written
/// with every generation and in the manifest).
pub struct Interventions {
    /// The strength of the pass (None: a clean pass).
    pub beta: Option<f32>,
    /// The pass's direction name (None: a clean pass); `random...` for a control.
    pub direction: Option<String>,
    /// The direction the pass steers along, or whose control it is (None: a clean pass).
    pub steered: Option<String>,
    pub steps: Vec<StepIntervention>,
    pub description: Value,
}

impl Interventions {
    pub fn none() -> Interventions {
        Interventions { beta: None, direction: None, steered: None, steps: Vec::new(), description: json!([]) }
    }
}

/// The generation passes of the flags: a circuit's ([`circuit_passes`]); else none given, one
/// clean pass; else [`passes_of`] the intervention flags' conditions.
fn passes(g: &GenerateArgs, model: &Model) -> Result<Vec<Interventions>> {
    let (a, random_control) = (&g.interventions, g.random_control.then_some(g.seed));
    if let Some(path) = &g.circuit {
        if a.betas.is_some() || a.layers.is_some() || a.normalise {
            return Err(Error::input("--betas, --layers and --normalise are for --vector; a circuit's strengths are --alpha"));
        }
        let file = CircuitFile::read(path, &model.cfg)?;
        let (emotion, circuit) = file.circuit(g.emotion.as_deref())?;
        let alphas = parse_numbers(g.alpha.as_deref().ok_or_else(|| Error::input("--circuit needs --alpha A (or a list: --alpha=0,2,4)"))?, "--alpha")?;
        return circuit_passes(circuit, emotion, model, &alphas, &TokenScope::parse(&a.positions)?);
    }
    if a.vector.is_none() && a.project.is_none() && a.spec.is_none() {
        if a.betas.is_some() || a.layers.is_some() || a.normalise || random_control.is_some() {
            return Err(Error::input("--betas, --layers, --normalise and --random-control need --vector, --project or --spec"));
        }
        return Ok(vec![Interventions::none()]);
    }
    passes_of(&resolve_all(&a.specs()?, &model.cfg, true)?, random_control)
}

/// One generation pass per (direction, beta), directions in the order listed and each
/// direction's betas in order, applying every condition of that direction and beta (all its
/// layers, and every spec that names the same direction) together; with `random_control`
/// (a seed), each pass followed by the same pass along the same-norm random directions of
/// `experiments::steer::random_controls`.
pub fn passes_of(conditions: &[Condition], random_control: Option<u64>) -> Result<Vec<Interventions>> {
    // controls[i]: the control of condition i (None: not an `add`, no control).
    let mut controls: Vec<Option<Condition>> = vec![None; conditions.len()];
    if let Some(seed) = random_control {
        let adds = conditions.iter().enumerate().filter(|(_, c)| matches!(c.op, Op::Add { .. })).map(|(i, _)| i);
        for (i, c) in adds.zip(random_controls(conditions, seed)) {
            controls[i] = Some(c);
        }
        if controls.iter().all(Option::is_none) {
            return Err(Error::input("--random-control: no `add` intervention to control (a --project pass has no random control)"));
        }
    }
    let describe = describe_condition;
    let pass = |set: &[&Condition], steered: &str, beta: f32| Interventions {
        beta: Some(beta),
        direction: Some(set[0].direction.clone()),
        steered: Some(steered.to_string()),
        steps: set.iter().map(|c| step_intervention(c)).collect(),
        description: Value::Array(set.iter().map(|c| describe(c)).collect()),
    };
    let keys = distinct(conditions.iter().map(|c| (c.direction.clone(), c.beta.to_bits())));
    let mut out = Vec::new();
    for direction in distinct(keys.iter().map(|k| k.0.clone())) {
        for (_, beta) in keys.iter().filter(|k| k.0 == direction) {
            let members: Vec<usize> = (0..conditions.len()).filter(|&i| conditions[i].direction == direction && conditions[i].beta.to_bits() == *beta).collect();
            let beta = f32::from_bits(*beta);
            out.push(pass(&members.iter().map(|&i| &conditions[i]).collect::<Vec<_>>(), &direction, beta));
            let control: Vec<&Condition> = members.iter().filter_map(|&i| controls[i].as_ref()).collect();
            if !control.is_empty() {
                out.push(pass(&control, &direction, beta));
            }
        }
    }
    Ok(out)
}

/// What generations.jsonl and the manifests say about a condition a pass applies (with its units
/// when it has some).
fn describe_condition(c: &Condition) -> Value {
    let mut d = json!({"direction": c.direction, "site": c.site.to_string(), "layer": c.site.layer, "op": c.op.name(), "beta": c.beta, "positions": c.positions.describe()});
    if let Some(u) = &c.units {
        d["units"] = json!(u);
    }
    d
}

/// One generation pass per strength in `alphas` under the circuit of `emotion` at `scope`
/// (`experiments::circuit`): direction `circuit:<emotion>`, beta the strength, steered toward
/// `emotion`.
pub fn circuit_passes(circuit: &Circuit, emotion: &str, model: &Model, alphas: &[f32], scope: &TokenScope) -> Result<Vec<Interventions>> {
    if alphas.is_empty() {
        return Err(Error::input("--alpha: no strength given"));
    }
    alphas
        .iter()
        .map(|&alpha| {
            let conds = circuit.conditions(emotion, model, alpha, scope)?;
            Ok(Interventions {
                beta: Some(alpha),
                direction: Some(conds[0].direction.clone()),
                steered: Some(emotion.to_string()),
                steps: conds.iter().map(step_intervention).collect(),
                description: Value::Array(conds.iter().map(describe_condition).collect()),
            })
        })
        .collect()
}

/// The prompts: token ids and, where known, the text.
pub struct Inputs {
    pub ids: Vec<Vec<u32>>,
    pub texts: Vec<Option<String>>,
    /// What the manifest says about where they came from.
    pub source: Value,
}

fn load_inputs(a: &GenerateArgs, tok: Option<&PromptTokenizer>) -> Result<Inputs> {
    let inputs = &a.inputs;
    let no_tok = || Error::input(format!("{}: no tokenizer (needed to encode texts)", inputs.model.display()));
    if let Some(path) = &a.token_ids {
        return Inputs::token_ids(path, &inputs.model, inputs.template.chat);
    }
    let template = inputs.template.template()?;
    let tok = tok.ok_or_else(no_tok)?;
    if let Some(path) = &a.prompts {
        let (mut ids, mut texts) = (Vec::new(), Vec::new());
        for (i, p) in read_prompts_file(path)?.into_iter().enumerate() {
            let (text, prompt_ids) = match p {
                PromptEntry::Text(t) => (template.render(&t), template.encode(tok, &t)?),
                PromptEntry::Messages(m) => (tok.render_chat(&m, true)?, tok.encode_chat(&m, true)?),
            };
            if prompt_ids.is_empty() {
                return Err(Error::file(path, format!("prompt {i} encodes to no tokens")));
            }
            ids.push(prompt_ids);
            texts.push(Some(text));
        }
        return Ok(Inputs { ids, texts, source: json!({"prompts": path.display().to_string(), "template": template}) });
    }
    let ds = inputs.data.load(None)?.ok_or_else(|| Error::input("give the prompts: --prompts FILE, --dataset FILE or --token-ids FILE"))?;
    Inputs::dataset(&ds, &template, tok, a.quiet, json!({"dataset": dataset_json(&ds)}))
}

impl Inputs {
    /// Prompts given as token ids (a JSON list of lists), used verbatim: no texts.
    pub fn token_ids(path: &Path, model_dir: &Path, chat: bool) -> Result<Inputs> {
        let ids = load_prompts(PromptSource::TokenIds(path), model_dir, chat)?;
        let texts = vec![None; ids.len()];
        Ok(Inputs { ids, texts, source: json!({"token_ids": path.display().to_string()}) })
    }

    /// A dataset's texts through `template`; `source` (an object) says where they came from.
    pub fn dataset(ds: &Dataset, template: &Template, tok: &PromptTokenizer, quiet: bool, mut source: Value) -> Result<Inputs> {
        let ids = encode_dataset(ds, template, tok, quiet)?;
        let texts = ds.examples.iter().map(|e| Some(template.render(&e.text))).collect();
        source["template"] = json!(template);
        Ok(Inputs { ids, texts, source })
    }
}

/// One line of generations.jsonl; with `target`, the pass's steered direction as `target`
/// (the label `judge` measures it against).
fn generation_json(index: usize, prompt: Option<&str>, g: &Generation, pass: &Interventions, target: bool) -> Value {
    let mut line = json!({
        "index": index,
        "prompt": prompt,
        "text": g.text,
        "tokens": g.tokens,
        "stop": g.stop,
        "beta": pass.beta,
        "direction": pass.direction,
        "interventions": pass.description,
        "seed": g.seed,
    });
    if target {
        line["target"] = json!(pass.steered);
    }
    line
}

/// Generates every prompt under every pass (in order) and appends to `file` (generations.jsonl)
/// one line per (pass, prompt) ([`generation_json`]), flushed after each batch. Returns the
/// generations, pass-major.
#[allow(clippy::too_many_arguments)]
pub fn generate_passes(engine: &dyn Engine, inputs: &Inputs, spec: &GenerateSpec, passes: &[Interventions], tok: Option<&PromptTokenizer>, target: bool, bar: &ProgressBar, file: &mut JsonlFile) -> Result<Vec<Generation>> {
    let mut gens: Vec<Generation> = Vec::new();
    for pass in passes {
        if let Some(beta) = pass.beta {
            bar.set_message(format!("generate, {} beta {beta}", pass.direction.as_deref().unwrap_or("")));
        }
        gens.extend(generate(engine, &inputs.ids, spec, &pass.steps, tok, bar, &mut |first, batch| {
            file.write(&batch.iter().enumerate().map(|(i, g)| generation_json(first + i, inputs.texts[first + i].as_deref(), g, pass, target)).collect::<Vec<_>>())
        })?);
    }
    Ok(gens)
}

/// The one-line account of a generation run.
pub fn describe_run(gens: &[Generation], seconds: f64) -> String {
    let n_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    let count = |r: StopReason| gens.iter().filter(|g| g.stop == r).count();
    format!(
        "{} generations, {n_tokens} tokens in {seconds:.2} s ({:.1} tokens/s); stopped by eos {}, stop string {}, length {}",
        gens.len(),
        n_tokens as f64 / seconds,
        count(StopReason::Eos),
        count(StopReason::StopString),
        count(StopReason::Length)
    )
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let model_dir = &a.inputs.model;
    // With --token-ids the tokenizer is optional (texts are then not decoded).
    let tok = match PromptTokenizer::load(model_dir) {
        Ok(t) => Some(t),
        Err(_) if a.token_ids.is_some() && a.sampling.stop.is_empty() => None,
        Err(e) => return Err(e),
    };
    let inputs = load_inputs(&a, tok.as_ref())?;
    let model = Model::load(model_dir)?;
    let passes = passes(&a, &model)?;
    let spec = a.sampling.spec(&model, a.seed);
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let stats = TokenStats::of(&inputs.ids);
    if !a.quiet {
        eprintln!("{}", stats.describe());
    }

    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let manifest = |timings: Value| -> Result<()> {
        let mut fields = generation_fields(&model, engine.as_ref(), &inputs, a.inputs.template.chat, &stats, &spec);
        merge(&mut fields, json!({"interventions": passes.iter().map(|p| &p.description).collect::<Vec<_>>(), "timings_s": timings}));
        write_manifest(&a.out.join("manifest.json"), &command_manifest("generate", fields))
    };
    // Written first (a killed run still says what it was), rewritten with the timings at the end.
    manifest(Value::Null)?;
    let path = a.out.join("generations.jsonl");
    let bar = progress_bar(0, "generate", "tokens", a.quiet);
    let t_gen = Instant::now();
    let gens = generate_passes(engine.as_ref(), &inputs, &spec, &passes, tok.as_ref(), false, &bar, &mut JsonlFile::new(path.clone()))?;
    bar.finish_and_clear();
    let gen_s = t_gen.elapsed().as_secs_f64();
    let n_tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    manifest(json!({"generate": gen_s, "total": t0.elapsed().as_secs_f64(), "generated_tokens": n_tokens}))?;
    if !a.quiet {
        eprintln!("{}", describe_run(&gens, gen_s));
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

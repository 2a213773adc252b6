//! `patchbay circuit build | eval`: circuits as files (`experiments::circuit`), built from
//! component rankings and evaluated by judged generation against prompting and plain steering.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::generate::{Interventions, SamplingArgs, circuit_passes, describe_run, generate_passes, generation_fields, passes_of};
use super::inputs::{InputArgs, LabelArgs};
use super::interventions::{InterventionArgs, parse_numbers};
use super::judge::Judge;
use super::steer::{JudgeFlags, JudgeSetup, generation_inputs, judge_passes};
use super::{command_manifest, merge, progress_bar};
use patchbay::data::labels::parse_list;
use patchbay::data::template::{Template, TokenStats};
use patchbay::experiments::ablate::Component;
use patchbay::experiments::circuit::{BuildRule, Circuit, CircuitFile, CircuitOp, EVAL_CONDITIONS, FORMAT, Provenance, Scored, build, contrib_direction, contrib_tables, eval_chart, read_ablate_summary, read_contrib_table};
use patchbay::experiments::patch_files::write_manifest;
use patchbay::intervene::spec::resolve_all;
use patchbay::io::JsonlFile;
use patchbay::io::plot::distinct;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::sites::TokenScope;
use patchbay::{Error, Result};

const BUILD_HELP: &str = "Examples:
  patchbay components contrib --model M --dataset D --template tak --labels joy,anger,fear \\
      --vector runs/dirs/directions.safetensors:joy --layer 5 --out runs/contrib-joy
  patchbay circuit build --model M --contrib runs/contrib-joy --contrib runs/contrib-anger --labels joy,anger \\
      --top-k-heads 8 --top-k-neurons 64 --op scale --out runs/circuits.json
  patchbay circuit build --model M --ablate runs/heads --labels joy --top-k-heads 4 --threshold 0.05 \\
      --op add --vector runs/dirs/directions.safetensors --out runs/joy-add.json

A circuit is a set of heads and MLP neurons, each with an op (scale | add) and a weight (1 here),
for one emotion; one file holds a circuit per --labels emotion (a map emotion -> circuit).
Rankings: --contrib DIR (a `components contrib` run: heads.csv and neurons.csv, ranked by the
emotion's mean contribution; with several --contrib runs, each emotion takes the run whose
direction is named after it, else the only run) and/or --ablate DIR (an ablate run's
summary.csv, ranked by the effect on the emotion's logit: minus the mean logit change for zero,
mean and random ablations, plus it for scale and add; controls excluded). With both, the contrib
ranking picks and the ablate sweep must confirm (a positive effect of the head, or of a group
holding the neuron). The top --top-k-heads heads and --top-k-neurons neurons (neuron groups from
a summary alone) whose score is at least --threshold are kept; a layer's picked neurons form one
component. --op add needs a direction: --vector FILE.safetensors (the emotion's name in it,
read at resid_post of each component's layer), else the contrib run's direction (its source
and site).

Output --out FILE.json: {\"format\": \"patchbay-circuit-1\", \"provenance\": {model, command, date,
sources, rule}, \"circuits\": {EMOTION: {vector, vector_site, components: [{layer, head | neurons,
op, weight}]}}}. Unknown fields, components out of range for the model, components listed twice,
an empty map or circuit, a BOM are refused by every reader (one-line errors naming the entry).";

const EVAL_HELP: &str = "Examples:
  patchbay circuit eval --circuit runs/circuits.json --model M --sev ../shared/data/sev/sev.jsonl --limit 40 \\
      --template 'Context: {text} I feel' --alpha=1,2,4 --positions last:4+generated \\
      --vector runs/dirs/directions.safetensors:joy,anger --layers 3,4 --betas=4,8 --normalise \\
      --labels joy,anger,sadness,fear,neutral --max-new-tokens 24 --out runs/circuit-eval

Expression accuracy per emotion (Wang et al.): every prompt (--sev scenarios, --dataset or
--token-ids, through --template) generates clean once, then for each circuit of the file (or
--emotions) under
  circuit   the circuit at each --alpha (`patchbay generate --circuit`), at --positions;
  prompted  no intervention, the prompt prefixed by --instruction naming the emotion (default
            'Write as someone who feels {emotion}. '; needs text prompts);
  steered   with --vector FILE:E1,E2 (each a circuit's emotion), --layers, --betas, ... (steer's
            grammar): the emotion's direction added at each beta, as `steer --mode generate`.
Each text is judged exactly as `steer --mode generate` judges (--judge-template, --judge-model,
--judge-probe, --labels: default the emotions); decoding flags as `generate`.

Outputs in --out:
  generations.jsonl  generate's rows with target (the emotion), appended per batch: the clean
                     pass, the circuit and steered passes, then the prompted passes
  judged.jsonl       judge's rows: condition (clean | circuit | prompted | steered), index,
                     direction (circuit:E, prompt:E, E), beta (alpha for circuit rows), target,
                     label_logits, pred, text; flushed per chunk
  summary.csv        per condition, target (the direction column) and beta: n, n_empty,
                     n_target, accuracy (share judged as the target), share:<label>; clean rows
                     once per emotion
  valence.csv        the same by the target's valence
  accuracy.png       accuracy per emotion: circuit against alpha, steered against beta,
                     prompted and clean as flat lines
  judge.json, manifest.json";

#[derive(Args)]
pub struct CircuitArgs {
    #[command(subcommand)]
    what: CircuitCommand,
}

#[derive(Subcommand)]
enum CircuitCommand {
    /// A circuit per emotion from component rankings (components contrib tables, ablate summaries): a JSON file.
    #[command(after_help = BUILD_HELP)]
    Build(BuildArgs),
    /// Expression accuracy of circuit-modulated generation against prompting and plain steering, judged locally.
    #[command(after_help = EVAL_HELP)]
    Eval(EvalArgs),
}

#[derive(Args)]
struct BuildArgs {
    /// The model the circuits are for (components are checked against it).
    #[arg(long)]
    model: PathBuf,
    /// A `components contrib` output directory (repeatable: one per emotion's direction).
    #[arg(long)]
    contrib: Vec<PathBuf>,
    /// A `patchbay ablate` output directory (its summary.csv).
    #[arg(long)]
    ablate: Option<PathBuf>,
    /// The emotions, comma-separated: one circuit each (labels of the rankings).
    #[arg(long)]
    labels: String,
    /// Heads per circuit.
    #[arg(long, default_value_t = 0)]
    top_k_heads: usize,
    /// Neurons per circuit (neuron groups, ranked from an ablate summary alone).
    #[arg(long, default_value_t = 0)]
    top_k_neurons: usize,
    /// Keep only components whose score is at least this.
    #[arg(long, allow_hyphen_values = true)]
    threshold: Option<f64>,
    /// scale or add.
    #[arg(long, default_value = "scale")]
    op: String,
    /// The directions file of --op add (FILE.safetensors; each emotion's own name in it).
    #[arg(long)]
    vector: Option<String>,
    /// The circuit file written.
    #[arg(long)]
    out: PathBuf,
    /// No messages.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct EvalArgs {
    /// The circuit file.
    #[arg(long)]
    circuit: PathBuf,
    /// The circuits evaluated, comma-separated [default: every circuit of the file].
    #[arg(long)]
    emotions: Option<String>,
    /// Circuit strengths, comma-separated.
    #[arg(long, allow_hyphen_values = true)]
    alpha: String,
    /// The prompting condition's prefix, with {emotion}.
    #[arg(long, default_value = "Write as someone who feels {emotion}. ")]
    instruction: String,
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    /// The prompts are the scenarios of this SEV file, each in --sev-variant, as `{scenario}. {event}` through --template.
    #[arg(long, conflicts_with_all = ["dataset", "token_ids"])]
    sev: Option<PathBuf>,
    /// The variant of each --sev scenario prompted.
    #[arg(long, default_value = "neutral", requires = "sev")]
    sev_variant: String,
    #[command(flatten)]
    interventions: InterventionArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    judge: JudgeFlags,
    /// Seed of the sampling draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: CircuitArgs) -> Result<()> {
    match a.what {
        CircuitCommand::Build(b) => run_build(b),
        CircuitCommand::Eval(e) => run_eval(e),
    }
}

fn run_build(a: BuildArgs) -> Result<()> {
    let op = CircuitOp::parse(&a.op)?;
    if a.contrib.is_empty() && a.ablate.is_none() {
        return Err(Error::input("give the rankings: --contrib DIR (components contrib) and/or --ablate DIR (ablate)"));
    }
    if a.top_k_heads == 0 && a.top_k_neurons == 0 {
        return Err(Error::input("give --top-k-heads K and/or --top-k-neurons K"));
    }
    let model = Model::load(&a.model)?;
    let emotions = parse_list(&a.labels, "--labels")?;
    let rule = BuildRule { top_k_heads: a.top_k_heads, top_k_neurons: a.top_k_neurons, threshold: a.threshold, op };
    let contribs = a.contrib.iter().map(|d| Ok((d, contrib_direction(d)?))).collect::<Result<Vec<_>>>()?;
    let mut sources: Vec<String> = Vec::new();
    let mut circuits = BTreeMap::new();
    for e in &emotions {
        let contrib = match contribs.iter().find(|(_, (_, name, _))| name == e) {
            Some(c) => Some(c),
            None if contribs.len() == 1 => Some(&contribs[0]),
            None if contribs.is_empty() => None,
            None => return Err(Error::input(format!("--contrib: no run's direction is named `{e}` (they are: {})", contribs.iter().map(|c| c.1.1.as_str()).collect::<Vec<_>>().join(", ")))),
        };
        let ablate = a.ablate.as_ref().map(|d| d.join("summary.csv"));
        let ablated: Option<Vec<Scored>> = ablate.as_deref().map(|p| read_ablate_summary(p, e)).transpose()?;
        let ranked: Vec<Scored> = match (contrib, &ablated) {
            (Some((dir, _)), _) => {
                let mut v = Vec::new();
                for t in contrib_tables(dir) {
                    v.extend(read_contrib_table(&t, e)?);
                    sources.push(t.display().to_string());
                }
                v
            }
            (None, Some(s)) => s.clone(),
            (None, None) => unreachable!("checked: some ranking is given"),
        };
        if let Some(p) = &ablate {
            sources.push(p.display().to_string());
        }
        if ranked.is_empty() {
            return Err(Error::input(format!("`{e}`: the rankings have no rows of this label")));
        }
        let confirm = |c: &Component| match (&ablated, contrib) {
            (Some(s), Some(_)) => s.iter().any(|x| x.score > 0.0 && x.component.layer() == c.layer() && x.component.kind() == c.kind() && c.units().iter().all(|u| x.component.units().contains(u))),
            _ => true,
        };
        let components = build(&ranked, &rule, &confirm);
        if components.is_empty() {
            return Err(Error::input(format!("`{e}`: no component passes the rule ({})", rule.describe(contrib.is_some(), ablated.is_some()))));
        }
        let (vector, vector_site) = match (&a.vector, contrib) {
            (Some(v), _) => (Some(format!("{v}:{e}")), None),
            (None, Some((_, (source, _, site)))) => (Some(source.clone()), Some(site.clone())),
            (None, None) if op == CircuitOp::Add => return Err(Error::input("--op add needs a direction: --vector FILE.safetensors, or a --contrib run")),
            (None, None) => (None, None),
        };
        circuits.insert(e.clone(), Circuit { vector, vector_site, components });
    }
    let rule_text = rule.describe(!a.contrib.is_empty(), a.ablate.is_some());
    let file = CircuitFile {
        format: FORMAT.to_string(),
        provenance: Provenance { model: a.model.display().to_string(), command: std::env::args().collect::<Vec<_>>().join(" "), date: chrono::Utc::now().to_rfc3339(), sources: distinct(sources.into_iter()), rule: rule_text },
        circuits,
    };
    file.write(&a.out, &model.cfg)?;
    if !a.quiet {
        for (e, c) in &file.circuits {
            eprintln!("{e}: {} components", c.components.len());
        }
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let model = Model::load(&a.inputs.model)?;
    let file = CircuitFile::read(&a.circuit, &model.cfg)?;
    let emotions: Vec<String> = match &a.emotions {
        Some(list) => parse_list(list, "--emotions")?,
        None => file.circuits.keys().cloned().collect(),
    };
    let alphas = parse_numbers(&a.alpha, "--alpha")?;
    let scope = TokenScope::parse(&a.interventions.positions)?;
    let tok = PromptTokenizer::load(&a.inputs.model)?;
    if a.labels.token_ids.is_some() {
        return Err(Error::input("circuit eval: the prompted condition needs text prompts (--sev or --dataset), not --token-ids"));
    }
    let sev = a.sev.as_deref().map(|p| (p, a.sev_variant.as_str()));
    let inputs = generation_inputs(&a.inputs, None, sev, None, &tok, a.quiet)?;

    // Passes on the plain prompts: clean, each emotion's circuit at each alpha, its steering.
    let mut passes = vec![Interventions::none()];
    // Each pass's condition: an index into EVAL_CONDITIONS (clean, circuit, prompted, steered).
    let mut pass_condition = vec![0];
    for e in &emotions {
        let (name, circuit) = file.circuit(Some(e))?;
        let p = circuit_passes(circuit, name, &model, &alphas, &scope)?;
        pass_condition.extend(std::iter::repeat_n(1, p.len()));
        passes.extend(p);
    }
    let iv = &a.interventions;
    let steering = match iv.vector.is_some() || iv.project.is_some() || iv.spec.is_some() {
        true => {
            let conditions = resolve_all(&a.interventions.specs()?, &model.cfg, true)?;
            if let Some(c) = conditions.iter().find(|c| !emotions.contains(&c.direction)) {
                return Err(Error::input(format!("--vector: direction `{}` is not one of the evaluated circuits ({})", c.direction, emotions.join(", "))));
            }
            passes_of(&conditions, None)?
        }
        false if iv.betas.is_some() || iv.layers.is_some() || iv.normalise => return Err(Error::input("--betas, --layers and --normalise steer along --vector (the steered condition); the circuit's strengths are --alpha")),
        false => Vec::new(),
    };
    pass_condition.extend(std::iter::repeat_n(3, steering.len()));
    passes.extend(steering);
    // The prompted passes, each on its own prompts, after the others.
    let n_plain = passes.len();
    let base = a.inputs.template.template()?;
    let mut prompted_inputs = Vec::new();
    for e in &emotions {
        let instruction = a.instruction.replace("{emotion}", e);
        let mut t = Template::parse(&format!("{instruction}{}", base.body)).map_err(|err| Error::input(format!("--instruction: {err}")))?.with_shots(base.shots.clone())?;
        t.chat = base.chat;
        let p_inputs = generation_inputs(&a.inputs, None, sev, Some(t), &tok, true)?;
        let pass = Interventions { beta: None, direction: Some(format!("prompt:{e}")), steered: Some(e.clone()), steps: Vec::new(), description: json!([{"instruction": instruction}]) };
        prompted_inputs.push(p_inputs);
        passes.push(pass);
        pass_condition.push(2);
    }

    let (judge_model, judge_tok) = a.judge.load()?;
    let judge_tok = judge_tok.as_ref().unwrap_or(&tok);
    let judge_of = judge_model.as_ref().unwrap_or(&model);
    let JudgeSetup { scorer, targets, valence, template } = a.judge.setup(&a.labels, &emotions, judge_of, judge_tok)?;
    let spec = a.sampling.spec(&model, a.seed);
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let judge_engine = judge_model.as_ref().map(|m| a.inputs.engine.load(m, a.inputs.allow_nonfinite)).transpose()?;
    let judge = Judge { engine: judge_engine.as_deref().unwrap_or(engine.as_ref()), model: judge_of, tok: judge_tok, template, scorer };
    let stats = TokenStats::of(&inputs.ids);
    if !a.quiet {
        eprintln!("{}; {} passes ({} emotions: circuit x {} alphas, prompted, steered)", stats.describe(), passes.len(), emotions.len(), alphas.len());
    }

    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let manifest = |timings: Value| -> Result<()> {
        let mut fields = generation_fields(&model, engine.as_ref(), &inputs, a.inputs.template.chat, &stats, &spec);
        merge(
            &mut fields,
            json!({
                "circuit": {"path": a.circuit.display().to_string(), "provenance": file.provenance, "emotions": emotions},
                "alphas": alphas,
                "instruction": a.instruction,
                "conditions": EVAL_CONDITIONS,
                "passes": passes.iter().map(|p| json!({"direction": p.direction, "beta": p.beta, "interventions": p.description})).collect::<Vec<_>>(),
                "judge": judge.describe(),
                "timings_s": timings,
            }),
        );
        write_manifest(&a.out.join("manifest.json"), &command_manifest("circuit eval", fields))
    };
    manifest(Value::Null)?;

    let bar = progress_bar(0, "generate", "tokens", a.quiet);
    let t_gen = Instant::now();
    let mut out = JsonlFile::new(a.out.join("generations.jsonl"));
    let mut gens = generate_passes(engine.as_ref(), &inputs, &spec, &passes[..n_plain], Some(&tok), true, &bar, &mut out)?;
    for (p_inputs, pass) in prompted_inputs.iter().zip(&passes[n_plain..]) {
        gens.extend(generate_passes(engine.as_ref(), p_inputs, &spec, std::slice::from_ref(pass), Some(&tok), true, &bar, &mut out)?);
    }
    bar.finish_and_clear();
    let gen_s = t_gen.elapsed().as_secs_f64();
    if !a.quiet {
        eprintln!("{}", describe_run(&gens, gen_s));
    }
    let t_judge = Instant::now();
    judge_passes(&judge, (&EVAL_CONDITIONS, eval_chart), &passes, &pass_condition, &emotions, &targets, &gens, &valence, a.sampling.batch_size, a.quiet, &a.out)?;
    let judge_s = t_judge.elapsed().as_secs_f64();
    manifest(json!({"generate": gen_s, "judge": judge_s, "total": t0.elapsed().as_secs_f64()}))?;
    if !a.quiet {
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}

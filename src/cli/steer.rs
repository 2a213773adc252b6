//! `patchbay steer --mode labels`: steering sweeps read through a label set.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;

use super::generate::{Inputs, Interventions, SamplingArgs, describe_run, generate_passes, generation_fields, passes_of};
use super::inputs::{InputArgs, LabelArgs, Prompts, manifest};
use super::interventions::InterventionArgs;
use super::judge::{Judge, Scorer, print_summary, scorer};
use super::{command_manifest, merge, progress_bar};
use patchbay::data::labels::parse_list;
use patchbay::data::sev::{self, DEFAULT_CONTEXT};
use patchbay::data::template::{Template, TokenStats};
use patchbay::experiments::dataset_files::dataset_json;
use patchbay::experiments::generate::Generation;
use patchbay::experiments::judge::{GenerationRow, SummaryRow as JudgeSummary, VALENCES, by_valence, default_valence, summarize as judge_summarize, summary_csv as judge_summary_csv};
use patchbay::experiments::patch_files::write_manifest;
use patchbay::experiments::steer::{GENERATION_CONDITIONS, expression_chart, expression_rows, label_sweep, random_controls};
use patchbay::intervene::spec::resolve_all;
use patchbay::io::JsonlFile;
use patchbay::io::plot::LinePanels;
use patchbay::io::plot::distinct;
use patchbay::model::Model;
use patchbay::model::tokenizer::PromptTokenizer;
use patchbay::{Error, Result};

const STEER_HELP: &str = "Examples:
  patchbay directions --model M --dataset emotions.csv --template tak --out runs/dirs
  patchbay steer --mode labels --model M --dataset emotions.csv --template tak --labels anger,joy,fear,sadness \\
      --vector runs/dirs/directions.safetensors:joy --site resid_post --layers 1,2 --betas=-6,3,8 --positions all --out runs/steer
  patchbay steer --mode labels --model M --token-ids ids.json --label-token-ids 5,6,7 \\
      --vector v.safetensors --betas=1,2 --normalise --positions last:3 --out runs/ids
  patchbay steer --mode labels --model M --dataset D --template tak --project dirs.safetensors:joy+anger --betas 1 --out runs/po
  patchbay steer --mode labels --model M --dataset D --template tak --spec sweeps.json --out runs/spec
  patchbay directions --method context-averaged --model M --dataset sev.jsonl --sites resid_post --out runs/sev_dirs
  patchbay steer --mode generate --model M --sev sev.jsonl --limit 40 --template 'Context: {text} I feel' \
      --vector runs/dirs/directions.safetensors:anger,joy,sadness,fear --layers 3,4 --positions last:4+generated \
      --betas=4,8 --normalise --max-new-tokens 24 --labels anger,joy,sadness,fear,surprise,neutral --out runs/wang

Every prompt is scored clean and under every condition (layer x beta, per direction): at the
site of that layer, at --positions, x <- x + beta v (v / ||v|| with --normalise), or with
--project x <- x + v - beta P x (P the projector onto the subspace, v = --vector or 0). A name
in --vector is a tensor name or, at each layer, <site>/<NAME> (so `dirs.safetensors:joy` with
--layers 1,2 takes each layer's own joy direction from `patchbay directions`). --spec FILE.json
takes one object or a list with the fields vector, project, site, layers, positions, betas,
normalise (unknown fields are an error). A same-norm random direction (seeded by --seed, one
per direction and layer) is steered too unless --no-random-control (not for --project).
Steered runs resume from each prompt's clean run at the steered layer (all conditions of a
layer are segments of one batched forward); a condition that changes nothing (beta 0) is the
clean run itself, its label logits those of clean.jsonl bit for bit.

--mode generate (Wang et al.'s steered generation): each prompt generates clean once, then
along each listed direction (`FILE:A,B,C`: one direction each) at each beta, each steered pass
followed by its same-norm random control (unless --no-random-control), with the decoding flags of
`patchbay generate` (--max-new-tokens, --temperature, --top-p, --stop, --batch-size; a prompt's
draws depend only on --seed and its index). Prompts: --sev FILE (each scenario's --sev-variant,
default neutral, as `{scenario}. {event}` through --template; --limit N scenarios), --dataset or
--token-ids. Every text is then judged as `patchbay judge` does (--judge-template, default tak,
on --judge-model or the steered model) over --labels (default: the directions' names; every
direction must be a label: it is the target its passes are measured against). Expression
accuracy = the share of texts judged as the target; the clean texts are every direction's
baseline. Valences (for valence.csv) come from a built-in map of the studies' emotions
(positive: joy, pride, relief, trust, ...; negative: anger, sadness, fear, disgust, guilt, shame,
boredom, ...; neutral; surprise and unknown labels: other), overridden by --valence joy=positive,...

Outputs in --out (labels mode):
  scores.jsonl  one object per (prompt, layer, direction, beta), appended as batches finish:
                index, layer, site, direction (the vector's name; `random` for the control;
                project-out:<subspace>, project-set:<vector>:<subspace> with --project),
                beta, label_logits (label order), pred, clean_pred, and gold when known
  clean.jsonl   the clean run: index, label_logits, pred (and gold)
  summary.csv   layer, site, direction, beta, n, share:<label> (share of prompts predicted as
                each label), mean_logit_change:<label> (mean steered - clean label logit)
  shares.png    predicted-label shares against beta, one panel per layer and direction
  manifest.json model, device, command line, inputs, labels, specs, counts, timings, status

Outputs in --out (generate mode):
  generations.jsonl  `patchbay generate`'s rows, the clean pass first, then per direction and beta
                     the steered pass and its control; `target` names the direction a row is
                     steered along (or controls); null for clean rows
  judged.jsonl       `patchbay judge`'s rows: condition (clean | steered | random), index,
                     direction, beta, target, label_logits, pred, text
  summary.csv        per condition, target (the `direction` column) and beta: n, n_empty,
                     n_target, accuracy (share judged as the target), share:<label>; clean rows
                     once per target
  valence.csv        the same by the target's valence: accuracy = share judged with the target's
                     valence, share:<valence>
  accuracy.png       expression accuracy against beta per target: steered, random, clean
  judge.json, manifest.json  the judge, the summaries; the command, model, passes, sampling";

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
pub enum Mode {
    /// Score a label set at the last token of each steered prompt.
    Labels,
    /// Generate from each prompt clean, steered along each direction and along its random control; judge the emotion the texts express.
    Generate,
}

#[derive(Args)]
#[command(after_help = STEER_HELP)]
pub struct SteerArgs {
    /// What is read from the steered runs.
    #[arg(long, value_enum, default_value = "labels")]
    mode: Mode,
    /// Only the prompts the model predicts correctly over the label set (needs gold labels), as Tak et al. select theirs (--mode labels).
    #[arg(long)]
    only_correct: bool,
    #[command(flatten)]
    inputs: InputArgs,
    #[command(flatten)]
    labels: LabelArgs,
    #[command(flatten)]
    interventions: InterventionArgs,
    /// Seed of the random-direction control.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the same-norm random-direction control.
    #[arg(long)]
    no_random_control: bool,
    /// Token rows per forward pass (clean passes and steered segments; labels mode).
    #[arg(long, default_value_t = 2048)]
    batch_rows: usize,
    /// Generate mode: the prompts are the scenarios of this scenario/event JSONL file (SEV), each in --sev-variant, as `{scenario}. {event}` through --template.
    #[arg(long, conflicts_with_all = ["dataset", "token_ids"])]
    sev: Option<PathBuf>,
    /// Generate mode: the variant of each --sev scenario prompted.
    #[arg(long, default_value = "neutral", requires = "sev")]
    sev_variant: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    judge: JudgeFlags,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// How generated texts are judged: the flags of `steer --mode generate` and `circuit eval`.
#[derive(Args, Clone, Debug)]
pub struct JudgeFlags {
    /// Generate mode: the judge model [default: the steered model, on the same engine].
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// Generate mode: the judging prompt, a preset (tak, tak-list, tak-guess, plain) or a string with {text}.
    #[arg(long, default_value = "tak")]
    pub judge_template: String,
    /// Generate mode: judge by a saved probe of the judge model (a `patchbay probe` weight file; its classes are the labels) instead of label scoring.
    #[arg(long)]
    pub judge_probe: Option<PathBuf>,
    /// Generate mode: the position of --judge-probe.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    pub judge_probe_position: i64,
    /// Generate mode: wrap each judging prompt in the judge's chat template.
    #[arg(long)]
    pub judge_chat: bool,
    /// Generate mode: valences of labels, LABEL=positive|negative|neutral|other (comma-separated), over the built-in map.
    #[arg(long)]
    pub valence: Option<String>,
}

/// A judge's parts before its engine: the scorer, the label of each steered direction, each
/// label's valence, the judging template.
pub struct JudgeSetup {
    pub scorer: Scorer,
    pub targets: Vec<usize>,
    pub valence: Vec<usize>,
    pub template: Template,
}

impl JudgeFlags {
    /// --judge-model's model and tokenizer (None: the generating model judges).
    pub fn load(&self) -> Result<(Option<Model>, Option<PromptTokenizer>)> {
        Ok((self.judge_model.as_deref().map(Model::load).transpose()?, self.judge_model.as_deref().map(PromptTokenizer::load).transpose()?))
    }

    /// The judge of `model` (the judging model) over the labels of `labels` (default: the
    /// `directions`); Err when a direction is not a label.
    pub fn setup(&self, labels: &LabelArgs, directions: &[String], model: &Model, tok: &PromptTokenizer) -> Result<JudgeSetup> {
        let scorer = scorer(self.judge_probe.as_deref(), self.judge_probe_position, labels.labels.as_deref(), labels.label_token_ids.as_deref(), Some(directions), model, tok)?;
        let names = scorer.names().to_vec();
        let targets: Vec<usize> = directions
            .iter()
            .map(|d| names.iter().position(|n| n == d).ok_or_else(|| Error::input(format!("direction `{d}` is not one of the judge's labels ({}): steer along label-named directions (--vector FILE:anger,joy) and give --labels with them", names.join(", ")))))
            .collect::<Result<_>>()?;
        let valence = valences(&names, self.valence.as_deref())?;
        let mut template = Template::parse(&self.judge_template)?;
        template.chat = self.judge_chat;
        Ok(JudgeSetup { scorer, targets, valence, template })
    }
}

pub fn run(a: SteerArgs) -> Result<()> {
    match a.mode {
        Mode::Labels => run_labels(a),
        Mode::Generate => run_generate(a),
    }
}

fn run_labels(a: SteerArgs) -> Result<()> {
    let generation_only = [("--sev", a.sev.is_some()), ("--judge-model", a.judge.judge_model.is_some()), ("--judge-probe", a.judge.judge_probe.is_some()), ("--valence", a.judge.valence.is_some()), ("--stop", !a.sampling.stop.is_empty()), ("--judge-chat", a.judge.judge_chat)];
    if let Some((flag, _)) = generation_only.iter().find(|f| f.1) {
        return Err(Error::input(format!("{flag} is for --mode generate")));
    }
    let t0 = Instant::now();
    let specs = a.interventions.specs()?;
    let mut p = Prompts::load(&a.inputs, &a.labels, a.quiet)?;
    let model = Model::load(&a.inputs.model)?;
    let mut conditions = resolve_all(&specs, &model.cfg, false)?;
    if !a.no_random_control {
        let controls = random_controls(&conditions, a.seed);
        conditions.extend(controls);
    }
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    if a.only_correct {
        p.retain_correct(engine.as_ref(), a.quiet)?;
    }
    let gold = p.gold()?;
    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let Prompts { ids: prompts, dataset: ds, template, labels } = p;
    let bar = progress_bar((prompts.len() * conditions.len()) as u64, "steer", "runs", a.quiet);
    let t_run = Instant::now();
    let sweep = label_sweep(engine.as_ref(), &prompts, &labels, &gold, &conditions, a.batch_rows, &bar, &a.out)?;
    bar.finish_and_clear();
    let run_s = t_run.elapsed().as_secs_f64();
    let extra = json!({
        "mode": "labels",
        "interventions": specs,
        "random_control": (!a.no_random_control).then_some(json!({"seed": a.seed})),
        "n_prompts": prompts.len(),
        "n_conditions": conditions.len(),
        "n_rows": sweep.rows.len(),
        "batch_rows": a.batch_rows,
        "timings_s": {"steer": run_s, "total": t0.elapsed().as_secs_f64()},
        "peak_rss_bytes": patchbay::io::tensorfile::peak_rss_bytes(),
        "status": "complete",
    });
    let manifest = manifest("steer", &model, engine.as_ref(), (ds.as_ref(), template.as_ref(), &labels), &a.labels, extra);
    patchbay::io::write_atomic(&a.out.join("manifest.json"), serde_json::to_string_pretty(&manifest).map_err(|e| Error::input(e.to_string()))?.as_bytes())?;
    if !a.quiet {
        eprintln!("{} prompts x {} conditions; wrote {}", prompts.len(), conditions.len(), a.out.join("scores.jsonl").display());
    }
    Ok(())
}

/// The prompts of generate mode: --token-ids verbatim, else the --sev scenarios (each in
/// `sev_variant`) or the --dataset texts through `template` (None: --template).
pub fn generation_inputs(inputs: &InputArgs, token_ids: Option<&Path>, sev: Option<(&Path, &str)>, template: Option<Template>, tok: &PromptTokenizer, quiet: bool) -> Result<Inputs> {
    if let Some(path) = token_ids {
        return Inputs::token_ids(path, &inputs.model, inputs.template.chat);
    }
    let template = template.map_or_else(|| inputs.template.template(), Ok)?;
    match sev {
        Some((path, variant)) => {
            let s = sev::load(path, DEFAULT_CONTEXT, Some(&[variant.to_string()]), inputs.data.limit)?;
            let source = json!({"sev": path.display().to_string(), "variant": variant, "context": DEFAULT_CONTEXT, "scenarios": s.dataset.examples.len()});
            Inputs::dataset(&s.dataset, &template, tok, quiet, source)
        }
        None => {
            let ds = inputs.data.load(None)?.ok_or_else(|| Error::input("give the prompts: --sev FILE, --dataset FILE or --token-ids FILE"))?;
            Inputs::dataset(&ds, &template, tok, quiet, json!({"dataset": dataset_json(&ds)}))
        }
    }
}

/// Each label's valence (an index into `VALENCES`): the built-in map, overridden by --valence.
fn valences(labels: &[String], overrides: Option<&str>) -> Result<Vec<usize>> {
    let mut v: Vec<usize> = labels.iter().map(|n| default_valence(n)).collect();
    for item in overrides.map(|o| parse_list(o, "valence")).transpose()?.unwrap_or_default() {
        let bad = || Error::input(format!("--valence: `{item}`: expected LABEL=VALENCE with VALENCE one of {}", VALENCES.join(", ")));
        let (label, valence) = item.split_once('=').ok_or_else(bad)?;
        let g = VALENCES.iter().position(|x| *x == valence.trim()).ok_or_else(bad)?;
        let l = labels.iter().position(|n| n == label.trim()).ok_or_else(|| Error::input(format!("--valence: `{label}` is not one of the labels ({})", labels.join(", "))))?;
        v[l] = g;
    }
    Ok(v)
}

fn run_generate(a: SteerArgs) -> Result<()> {
    if a.only_correct {
        return Err(Error::input("--only-correct is for --mode labels (generated texts have no gold label to predict)"));
    }
    let t0 = Instant::now();
    let specs = a.interventions.specs()?;
    let model = Model::load(&a.inputs.model)?;
    let conditions = resolve_all(&specs, &model.cfg, true)?;
    // The clean pass first: every direction's baseline.
    let mut passes = vec![Interventions::none()];
    passes.extend(passes_of(&conditions, (!a.no_random_control).then_some(a.seed))?);
    // The texts are judged: the tokenizer is needed to decode them.
    let tok = PromptTokenizer::load(&a.inputs.model)?;
    let inputs = generation_inputs(&a.inputs, a.labels.token_ids.as_deref(), a.sev.as_deref().map(|p| (p, a.sev_variant.as_str())), None, &tok, a.quiet)?;

    // The judge: another model, or the steered one on its engine.
    let (judge_model, judge_tok) = a.judge.load()?;
    let judge_tok = judge_tok.as_ref().unwrap_or(&tok);
    let directions = distinct(conditions.iter().map(|c| c.direction.clone()));
    let judge_of = judge_model.as_ref().unwrap_or(&model);
    let JudgeSetup { scorer, targets, valence, template: judge_template } = a.judge.setup(&a.labels, &directions, judge_of, judge_tok)?;
    let names = scorer.names().to_vec();
    let spec = a.sampling.spec(&model, a.seed);
    let engine = a.inputs.engine.load(&model, a.inputs.allow_nonfinite)?;
    let judge_engine = judge_model.as_ref().map(|m| a.inputs.engine.load(m, a.inputs.allow_nonfinite)).transpose()?;
    let judge = Judge { engine: judge_engine.as_deref().unwrap_or(engine.as_ref()), model: judge_of, tok: judge_tok, template: judge_template, scorer };
    let stats = TokenStats::of(&inputs.ids);
    if !a.quiet {
        eprintln!("{}; {} passes (clean, {} directions x betas{})", stats.describe(), passes.len(), directions.len(), if a.no_random_control { "" } else { ", each with its random control" });
    }

    let _lock = patchbay::io::OutLock::acquire(&a.out)?;
    let manifest = |timings: serde_json::Value| -> Result<()> {
        let mut fields = generation_fields(&model, engine.as_ref(), &inputs, a.inputs.template.chat, &stats, &spec);
        merge(
            &mut fields,
            json!({
                "mode": "generate",
                "interventions": specs,
                "passes": passes.iter().map(|p| json!({"direction": p.direction, "beta": p.beta, "interventions": p.description})).collect::<Vec<_>>(),
                "random_control": (!a.no_random_control).then_some(json!({"seed": a.seed})),
                "judge": judge.describe(),
                "valence": names.iter().zip(&valence).map(|(l, &v)| (l.clone(), VALENCES[v])).collect::<std::collections::BTreeMap<_, _>>(),
                "timings_s": timings,
            }),
        );
        write_manifest(&a.out.join("manifest.json"), &command_manifest("steer", fields))
    };
    manifest(serde_json::Value::Null)?;

    let bar = progress_bar(0, "generate", "tokens", a.quiet);
    let t_gen = Instant::now();
    let gens = generate_passes(engine.as_ref(), &inputs, &spec, &passes, Some(&tok), true, &bar, &mut JsonlFile::new(a.out.join("generations.jsonl")))?;
    bar.finish_and_clear();
    let gen_s = t_gen.elapsed().as_secs_f64();
    if !a.quiet {
        eprintln!("{}", describe_run(&gens, gen_s));
    }

    // Conditions: clean, steered (a pass along its own direction), random (its control).
    let pass_condition: Vec<usize> = passes
        .iter()
        .map(|pass| match (&pass.steered, &pass.direction) {
            (None, _) => 0,
            (Some(s), Some(d)) if s == d => 1,
            _ => 2,
        })
        .collect();
    let t_judge = Instant::now();
    judge_passes(&judge, (&GENERATION_CONDITIONS, expression_chart), &passes, &pass_condition, &directions, &targets, &gens, &valence, a.sampling.batch_size, a.quiet, &a.out)?;
    let judge_s = t_judge.elapsed().as_secs_f64();
    manifest(json!({"generate": gen_s, "judge": judge_s, "total": t0.elapsed().as_secs_f64()}))?;
    if !a.quiet {
        eprintln!("wrote {}", a.out.display());
    }
    Ok(())
}

/// Judges generations (`gens`: pass-major, the same number of prompts per pass) as `judge` does
/// and writes judged.jsonl, summary.csv, valence.csv, judge.json and accuracy.png (`chart` of the
/// summary) in `out`, and prints the summary unless `quiet`. Pass p is of condition `pass_condition[p]` (an index into `conditions`); a pass that steers toward one of
/// `directions` (its `steered`) is measured against the label `targets[j]` of that direction,
/// and passes without one (clean) are every direction's baseline. The summary is the expression
/// accuracy per condition, target and beta.
#[allow(clippy::too_many_arguments)]
pub fn judge_passes(
    judge: &Judge,
    (conditions, chart): (&[&str], fn(&[JudgeSummary]) -> LinePanels),
    passes: &[Interventions],
    pass_condition: &[usize],
    directions: &[String],
    targets: &[usize],
    gens: &[Generation],
    valence: &[usize],
    batch_size: usize,
    quiet: bool,
    out: &Path,
) -> Result<()> {
    let n = gens.len() / passes.len().max(1);
    let mut rows: Vec<(usize, GenerationRow)> = Vec::with_capacity(gens.len());
    let mut row_targets: Vec<Option<usize>> = Vec::with_capacity(gens.len());
    for (p, pass) in passes.iter().enumerate() {
        let target = match &pass.steered {
            Some(s) => Some(targets[directions.iter().position(|d| d == s).ok_or_else(|| Error::input(format!("a pass steers toward `{s}`, not one of {}", directions.join(", "))))?]),
            None => None,
        };
        for (i, g) in gens[p * n..(p + 1) * n].iter().enumerate() {
            // The beta as generations.jsonl writes it (shortest f32 text), so both files agree.
            let beta = pass.beta.map(|b| b.to_string().parse::<f64>().expect("an f32 prints as a number"));
            rows.push((pass_condition[p], GenerationRow { index: i, text: g.text.clone().unwrap_or_default(), beta, direction: pass.direction.clone(), target: pass.steered.clone() }));
            row_targets.push(target);
        }
    }
    let conditions: Vec<String> = conditions.iter().map(|c| c.to_string()).collect();
    let conditions = &conditions;
    let bar = progress_bar(rows.len() as u64, "judge", "texts", quiet);
    let judged = judge.judge(conditions, &rows, &row_targets, batch_size, quiet, &bar, &out.join("judged.jsonl"))?;
    bar.finish_and_clear();
    let names = judge.names();
    let expression = expression_rows(&judged, targets, names);
    let summary = judge_summarize(conditions, &expression, names.len());
    patchbay::io::write_atomic(&out.join("summary.csv"), judge_summary_csv(&summary, names).as_bytes())?;
    let by_valence = by_valence(conditions, &expression, valence);
    let valence_names: Vec<String> = VALENCES.iter().map(|v| v.to_string()).collect();
    patchbay::io::write_atomic(&out.join("valence.csv"), judge_summary_csv(&by_valence, &valence_names).as_bytes())?;
    write_manifest(&out.join("judge.json"), &json!({"judge": judge.describe(), "summary": summary, "valence": by_valence}))?;
    patchbay::io::plot::line_panels(&out.join("accuracy.png"), &chart(&summary))?;
    if !quiet {
        print_summary(&summary, names);
    }
    Ok(())
}

#!/usr/bin/env python3
"""Trains the demo model of `patchbay demo`: a tiny Llama (LlamaForCausalLM) and its byte-level
BPE tokenizer, from scratch, on the training rows of demo/corpus.csv (scripts/demo/make_corpus.py).

Each training document is one corpus row in the prompt format `patchbay demo` scores with (the
`tak` template of Tak et al. 2025, patchbay's `--template tak`), followed by the gold emotion:

    <|begin_of_text|>What are the inferred emotions in the following contexts? Context: <text> Answer: <emotion><|end_of_text|>

and the model is trained as a plain causal language model on every token (next-token cross
entropy), so the emotion is simply the likeliest next word after "Answer:".

Deterministic: fixed seeds, one tokenizer thread, `--threads` torch threads (default 1: the
matrices are so small that a second thread gains little, and on a busy machine OpenMP's waiting
threads make 2 threads several times slower), deterministic torch algorithms; rerunning on the
same platform with the pinned versions (requirements.txt) gives byte-identical files. Takes
about 3 CPU-minutes (12 epochs of ~16 s).

Writes to --out (default demo/model): config.json, generation_config.json, model.safetensors
(bf16), tokenizer.json, tokenizer_config.json, and training.json (settings, corpus sha256,
losses, held-out accuracy of the saved bf16 weights, library versions), which `patchbay demo`
quotes in its report.

    python3.11 -m venv /tmp/demo-venv
    /tmp/demo-venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu -r scripts/demo/requirements.txt
    /tmp/demo-venv/bin/python scripts/demo/make_corpus.py
    /tmp/demo-venv/bin/python scripts/demo/train.py
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"  # the BPE trainer: one thread, one merge order
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# patchbay's `tak` preset (src/data/template.rs); tests/demo.rs checks the two agree.
TEMPLATE = "What are the inferred emotions in the following contexts? Context: {text} Answer:"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB = 1024  # BPE entries + the two special tokens

ARCH = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def read_corpus(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def train_tokenizer(docs):
    """Byte-level BPE (as Llama 3 and GPT-2 use) trained on the training documents."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 2,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    n = tok.get_vocab_size()
    tok.add_special_tokens([BOS, EOS])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]),
    ])
    return tok, n


def tokenizer_config(tok):
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
            for s in (BOS, EOS)
        },
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": ARCH["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def batches(seqs, batch_size, rng):
    order = list(range(len(seqs)))
    rng.shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [seqs[j] for j in order[i:i + batch_size]]


def pad(batch, pad_id):
    n = max(len(s) for s in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@torch.no_grad()
def accuracy(model, prompts, gold, label_ids, batch_size=256):
    """Held-out accuracy: argmax over the label tokens of the next-token logits after the prompt."""
    model.eval()
    correct = 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        # Left padding keeps every prompt's last token in the last column.
        n = max(len(p) for p in chunk)
        ids = torch.zeros((len(chunk), n), dtype=torch.long)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)
        pos = torch.zeros((len(chunk), n), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, n - len(p):] = torch.tensor(p)
            mask[j, n - len(p):] = 1
            pos[j, n - len(p):] = torch.arange(len(p))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :]
        pred = logits[:, label_ids].argmax(-1)
        correct += sum(int(p) == g for p, g in zip(pred, gold[i:i + batch_size]))
    model.train()
    return correct / len(prompts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=str(ROOT / "demo" / "corpus.csv"))
    ap.add_argument("--out", default=str(ROOT / "demo" / "model"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(args.seed)

    corpus = Path(args.corpus)
    rows = read_corpus(corpus)
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    labels = sorted({r["emotion"] for r in rows})
    docs = [TEMPLATE.format(text=r["text"]) + " " + r["emotion"] for r in train_rows]

    tok, n_bpe = train_tokenizer(docs)
    label_ids = [tok.encode(" " + e, add_special_tokens=False).ids[0] for e in labels]
    assert len(set(label_ids)) == len(labels), f"labels share a first token: {dict(zip(labels, label_ids))}"
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    seqs = [tok.encode(d).ids + [eos_id] for d in docs]
    assert all(s[0] == bos_id for s in seqs)
    test_prompts = [tok.encode(TEMPLATE.format(text=r["text"])).ids for r in test_rows]
    test_gold = [labels.index(r["emotion"]) for r in test_rows]

    cfg = LlamaConfig(vocab_size=VOCAB, bos_token_id=bos_id, eos_token_id=eos_id, **ARCH)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(seqs) / args.batch_size)
    total = steps_per_epoch * args.epochs
    warmup = min(100, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    print(f"{len(train_rows)} training documents, {len(test_rows)} held out; vocab {VOCAB} ({n_bpe} BPE); "
          f"{n_params} parameters; {total} steps")
    history = []
    model.train()
    step = 0
    for epoch in range(args.epochs):
        losses = []
        for batch in batches(seqs, args.batch_size, rng):
            ids, mask, lab = pad(batch, eos_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
        acc = accuracy(model, test_prompts, test_gold, label_ids)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "heldout_accuracy": acc})
        print(f"epoch {epoch + 1}/{args.epochs}: loss {history[-1]['train_loss']:.4f}, held-out accuracy {acc:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2) + "\n")

    # The saved files as patchbay reads them: bf16 weights, f32 math, HF's tokenizer.
    hf_tok = AutoTokenizer.from_pretrained(out)
    for r, p in zip(test_rows[:50], test_prompts):
        assert hf_tok(TEMPLATE.format(text=r["text"]))["input_ids"] == p, "HF tokenizer and tokenizers disagree"
    saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    final_acc = accuracy(saved, test_prompts, test_gold, label_ids)
    print(f"saved bf16 weights: held-out accuracy {final_acc:.3f}")
    info = {
        "script": "scripts/demo/train.py",
        "command": "python scripts/demo/train.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("corpus", "out")),
        "corpus": "demo/corpus.csv",
        "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
        "training_documents": len(train_rows),
        "heldout_rows": len(test_rows),
        "template": TEMPLATE,
        "document": f"{BOS}{TEMPLATE} <emotion>{EOS}",
        "labels": labels,
        "label_token_ids": label_ids,
        "parameters": n_params,
        "architecture": {"model_type": "llama", "vocab_size": VOCAB, **ARCH},
        "tokenizer": f"byte-level BPE, {n_bpe} merges+bytes and 2 special tokens, trained on the training documents",
        "epochs": args.epochs,
        "steps": total,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW(lr={args.lr}, betas=(0.9, 0.95), weight_decay=0.01), {warmup} warm-up steps, cosine decay, grad clip 1.0",
        "seed": args.seed,
        "threads": args.threads,
        "history": history,
        "heldout_accuracy_bf16": final_acc,
        "seconds": round(time.time() - t0, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

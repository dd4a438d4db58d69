"""Train the bundled tiny models (Mamba, Mamba-2, the SSM-attention hybrid and the transformers tiny-opt) on the
offline suite's training distribution.

    python -m ssmcompress.train --model mamba2-tiny --out src/ssmcompress/assets/models/mamba2-tiny
    python -m ssmcompress.train --model mamba-tiny --out ... --resume    # continue from <out>/train_state.pt
    python -m ssmcompress.train --model tiny-opt --out ... --tokenizer src/ssmcompress/assets/models/mamba2-tiny
    python -m ssmcompress.train --model hybrid-tiny --out ... --init DIR   # DIR: experiments/hybrid_init.py's

Plain PyTorch: a BPE tokenizer trained with `tokenizers` on the training plays and synthetic text, then next-token
training on a mixture of Shakespeare windows (training plays only) and synthetic MQAR / story documents (seeds
disjoint from the evaluation suite's). Checkpoints every `--save-every` steps, so a killed run resumes where it
stopped. The architecture comes from the Hydra model config (`conf/model/<model>.yaml`, key `config`; its `family`
picks mamba-ssm or transformers).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from ssmcompress import compat, hosts, models
from ssmcompress.hosts import mamba_ssm
from ssmcompress.config import CONF_DIR
from ssmcompress.suite import corpus, long, synthetic

EOS = "<|endoftext|>"
SYNTHETIC_SEED = 1000  # the evaluation suite uses seeds 1..4


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """Byte-level BPE (as GPT-NeoX's) with `<|endoftext|>` = id 0, used for eos and padding."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(tok_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS,
                                   unk_token=EOS, model_max_length=2048)


def tokenizer_corpus(train_plays: dict[str, str], seed: int = SYNTHETIC_SEED) -> list[str]:
    rng = random.Random(seed)
    synthetic_texts = ["".join(piece for piece, _ in synthetic.training_mqar(rng)) for _ in range(2000)]
    synthetic_texts += ["".join(piece for piece, _ in synthetic.training_story(rng)) for _ in range(2000)]
    return list(train_plays.values()) + synthetic_texts


class Mixture(torch.utils.data.IterableDataset):
    """Endless (ids, weights) rows of seq_len + 1 tokens: Shakespeare windows or packed synthetic documents.

    Weights are per target token. Text tokens weigh 1. In synthetic documents the answers weigh `answer_weight` (as
    in MQAR training, where the loss is taken at the queries); the rest weighs `format_weight`, enough to learn the
    format without drowning the answers in the loss of unpredictable random keys and values. A `long_share` of rows
    are one long-suite-style document each (suite.long.training_facts: facts spread through `filler`, the
    training plays' lines), weighted as synthetic ones.
    """

    def __init__(self, tokenizer, text_ids: np.ndarray, seq_len: int, text_share: float, seed: int,
                 batch_size: int, start_step: int = 0, curriculum_steps: int = 0, format_weight: float = 0.05,
                 answer_weight: float = 1.0, long_share: float = 0.0, filler: long.Filler | None = None):
        super().__init__()
        self.answer_weight, self.long_share, self.filler = answer_weight, long_share, filler
        self.tokenizer, self.text, self.seq_len = tokenizer, text_ids, seq_len
        self.text_share, self.seed, self.format_weight = text_share, seed, format_weight
        self.batch_size, self.start_step, self.curriculum_steps = batch_size, start_step, curriculum_steps
        self.eos = tokenizer.eos_token_id
        # adaptive curriculum: the difficulty the training loop has reached, shared with forked data-loader workers
        # (a negative value means: follow the fixed schedule)
        self.level = torch.multiprocessing.Value("d", -1.0)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        workers = worker.num_workers if worker else 1
        rng = random.Random(self.seed * 1000 + (worker.id if worker else 0))
        rows = 0
        while True:
            # each worker builds whole batches in turn, so rows * workers / batch_size counts training steps
            step = self.start_step + rows * workers / self.batch_size
            progress = min(1.0, step / self.curriculum_steps) if self.curriculum_steps else 1.0
            progress = progress if self.level.value < 0 else self.level.value
            draw = rng.random()
            if draw < self.text_share:
                yield self.text_row(rng)
            elif draw < self.text_share + self.long_share:
                yield self.long_row(rng)
            else:
                yield self.synthetic_row(rng, progress)
            rows += 1

    def text_row(self, rng: random.Random):
        start = rng.randrange(len(self.text) - self.seq_len - 1)
        ids = torch.from_numpy(self.text[start: start + self.seq_len + 1].copy())
        return ids, torch.ones(self.seq_len)

    def synthetic_row(self, rng: random.Random, progress: float = 1.0):
        ids, weights = [], []
        while len(ids) < self.seq_len + 1:
            make = synthetic.training_mqar if rng.random() < 0.5 else synthetic.training_story
            for piece, is_answer in make(rng, progress):
                piece_ids = self.tokenizer(piece)["input_ids"]
                ids += piece_ids
                weights += [self.answer_weight if is_answer else self.format_weight] * len(piece_ids)
            ids.append(self.eos)
            weights.append(self.format_weight)
        ids, weights = ids[: self.seq_len + 1], weights[1: self.seq_len + 1]  # weight of each target token
        return torch.tensor(ids), torch.tensor(weights)

    def long_row(self, rng: random.Random):
        """One long document filling the row (its facts at random depths of the filler text); a shortfall of a few
        tokens is padded with eos that weighs nothing."""
        count = long.token_counter(self.tokenizer)
        facts, pieces, head = long.training_facts(rng)
        question, question_weights = [], []
        for text, is_answer in pieces:
            piece_ids = self.tokenizer(text)["input_ids"]
            question += piece_ids
            question_weights += [self.answer_weight if is_answer else self.format_weight] * len(piece_ids)
        budget = self.seq_len + 1 - len(question) - sum(count(line + "\n") for line in head)
        segments = head + long.interleave(rng, facts, sorted(rng.random() for _ in facts), budget, self.filler, count)
        context = self.tokenizer(long.expand(segments, self.filler.lines))["input_ids"]
        while len(context) + len(question) > self.seq_len + 1:
            long.drop_last_line(segments)
            context = self.tokenizer(long.expand(segments, self.filler.lines))["input_ids"]
        padding = self.seq_len + 1 - len(context) - len(question)
        weights = [self.format_weight] * len(context) + question_weights + [0.0] * padding
        return torch.tensor(context + question + [self.eos] * padding), torch.tensor(weights[1:])


@torch.no_grad()
def choice_accuracy(model, tokenizer, docs: list[dict], device) -> float:
    """Accuracy on single-token multiple-choice docs, from one batched forward (a cheap training monitor)."""
    contexts = [tokenizer(doc["context"])["input_ids"] for doc in docs]
    choices = torch.tensor([[tokenizer(" " + c)["input_ids"][0] for c in doc["choices"]] for doc in docs])
    batch = torch.full((len(docs), max(map(len, contexts))), tokenizer.eos_token_id)
    for row, ids in enumerate(contexts):
        batch[row, : len(ids)] = torch.tensor(ids)
    logits = hosts.of_model(model).logits(model, batch.to(device)).float().cpu()
    last = logits[torch.arange(len(docs)), torch.tensor([len(ids) - 1 for ids in contexts])]
    predicted = last.gather(1, choices).argmax(1)
    return (predicted == torch.tensor([doc["label"] for doc in docs])).float().mean().item()


def long_monitor(rng: random.Random, length: int, filler: long.Filler, tokenizer, n: int = 32) -> list[dict]:
    """niah_multikey documents of `length` tokens in training-play text (the long suite's shape, not its data)."""
    count = long.token_counter(tokenizer)
    docs = [long.niah_multikey(rng, i, n, length - 64, filler, count) for i in range(n)]
    return [dict(doc, context=long.expand(doc["segments"], filler.lines) + doc["question"]) for doc in docs]


def model_group(name: str) -> dict:
    return yaml.safe_load((CONF_DIR / "model" / f"{name}.yaml").read_text())


def model_config(name: str) -> dict:
    return model_group(name)["config"]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mamba2-tiny", help="conf/model/<name>.yaml holding the architecture")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=None, help="reuse this tokenizer dir (else train one)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--text-share", type=float, default=0.3, help="share of sequences that are Shakespeare")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--save-dtype", default="float16", choices=["float32", "float16"])
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget: after 20 steps, shrink --steps (and the LR schedule) to fit it")
    parser.add_argument("--tokenizer-only", action="store_true", help="train and save the tokenizer, then stop")
    parser.add_argument("--export-only", action="store_true",
                        help="write <out>/train_state.pt's weights as the model in <out> (hub format), then stop")
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes making synthetic documents")
    parser.add_argument("--n-layer", type=int, default=None, help="override the config's depth (experiments)")
    parser.add_argument("--curriculum", type=float, default=0.4,
                        help="fraction of the steps over which synthetic tasks grow from easy to full difficulty")
    parser.add_argument("--adaptive", type=float, default=None, metavar="ACCURACY",
                        help="adaptive curriculum instead: raise the difficulty by 0.1 each time both synthetic "
                             "tasks reach this accuracy at the current difficulty (checked at every save)")
    parser.add_argument("--level", type=float, default=None,
                        help="fixed curriculum level in [0, 1] for the synthetic tasks (with --adaptive: the start)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this model directory's weights (a fresh optimizer; e.g. a later stage)")
    parser.add_argument("--answer-weight", type=float, default=1.0,
                        help="loss weight of synthetic answer tokens relative to text tokens")
    parser.add_argument("--long-share", type=float, default=0.0,
                        help="share of sequences that are one long-suite-style document (facts spread through "
                             "training-play text; for --seq-len in the thousands)")
    parser.add_argument("--trainable", default=None, metavar="REGEX",
                        help="train only the parameters whose names match this regular expression (the rest frozen)")
    args = parser.parse_args()

    device = models.resolve_device(args.device)
    torch.manual_seed(args.seed)
    train_plays, _ = corpus.split_plays(corpus.load_plays())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is not None:
        tokenizer = models.load_tokenizer(str(args.tokenizer))
    elif (args.out / "tokenizer.json").exists():
        tokenizer = models.load_tokenizer(str(args.out))
    else:
        tokenizer = train_tokenizer(tokenizer_corpus(train_plays))
    tokenizer.save_pretrained(args.out)
    if args.tokenizer_only:
        print(f"tokenizer ({len(tokenizer)} tokens) saved to {args.out}")
        return

    family = hosts.of(model_group(args.model))
    config = dict(model_config(args.model), vocab_size=len(tokenizer))
    if args.n_layer is not None:
        config["n_layer" if family is mamba_ssm else "num_hidden_layers"] = args.n_layer
    model = family.build_model(config, device, "float32", seed=args.seed).train()
    if args.init is not None:
        model.load_state_dict(family.load_model(str(args.init), "cpu", "float32").state_dict())
    mamba1 = family is mamba_ssm and mamba_ssm.mamba_version(config) == 1
    if mamba1 and device.type == "cpu" and "SSMCOMPRESS_MAMBA1_SCAN" not in os.environ:
        # the reference scan's loop over time makes backward passes crawl; a GPU runs the Triton scan ("auto")
        compat.MAMBA1_SCAN = "parallel"
    if mamba1:
        print(f"Mamba-1 selective scan: {compat.mamba1_scan(device)}")
    state_path = args.out / "train_state.pt"
    if args.export_only:
        model.load_state_dict(torch.load(state_path, map_location=device, weights_only=False)["model"])
        family.save_model(model, args.out, tokenizer, dtype=getattr(torch, args.save_dtype))
        print(f"exported {state_path} to {args.out}")
        return
    trained = [p for name, p in model.named_parameters() if args.trainable is None or re.search(args.trainable, name)]
    if not trained:
        raise SystemExit(f"error: --trainable {args.trainable!r} matches no parameter of {args.model}")
    for parameter in model.parameters():
        parameter.requires_grad_(any(parameter is p for p in trained))
    print(f"training {sum(p.numel() for p in trained)} of {sum(p.numel() for p in model.parameters())} parameters")
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    text_ids = np.array(tokenizer("\n\n".join(train_plays.values()))["input_ids"], dtype=np.int64)
    monitor_rng = random.Random(SYNTHETIC_SEED - 1)
    monitor = dict(mqar=[synthetic.mqar(monitor_rng) for _ in range(64)],
                   story=[synthetic.story(monitor_rng) for _ in range(64)],
                   mqar16=[synthetic.mqar(monitor_rng, n_pairs=16) for _ in range(64)])  # recall beyond the suite's
    filler = None
    if args.long_share > 0:
        filler = long.Filler({play: text.split("\n") for play, text in train_plays.items()}, tokenizer)
        monitor["needles"] = long_monitor(monitor_rng, args.seq_len, filler, tokenizer)

    step, resumed_level = 0, None
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from step {step}")
        resumed_level = state.get("level")
    # a resumed run continues with a fresh data stream (seeded by the step), not the exact batches it would have seen
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    level = args.level  # a fixed curriculum level, or None: the --curriculum schedule
    if args.adaptive is not None:  # the adaptive curriculum starts at --level (or 0) unless resuming mid-way
        level = resumed_level if resumed_level is not None else args.level or 0.0

    def make_loader(first: int):
        nonlocal data
        data = Mixture(tokenizer, text_ids, args.seq_len, args.text_share, seed=args.seed + first,
                       batch_size=args.batch_size, start_step=first, curriculum_steps=int(args.curriculum * args.steps),
                       answer_weight=args.answer_weight, long_share=args.long_share, filler=filler)
        data.level.value = -1.0 if level is None else level
        return iter(torch.utils.data.DataLoader(data, batch_size=args.batch_size, num_workers=args.workers))

    data = None
    loader = make_loader(step)

    def save(final: bool = False) -> None:
        state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), torch_rng=torch.get_rng_state(), step=step, level=level, args={k: str(v) for k, v in vars(args).items()})
        torch.save(state, state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)  # atomic: a kill mid-write keeps the last state
        if final:
            family.save_model(model, args.out, tokenizer, dtype=getattr(torch, args.save_dtype))

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def checkpoint(last_loss: float, final: bool = False) -> None:
        nonlocal level
        model.eval()
        with autocast:
            accuracy = {k: choice_accuracy(model, tokenizer, v, device) for k, v in monitor.items()}
            if args.adaptive is not None:
                level_docs = synthetic.level_docs(random.Random(step), level, 64)
                at_level = {k: choice_accuracy(model, tokenizer, v, device) for k, v in level_docs.items()}
                accuracy.update({f"{k}@level": v for k, v in at_level.items()}, level=level)
                if min(at_level.values()) >= args.adaptive and level < 1.0:
                    level = data.level.value = round(min(1.0, level + 0.1), 2)
        model.train()
        log.append(dict(step=step, loss=last_loss, seconds=time.time() - start, **accuracy))
        bar.write(json.dumps(log[-1]))
        save(final=final)

    log, loss = [], torch.tensor(float("nan"))
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.model}", dynamic_ncols=True)
    start, first_step = time.time(), step
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids, weights = (t.to(device, non_blocking=True) for t in next(loader))
        with autocast:
            logits = family.logits(model, ids[:, :-1])
        token_loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        loss = (token_loss * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step == first_step + 20:
            warm = time.time()  # the first steps include kernel compilation and autotuning
        if args.minutes is not None and step == first_step + 60:
            per_step = (time.time() - warm) / 40
            fit = step + max(0, int((args.minutes * 60 - (time.time() - start)) / per_step * 0.9))
            if fit < args.steps:
                bar.write(f"{per_step:.3f} s/step: {args.steps} steps exceed {args.minutes} min, training {fit}")
                args.steps = bar.total = fit
                loader = make_loader(step)  # restart the data stream with the shorter curriculum
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % args.save_every == 0 and step < args.steps:
            checkpoint(loss.item())
    bar.close()
    checkpoint(loss.item(), final=True)
    del loader  # stop the data-loader workers now (an endless stream can otherwise hold up interpreter exit)
    with open(args.out / "train_log.jsonl", "a") as f:
        for row in log:
            f.write(json.dumps(row) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

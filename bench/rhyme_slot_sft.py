"""Can the model learn to track rhyme at all? Fine-tune it on rhyming poems with the rhyme slots weighted up.

    python build_dataset.py --rule rhyme --output_dir data/pairs_rhyme          # chosen poems: rhyming, train split
    python bench/rhyme_slot_sft.py --slot_weight 10 --output_dir data/v3/rhyme_slot_sft_w10
    python bench/rhyme_slot_sft.py --slot_weight 1 --output_dir data/v3/rhyme_slot_sft_w1     # the control

    python bench/rhyme_slot_sft.py --model data/v7/base_rg1 --slot_weight 100 --learning_rate 1e-3 \
        --output_dir data/v7/rg1_slot_w100_lr1e3     # the setting that made a model rhyme (docs/prosody.md)

A step of issue #13's rhyme chain (base with `--rhyme_group_init`, this, then GRPO), not yet a pipeline stage.
The base models are blind to rhyme (bench/rhyme_probe.py: shift +0.0) and DPO on rhyme pairs leaves them so.
One explanation is signal strength: in plain language-model training
a rhyme slot is one token in twenty-five, and the loss it could save is spread over a vocabulary of thousands.
This script trains with the ordinary next-token loss on the train split's rhyming poems (the rhyme rule's chosen
poems, no held-out title), with the loss at the rhyme slots after line 2 (the last character of lines 4, 6, 8,
which line 2 has already fixed) multiplied by --slot_weight. With weight 1 it is plain fine-tuning on rhyming
poems, the control. The rhyme probe before and after says whether the model now follows line 2; the model is
saved for evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from datasets import load_dataset
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poemdpo.data.dataset import load_held_out_poems  # noqa: E402
from poemdpo.data.pairs import line_end_positions  # noqa: E402
from poemdpo.evaluation.probes import probe_table, rhyme_probe  # noqa: E402
from poemdpo.models.loading import load_for_inference  # noqa: E402


def encode(tokenizer, prompt: str, poem: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + poem + eos, and per token 0 (prompt), 1 (poem, eos) or 2 (a rhyme slot after line 2)."""
    text = prompt + poem
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    slots = {len(prompt) + i for i in line_end_positions(poem)[3::2]}
    kinds = [0 if start < len(prompt) else 2 if start in slots else 1 for start, _ in enc["offset_mapping"]]
    return enc["input_ids"] + [tokenizer.eos_token_id], kinds + [1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/base_model", help="The model to fine-tune.")
    parser.add_argument("--dataset", default="data/pairs_rhyme", help="build_dataset.py --rule rhyme output: its "
                        "train split's chosen poems are the training poems, its test poems the probe's.")
    parser.add_argument("--slot_weight", type=float, default=10.0, help="Loss weight of a rhyme slot after line 2 "
                        "(every other poem token weighs 1; the prompt 0).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Passes over the rhyming poems.")
    parser.add_argument("--batch_size", type=int, default=32, help="Poems per step.")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="AdamW's, with a cosine decay.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the poem order.")
    parser.add_argument("--output_dir", required=True, help="Where the fine-tuned model and probe.json go.")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = load_for_inference(args.model)
    train = load_dataset(args.dataset, split="train")
    held_out = load_held_out_poems(args.dataset, "test")
    probe_titles, probe_poems = list(held_out["title"]), list(held_out["poem"])
    probes = [(args.model, rhyme_probe(model, tokenizer, probe_titles, probe_poems))]

    poems = sorted(set(zip(train["prompt"], train["chosen"], strict=True)))
    examples = [encode(tokenizer, prompt, poem) for prompt, poem in poems]
    steps = math.ceil(len(examples) * args.epochs / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(examples)).tolist()
    model.train()
    start, pad = time.perf_counter(), tokenizer.pad_token_id
    slot_loss = other_loss = 0.0
    for step in tqdm(range(steps), desc="rhyme-slot fine-tuning", unit="step"):
        batch = [examples[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        kinds = torch.tensor([k + [0] * (width - len(k)) for _, k in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        kind = kinds[:, 1:]
        weight = (kind == 1).float() + args.slot_weight * (kind == 2).float()
        loss = (nll * weight).sum() / weight.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        slot_loss += nll[kind == 2].mean().item()
        other_loss += nll[kind == 1].mean().item()
    model.eval()
    probes.append((args.output_dir, rhyme_probe(model, tokenizer, probe_titles, probe_poems)))
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    result = {
        "settings": vars(args), "poems": len(examples), "steps": steps, "seconds": round(time.perf_counter() - start),
        "mean_train_nll_rhyme_slots": round(slot_loss / steps, 4), "mean_train_nll_other": round(other_loss / steps, 4),
        "probe": [{"model": name, **result.to_dict()} for name, result in probes],
    }
    (Path(args.output_dir) / "probe.json").write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(probe_table(probes))
    print({k: v for k, v in result.items() if k not in ("probe", "settings")})
    return result


if __name__ == "__main__":
    main()

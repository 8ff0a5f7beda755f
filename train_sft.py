"""Fine-tune a causal LM on preferred poems, some tokens weighted up: the first step of the rhyme road.

    python build_dataset.py --rule rhyme --output_dir data/pairs_rhyme      # the rhyming poems, split by title
    python train_sft.py --model_name_or_path data/base_model_rhyme   # recipe: configs/sft_rhyme_slots_cpu.yaml
    python train_sft.py --slot_weight 1 --output_dir data/sft_plain         # the control: plain fine-tuning

TRL's SFTTrainer on the chosen poems of the train split (each once), the loss a weighted mean per token: the
rhyme slots after line 2 (the last character of lines 4, 6, 8) weigh --slot_weight, the rest of the poem 1, the
prompt 0 (poemdpo/training/sft.py). `python -m poemdpo.pipeline --rule five_char_rhyme` runs it between a base
model with rhyme-group embeddings and GRPO with the rule (docs/prosody.md, "A model that rhymes"). Every field of
the recipe can be overridden on the command line; `--help` lists them.
"""

from __future__ import annotations

import sys

from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config

from poemdpo.errors import PoemDPOError
from poemdpo.run_info import write_run_info
from poemdpo.training.dpo import (
    check_splits_match,
    check_tokenizer_covers,
    load_pairs,
    load_policy,
    load_tokenizer,
    preference_rule,
)
from poemdpo.training.hub import check_hub_access, push_final_model
from poemdpo.training.recipe import parse_recipe, with_default_recipe
from poemdpo.training.samples import final_metrics
from poemdpo.training.sft import (
    SFTScriptArguments,
    WeightedSFTTrainer,
    check_settings,
    last_metrics,
    poems_dataset,
    recorded_settings,
    write_sft_card,
)

DEFAULT_CONFIG = "configs/sft_rhyme_slots_cpu.yaml"


def main(argv: list[str] | None = None) -> WeightedSFTTrainer:
    argv = with_default_recipe(sys.argv[1:] if argv is None else argv, DEFAULT_CONFIG)
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig), description=__doc__)
    try:
        # 1. Arguments: recipe YAML, then the command line.
        script_args, args, model_args = parse_recipe(parser, argv)
        check_settings(args, script_args)
        if args.push_to_hub:
            check_hub_access(args.hub_model_id)

        # 2. Data: the pairs' chosen poems, holding out the same titles as the model it starts from.
        dataset, stats = load_pairs(script_args)
        splits = check_splits_match(stats, model_args.model_name_or_path, script_args.dataset_name)
        rule = preference_rule(script_args, stats)
        tokenizer = load_tokenizer(model_args)
        check_tokenizer_covers(tokenizer, dataset[script_args.dataset_train_split])
        train = poems_dataset(dataset[script_args.dataset_train_split], tokenizer, script_args.slot_weight,
                              script_args.max_train_poems)
        test = None
        if args.eval_strategy != "no":
            test = poems_dataset(dataset[script_args.dataset_test_split], tokenizer, script_args.slot_weight,
                                 script_args.max_eval_poems)

        # 3. The model.
        model = load_policy(model_args)
    except PoemDPOError as e:
        parser.error(str(e))

    # 4. Train.
    trainer = WeightedSFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                 processing_class=tokenizer, peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = {**last_metrics(trainer.state.log_history), **final_metrics(trainer)}

    # 5. Save model + tokenizer + card + run record; push if asked.
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        write_run_info(args.output_dir, {
            "stage": "sft", "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
            "rule": rule, "splits": splits.to_dict() if splits else None, "prompt_format": "instruction",
            "use_peft": model_args.use_peft, "train_poems": len(train), **recorded_settings(script_args, args),
        })
        write_sft_card(args.output_dir, base_model=model_args.model_name_or_path, dataset=script_args.dataset_name,
                       rule=rule, args=args, script_args=script_args, poems=len(train), metrics=metrics,
                       tokenizer=tokenizer)
        print(f"saved the fine-tuned model to {args.output_dir}")
        if args.push_to_hub:
            try:
                push_final_model(trainer)
            except PoemDPOError as e:
                sys.exit(f"train_sft.py: error: {e}")
    return trainer


if __name__ == "__main__":
    main()

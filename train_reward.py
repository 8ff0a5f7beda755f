"""Train a reward model (TRL's RewardTrainer) on the preference pairs, from the base model's backbone.

    python train_reward.py --config configs/reward_tiny_cpu.yaml                 # the embedded default
    python train_reward.py --config configs/reward_tiny_cpu.yaml --max_train_pairs 2000 --learning_rate 1e-4
    python train_rl.py --reward_model data/reward_five_char                      # then RL against it

Without --config the embedded default's recipe, configs/reward_tiny_cpu.yaml, is read. Every field of the
recipe can be overridden on the command line; `--help` lists them all. At the end the reward accuracy on every
validation and test pair is printed and written to the model card and `poemdpo.json`.
"""

from __future__ import annotations

import sys

from trl import ModelConfig, RewardConfig, RewardTrainer, TrlParser, get_peft_config

from poemdpo.errors import PoemDPOError
from poemdpo.models import loading
from poemdpo.run_info import write_run_info
from poemdpo.training.dpo import (
    check_splits_match,
    load_pairs,
    preference_rule,
    select_pairs,
    to_conversational,
    use_chat_format,
)
from poemdpo.training.recipe import parse_recipe, with_default_recipe
from poemdpo.training.reward import (
    RewardScriptArguments,
    check_settings,
    check_splits,
    load_reward_model,
    reward_accuracy,
    write_reward_card,
)

DEFAULT_RECIPE = "configs/reward_tiny_cpu.yaml"


def main(argv: list[str] | None = None) -> RewardTrainer:
    argv = with_default_recipe(sys.argv[1:] if argv is None else argv, DEFAULT_RECIPE)
    parser = TrlParser((RewardScriptArguments, RewardConfig, ModelConfig))
    try:
        # 1. Arguments: recipe YAML, then the command line.
        script_args, args, model_args = parse_recipe(parser, argv)
        check_settings(args, script_args, model_args)

        # 2. Data: the same pairs as DPO, holding out the same titles as the base model.
        dataset, stats = load_pairs(script_args)
        check_splits(dataset, script_args.dataset_name, script_args.accuracy_splits)
        splits = check_splits_match(stats, model_args.model_name_or_path, script_args.dataset_name)
        rule = preference_rule(script_args, stats)
        train = select_pairs(dataset[script_args.dataset_train_split], script_args.max_train_pairs, args.seed)
        test = select_pairs(dataset[script_args.dataset_test_split], script_args.max_eval_pairs, args.seed)
        held_out = {split: dataset[split] for split in script_args.accuracy_splits}

        # 3. Model: the base model's backbone under a new one-output head; pad id agreed with the tokenizer.
        tokenizer = loading.load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                                           trust_remote_code=args.trust_remote_code)
        model = load_reward_model(model_args.model_name_or_path, tokenizer, dtype=model_args.dtype,
                                  revision=model_args.model_revision, trust_remote_code=args.trust_remote_code)
        chat = use_chat_format(tokenizer, script_args.prompt_format)
        if chat:
            train, test = to_conversational(train), to_conversational(test)
            held_out = {split: to_conversational(pairs) for split, pairs in held_out.items()}
    except PoemDPOError as e:
        parser.error(str(e))

    # 4. Train.
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=test if args.eval_strategy != "no" else None,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "True") else resume)

    # 5. Reward accuracy on every held-out pair, then save model + tokenizer + card + run record.
    model = trainer.accelerator.unwrap_model(trainer.model)
    accuracy = {split: reward_accuracy(model, tokenizer, pairs, script_args.score_batch_size, args.max_length)
                for split, pairs in held_out.items()}
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        for split, a in accuracy.items():
            print(f"reward accuracy on {split}: {a['accuracy']:.3f} ({a['pairs']} pairs, mean margin "
                  f"{a['margin']:.3f}; {a['dropped']} pairs longer than max_length left out, as in training)")
        write_run_info(args.output_dir, {
            "stage": "reward_model", "base_model": model_args.model_name_or_path,
            "dataset": script_args.dataset_name, "rule": rule, "splits": splits.to_dict() if splits else None,
            "prompt_format": "chat" if chat else "instruction", "use_peft": model_args.use_peft,
            "train_pairs": len(train), "reward_accuracy": accuracy, "max_length": args.max_length,
        })
        write_reward_card(args.output_dir, base_model=model_args.model_name_or_path,
                          dataset=script_args.dataset_name, rule=rule, args=args, train_pairs=len(train),
                          accuracy=accuracy)
        print(f"saved the reward model to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()

"""RL on the model's own poems with TRL's GRPOTrainer, RLOOTrainer or online DPO (TRL 1.x has no PPOTrainer).

    python train_rl.py                                    # GRPO, the rule as reward: configs/grpo_tiny_cpu.yaml
    python train_rl.py --method rloo                      # RLOO: configs/rloo_tiny_cpu.yaml
    python train_rl.py --method online_dpo                # online DPO: configs/online_dpo_tiny_cpu.yaml
    python train_rl.py --reward_model data/reward_five_char --output_dir data/grpo_rm_five_char   # learned judge
    python train_rl.py --config configs/grpo_tiny_cpu.yaml --beta 0.1 --max_steps 50

Without --config the method's recipe is read. Every field of the recipe can be overridden on the command line;
`--help` lists GRPO's fields, `--method rloo --help` RLOO's. The prompts are the train split's titles; every
`sample_every_steps` the policy's poems for held-out titles are printed beside the reference's (`samples.md`).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from trl import ModelConfig, TrlParser, get_peft_config

from poemdpo.data.prompts import CHAPTER_TITLES
from poemdpo.data.splits import SplitSpec, check_same_splits
from poemdpo.errors import PoemDPOError
from poemdpo.models import loading
from poemdpo.models.generation import eos_token_ids
from poemdpo.run_info import write_run_info
from poemdpo.training.dpo import (
    check_splits_match,
    check_tokenizer_covers,
    held_out_titles,
    load_pairs,
    preference_rule,
    use_chat_format,
)
from poemdpo.training.recipe import parse_recipe, read_recipe, with_default_recipe
from poemdpo.training.rl import (
    METHODS,
    RECIPES,
    TRAINERS,
    RewardModelReward,
    RLScriptArguments,
    check_reward_model,
    check_settings,
    completion_length,
    last_train_metrics,
    length_setting,
    make_rule_reward,
    method_of,
    prompt_dataset,
    short_prompts,
    train_titles,
    write_rl_card,
)
from poemdpo.training.samples import SamplePoemsCallback
from poemdpo.training.sft import poems_dataset


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # The method decides the config class (GRPOConfig or RLOOConfig), so it is read before the full parse.
    try:
        method = method_of(argv, read_recipe(argv))
    except PoemDPOError as e:
        TrlParser((RLScriptArguments, METHODS["grpo"][0], ModelConfig)).error(str(e))
    argv = with_default_recipe(argv, RECIPES[method])
    parser = TrlParser((RLScriptArguments, METHODS[method][0], ModelConfig))
    try:
        # 1. Arguments: recipe YAML, then the command line.
        script_args, args, model_args = parse_recipe(parser, argv)
        check_settings(args, script_args)

        # 2. Data: the train split's titles are the prompts; held-out titles for the sample poems.
        dataset, stats = load_pairs(script_args)
        splits = check_splits_match(stats, model_args.model_name_or_path, script_args.dataset_name)
        rule = preference_rule(script_args, stats)
        titles = train_titles(dataset[script_args.dataset_train_split], script_args.max_train_titles, args.seed)
        sample_titles = held_out_titles(dataset[script_args.dataset_test_split], script_args.sample_titles,
                                        CHAPTER_TITLES)

        # 3. Policy and tokenizer (TRL loads the frozen reference from the same directory when beta > 0).
        tokenizer = loading.load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision,
                                           trust_remote_code=args.trust_remote_code)
        model = loading.load_causal_lm(
            model_args.model_name_or_path, dtype=model_args.dtype, revision=model_args.model_revision,
            attn_implementation=model_args.attn_implementation, trust_remote_code=args.trust_remote_code,
        )
        chat = use_chat_format(tokenizer, script_args.prompt_format)
        check_tokenizer_covers(tokenizer, dataset[script_args.dataset_train_split])
        kept, longest = short_prompts(tokenizer, titles, script_args.max_prompt_tokens, chat)
        if len(kept) < len(titles):
            print(f"left out {len(titles) - len(kept)} of {len(titles)} train titles whose prompt passes "
                  f"max_prompt_tokens={script_args.max_prompt_tokens}")
        titles, prompts = kept, prompt_dataset(kept, chat)
        limit = length_setting(args)  # max_completion_length (GRPO, RLOO) or max_new_tokens (online DPO)
        setattr(args, limit, completion_length(model, longest, getattr(args, limit), limit))

        # 4. Reward: the rule itself, or a reward model trained by train_reward.py.
        eos = sorted(eos_token_ids(model, tokenizer))
        if script_args.reward_model:
            check_reward_model(script_args.reward_model, splits, chat)
            reward = RewardModelReward(script_args.reward_model, tokenizer=tokenizer, eos_token_ids=eos,
                                       batch_size=script_args.reward_batch_size)
            reward_name = f"the reward model `{script_args.reward_model}`"
        else:
            reward = make_rule_reward(rule, tokenizer, eos)
            reward_name = f"the rule `{rule}` (rule_reward: 1 for a finished poem it prefers, else 0.5 × the share " \
                          "of lines of its length)"

        # 5. The ptx term's poems (PPO-ptx, off unless ptx_coef > 0): chosen poems of a train split, every token 1.
        ptx_poems = None
        if script_args.ptx_coef:
            ptx_pairs = dataset
            if script_args.ptx_dataset:
                ptx_pairs, ptx_stats = load_pairs(replace(script_args, dataset_name=script_args.ptx_dataset))
                check_same_splits(splits, SplitSpec.from_dict(ptx_stats.get("splits")),
                                  f"ptx dataset {script_args.ptx_dataset!r}")
            ptx_poems = poems_dataset(ptx_pairs[script_args.dataset_train_split], tokenizer, slot_weight=1.0)
            reward_name += (f"; plus PPO-ptx: {script_args.ptx_coef} × the next-token loss of "
                            f"{script_args.ptx_batch_size} train-split chosen poems a step")
    except PoemDPOError as e:
        parser.error(str(e))

    # 6. Train.
    trainer = TRAINERS[method](
        model=model, reward_funcs=[reward], args=args, train_dataset=prompts, processing_class=tokenizer,
        peft_config=get_peft_config(model_args), sampler=script_args.sampler,
        drop_finished=script_args.drop_finished, ptx_poems=ptx_poems, ptx_coef=script_args.ptx_coef,
        ptx_batch_size=script_args.ptx_batch_size, compact_lm_head=script_args.compact_lm_head,
    )
    if isinstance(reward, RewardModelReward):
        reward.to(trainer.accelerator.device)
    samples = SamplePoemsCallback(
        trainer, sample_titles, rule, every_steps=script_args.sample_every_steps,
        table_rows=script_args.sample_table_rows, max_new_tokens=script_args.sample_max_new_tokens, seed=args.seed,
        chat=chat,
    )
    trainer.add_callback(samples)
    resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("true", "True") else resume)

    # 7. Save model + tokenizer + card + run record.
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        throughput = trainer.completions_generated / trainer.generation_seconds if trainer.generation_seconds else 0
        print(f"{method}: {trainer.completions_generated} poems written in {trainer.generation_seconds:.1f} s of "
              f"generation ({throughput:.1f} completions/s), max {getattr(args, limit)} tokens each")
        write_run_info(args.output_dir, {
            "stage": method, "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
            "rule": rule, "reward": script_args.reward_model or f"rule:{rule}",
            "splits": splits.to_dict() if splits else None, "prompt_format": "chat" if chat else "instruction",
            "use_peft": model_args.use_peft, "train_titles": len(titles),
            "completions": trainer.completions_generated, "generation_seconds": trainer.generation_seconds,
            "sampler": script_args.sampler, "drop_finished": script_args.drop_finished,
            "compact_lm_head": trainer.compact_lm_head,
            "num_generations": getattr(args, "num_generations", 2),  # online DPO: always a pair
            "max_completion_length": getattr(args, limit), "ptx_coef": script_args.ptx_coef,
            **{key: getattr(args, key) for key in ("beta", "temperature", "top_k", "top_p", "learning_rate")},
        })
        last = samples.last or (samples.sample(trainer.state.global_step) if sample_titles else {})
        write_rl_card(
            args.output_dir, method=method, base_model=model_args.model_name_or_path,
            dataset=script_args.dataset_name, rule=rule, reward=reward_name, args=args, titles=len(titles),
            metrics=last_train_metrics(trainer.state.log_history), sample_rates=last.get("metrics", {}),
            sample_table=last.get("table", ""), tokenizer=tokenizer, chat=chat,
        )
        print(f"saved the {method} policy to {args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()

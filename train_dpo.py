"""Align a causal LM on preference pairs: DPO (TRL's DPOTrainer) against a frozen reference copy of itself, or
another of TRL's preference objectives on the same pairs (--method: simpo, orpo, kto; poemdpo/training/methods.py).

    python train_dpo.py --config configs/dpo_tiny_cpu.yaml                      # the embedded default
    python train_dpo.py --config configs/dpo_tiny_cpu.yaml --beta 0.2 --max_train_pairs 500
    python train_dpo.py --method simpo                   # SimPO (CPOTrainer): configs/simpo_tiny_cpu.yaml
    python train_dpo.py --method orpo                    # ORPO: configs/orpo_tiny_cpu.yaml
    python train_dpo.py --method kto                     # KTO, the pairs unpaired: configs/kto_tiny_cpu.yaml
    accelerate launch --config_file configs/accelerate/cpu_ddp.yaml train_dpo.py --config configs/dpo_tiny_cpu.yaml

Without --config the method's recipe is read (configs/dpo_tiny_cpu.yaml for the default, dpo). Every field of
the recipe can be overridden on the command line; `--help` lists DPO's fields, `--method simpo --help` SimPO's.
"""

from __future__ import annotations

import sys

from transformers import Trainer
from trl import TrlParser, get_peft_config

from poemdpo.data.prompts import CHAPTER_TITLES
from poemdpo.errors import PoemDPOError
from poemdpo.run_info import write_run_info
from poemdpo.training.dpo import (
    check_removed_keys,
    check_settings,
    check_splits_match,
    check_token_boundaries,
    check_tokenizer_covers,
    drop_truncated,
    held_out_titles,
    load_frozen_reference,
    load_pairs,
    load_policy,
    load_tokenizer,
    preference_rule,
    select_pairs,
    to_conversational,
    use_chat_format,
)
from poemdpo.training.hub import check_hub_access, push_final_model
from poemdpo.training.methods import (
    METHODS,
    RECIPES,
    build_trainer,
    check_method_keys,
    check_method_settings,
    method_of,
    needs_reference,
    objective_settings,
    parser_classes,
    write_card,
)
from poemdpo.training.recipe import argument_keys, parse_recipe, read_recipe, with_default_recipe
from poemdpo.training.samples import SamplePoemsCallback, final_metrics
from poemdpo.training.speed import use_compact_lm_head, with_lengths


def main(argv: list[str] | None = None) -> Trainer:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The method decides the config class (DPOConfig, CPOConfig, ORPOConfig or KTOConfig), so it is read first.
    try:
        method = method_of(argv, read_recipe(argv))
    except PoemDPOError as e:
        TrlParser(parser_classes("dpo")).error(str(e))
    argv = with_default_recipe(argv, RECIPES[method])
    parser = TrlParser(parser_classes(method))
    try:
        # 1. Arguments: recipe YAML, then the command line; refuse what TRL would silently drop, and another method's
        #    settings.
        check_removed_keys(argv, METHODS[method])
        check_method_keys(argument_keys(argv), method)
        script_args, args, model_args = parse_recipe(parser, argv)
        check_settings(args, script_args)
        check_method_settings(method, args)
        if args.push_to_hub:
            check_hub_access(args.hub_model_id)  # before training, not after an hour of it

        # 2. Data: the pairs built by build_dataset.py (or a Hub dataset with the same columns), holding out the
        #    same titles as the base model.
        dataset, stats = load_pairs(script_args)
        splits = check_splits_match(stats, model_args.model_name_or_path, script_args.dataset_name)
        rule = preference_rule(script_args, stats)
        tokenizer = load_tokenizer(model_args)
        chat = use_chat_format(tokenizer, script_args.prompt_format)
        train = dataset[script_args.dataset_train_split]
        if script_args.drop_truncated_pairs:  # a poem cut at max_length would teach a poem that never ends
            train = drop_truncated(train, tokenizer, args.max_length, chat)
        train = select_pairs(train, script_args.max_train_pairs, args.seed)
        test = select_pairs(dataset[script_args.dataset_test_split], script_args.max_eval_pairs, args.seed)
        # A `length` column lets `train_sampling_strategy: group_by_length` batch pairs of similar length.
        train, test = with_lengths(train), with_lengths(test)
        titles = held_out_titles(dataset[script_args.dataset_test_split], script_args.sample_titles, CHAPTER_TITLES)

        # 3. Models: the policy, and for dpo and kto a frozen copy as reference (none with LoRA: the adapter is
        #    switched off). SimPO and ORPO have no reference.
        model = load_policy(model_args)
        ref_model = load_frozen_reference(model_args) if needs_reference(method, model_args, args) else None

        # 4. Prompts as the model expects them (chat turns for a chat model), checked token by token before any
        #    training.
        if chat:
            train, test = to_conversational(train), to_conversational(test)
        check_tokenizer_covers(tokenizer, train)
        check_token_boundaries(tokenizer, train, script_args.boundary_check_rows)
    except PoemDPOError as e:
        parser.error(str(e))

    # 5. Train. Sample poems come from the prepared models (the reference's at the start), whatever the engine.
    try:
        trainer = build_trainer(  # dpo: ChapterDPOTrainer for the chapter's objectives; kto: the pairs unpaired
            method, model=model, ref_model=ref_model, args=args, train=train,
            test=test if args.eval_strategy != "no" else None, tokenizer=tokenizer,
            peft_config=get_peft_config(model_args),
        )
    except PoemDPOError as e:  # a launch that would not run as launched (samples.check_engine)
        parser.error(str(e))
    if method == "dpo":
        use_compact_lm_head(trainer)  # off CUDA: only completion positions go through the LM head
    samples = SamplePoemsCallback(
        trainer, titles, rule, every_steps=script_args.sample_every_steps, table_rows=script_args.sample_table_rows,
        max_new_tokens=script_args.sample_max_new_tokens, seed=args.seed, chat=chat,
    )
    trainer.add_callback(samples)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)  # parse_resume'd in check_settings
    metrics = final_metrics(trainer)  # the Trainer's evaluation at the last step, if it ran one

    # 6. Save model + tokenizer + card; push if asked.
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        # What evaluate.py needs to compute the rewards as this run did, in plain JSON (never a pickle).
        write_run_info(args.output_dir, {
            "stage": method, "base_model": model_args.model_name_or_path, "dataset": script_args.dataset_name,
            "rule": rule, "splits": splits.to_dict() if splits else None, "prompt_format": "chat" if chat else
            "instruction", "use_peft": model_args.use_peft, "train_pairs": len(train),
            **objective_settings(method, args),
        })
        last = samples.last or (samples.sample(trainer.state.global_step) if titles else {})
        write_card(
            method, args.output_dir, base_model=model_args.model_name_or_path, dataset=script_args.dataset_name,
            rule=rule, args=args, use_peft=model_args.use_peft, train_pairs=len(train),
            metrics={**metrics, **_last_train_metrics(trainer)}, sample_rates=last.get("metrics", {}),
            sample_table=last.get("table", ""), tokenizer=tokenizer, chat=chat,
        )
        print(f"saved the aligned model to {args.output_dir}")
        if args.push_to_hub:
            try:
                push_final_model(trainer)
            except PoemDPOError as e:
                sys.exit(f"train_dpo.py: error: {e}")
    # Tear the process group down before exit. Left to interpreter shutdown, a gloo rank of a finished 2-process
    # FSDP run aborted once ("terminate called without an active exception") after the model was saved.
    if trainer.accelerator.num_processes > 1:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
    return trainer


def _last_train_metrics(trainer: Trainer) -> dict:
    """The newest training log entry that carries rewards (every method logs rewards/margins)."""
    for entry in reversed(trainer.state.log_history):
        if "rewards/margins" in entry:
            return {k: v for k, v in entry.items() if k != "step"}
    return {}


if __name__ == "__main__":
    main()
